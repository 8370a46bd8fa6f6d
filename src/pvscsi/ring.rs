//! Ring geometry, the request/completion/message index discipline and the
//! context table.
//!
//! The driver keeps its own copy of every index it owns and of the ring
//! sizes it chose; the device-written values in the rings-state page
//! (`reqConsIdx`, `cmpProdIdx`, `msgProdIdx`, the log2 fields) are read
//! only to be checked against that state, never to size or index driver
//! memory (the illumos driver read the completion-ring log2 from the shared
//! page, notes §3). A completion's context only selects one of the
//! driver's own outstanding commands and is rejected if it names none.
//!
//! Flow control: a command holds its context from submission to
//! completion and there are exactly as many contexts as request slots, so
//! "no context free" is the rule of all three drivers (never let
//! reqProdIdx − cmpConsIdx reach the request ring's size), kept without
//! trusting any device-written index. The completion ring is at least as
//! large as the request ring, so it cannot overflow either (QEMU does not
//! check, Q `pvscsi_ring_pop_cmp_descr`).
//!
//! Nothing here allocates after construction, blocks, or loops more than
//! a ring's size.

use super::regs::{Command, SETUP_MSG_RING_MAX_PAGES, SETUP_RINGS_MAX_PAGES};
use super::wire::{
    CMP_DESC_SIZE, Completion, MSG_DESC_SIZE, PAGE_SIZE, REQ_DESC_SIZE, RawMessage, rs,
};
use crate::shmem::SharedMem;
use alloc::vec::Vec;
use core::sync::atomic::{Ordering, fence};

/// Request descriptors per page.
pub const REQ_PER_PAGE: u32 = (PAGE_SIZE / REQ_DESC_SIZE) as u32;
/// Completion descriptors per page.
pub const CMP_PER_PAGE: u32 = (PAGE_SIZE / CMP_DESC_SIZE) as u32;
/// Message descriptors per page.
pub const MSG_PER_PAGE: u32 = (PAGE_SIZE / MSG_DESC_SIZE) as u32;

/// A request or completion ring's page count: a power of two, 1..=32.
/// QEMU accepts any count up to 32 and computes log2 wrongly for the
/// others (3 pages: log2 7 of a 96-entry ring), so the type admits none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RingPages(u8);

impl RingPages {
    /// `n` pages, if a power of two in 1..=32.
    pub const fn new(n: u32) -> Option<Self> {
        if n == 0 || n > SETUP_RINGS_MAX_PAGES as u32 || !n.is_power_of_two() {
            None
        } else {
            Some(RingPages(n as u8))
        }
    }
    /// The count.
    pub const fn get(self) -> u32 {
        self.0 as u32
    }
}

/// A message ring's page count: a power of two, 1..=16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MsgRingPages(u8);

impl MsgRingPages {
    /// `n` pages, if a power of two in 1..=16.
    pub const fn new(n: u32) -> Option<Self> {
        if n == 0 || n > SETUP_MSG_RING_MAX_PAGES as u32 || !n.is_power_of_two() {
            None
        } else {
            Some(MsgRingPages(n as u8))
        }
    }
    /// The count.
    pub const fn get(self) -> u32 {
        self.0 as u32
    }
}

/// The sizes of the three rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Request ring pages.
    pub req_pages: RingPages,
    /// Completion ring pages.
    pub cmp_pages: RingPages,
    /// Message ring pages, if the device has one.
    pub msg_pages: Option<MsgRingPages>,
}

/// Pages of the default rings (Linux with ≤ 16 targets, illumos: 8).
pub const DEFAULT_RING_PAGES: u32 = 8;

impl Geometry {
    /// The rings for `max_targets` targets and an adapter queue depth of
    /// `queue_depth_goal` commands: 8 pages (256 requests) with up to 16
    /// targets, 32 (1024) above (Linux `pvscsi_allocate_rings` rule),
    /// more if the goal needs them, never more than 32. The completion
    /// ring gets as many pages as the request ring (as in all three
    /// drivers: 4x the entries, and the log2 pairs 5/7 .. 10/12 the notes'
    /// attach check expects). One message-ring page (32 messages).
    pub fn choose(max_targets: u32, queue_depth_goal: u32, msg_ring: bool) -> Geometry {
        let by_targets = if max_targets > 16 {
            SETUP_RINGS_MAX_PAGES as u32
        } else {
            DEFAULT_RING_PAGES
        };
        let by_goal = queue_depth_goal
            .div_ceil(REQ_PER_PAGE)
            .max(1)
            .min(SETUP_RINGS_MAX_PAGES as u32)
            .next_power_of_two();
        let pages = by_targets.max(by_goal).min(SETUP_RINGS_MAX_PAGES as u32);
        let pages = RingPages::new(pages).unwrap_or(RingPages(SETUP_RINGS_MAX_PAGES as u8));
        Geometry {
            req_pages: pages,
            cmp_pages: pages,
            msg_pages: if msg_ring { MsgRingPages::new(1) } else { None },
        }
    }

    /// Request ring entries.
    pub fn req_entries(&self) -> u32 {
        self.req_pages.get() * REQ_PER_PAGE
    }
    /// Completion ring entries.
    pub fn cmp_entries(&self) -> u32 {
        self.cmp_pages.get() * CMP_PER_PAGE
    }
    /// Message ring entries (0 without one).
    pub fn msg_entries(&self) -> u32 {
        self.msg_pages.map_or(0, |p| p.get() * MSG_PER_PAGE)
    }
}

/// A log2 field the device wrote that disagrees with the ring the driver
/// set up: the device misread SETUP_RINGS (or is lying), so nothing it does
/// with the rings can be trusted; attach fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeometryMismatch {
    /// Which ring.
    pub ring: RingKind,
    /// log2 of the driver's entries.
    pub expected: u32,
    /// What the device wrote.
    pub device: u32,
}

/// The three rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    /// Requests.
    Request,
    /// Completions.
    Completion,
    /// Messages.
    Message,
}

/// A command's context: 1..=entries, upper 32 bits zero (header: vmkernel
/// keeps it in a u32; zero is never used, so a zeroed descriptor never
/// names a command).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Context(u16);

impl Context {
    /// The value for the descriptor.
    pub fn value(self) -> u64 {
        u64::from(self.0) + 1
    }
    /// The table index (0-based).
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

#[derive(Debug)]
enum Slot<T> {
    /// Never used since the table was made (or reset).
    Free,
    /// Completed; free for reuse.
    Reaped,
    /// Submitted; `published` once reqProdIdx covers its descriptor.
    Outstanding { token: T, published: bool },
}

/// What was wrong with a completion (the descriptor is consumed, counted
/// and dropped; no command is touched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadCompletion {
    /// Context 0 or beyond the table (or above 32 bits).
    ContextOutOfRange {
        /// The context the device wrote.
        context: u64,
    },
    /// A context that was never issued since the rings were set up.
    NeverIssued {
        /// The context the device wrote.
        context: u64,
    },
    /// A context already completed (a duplicate or stale completion).
    Duplicate {
        /// The context the device wrote.
        context: u64,
    },
    /// A context whose request the device cannot have seen yet.
    NotPublished {
        /// The context the device wrote.
        context: u64,
    },
}

/// Why a command could not be put on the request ring.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError<T, E> {
    /// No context / request slot free: TRAN_BUSY, retry after completions.
    Full(T),
    /// The descriptor could not be built (TRAN_BADPKT).
    Encode(E, T),
}

/// A completion matched to its command.
#[derive(Debug, PartialEq, Eq)]
pub struct Reaped<T> {
    /// The command's context (free again).
    pub context: Context,
    /// The token given at submission.
    pub token: T,
    /// The descriptor as the device wrote it.
    pub completion: Completion,
}

/// The result of one look at the completion ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Reap<T> {
    /// Nothing new.
    Empty,
    /// One command completed.
    Done(Reaped<T>),
    /// One descriptor was consumed and dropped.
    Dropped(BadCompletion),
    /// The device's producer index claims more completions than there are
    /// published commands: the device is broken (reset it); nothing was
    /// consumed.
    Runaway {
        /// `cmpProdIdx` as read.
        device_prod: u32,
        /// The driver's consumer index.
        cons: u32,
        /// Published commands that could complete.
        outstanding: u32,
    },
}

/// The message ring, as one look found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgWindow {
    /// `n` messages wait. `maybe_lost` when the ring is full: QEMU drops
    /// what does not fit (Q `pvscsi_send_msg`), so events may be missing.
    Available {
        /// Messages waiting.
        n: u32,
        /// The ring was full.
        maybe_lost: bool,
    },
    /// The producer is more than a ring ahead (or behind) of the consumer:
    /// messages were overwritten. Skip them all and rescan.
    Overflow {
        /// `msgProdIdx` as read.
        device_prod: u32,
    },
}

/// Classifies the message ring's state (pure).
pub fn msg_window(device_prod: u32, cons: u32, entries: u32) -> MsgWindow {
    let n = device_prod.wrapping_sub(cons);
    if n > entries {
        MsgWindow::Overflow { device_prod }
    } else {
        MsgWindow::Available {
            n,
            maybe_lost: n == entries && n > 0,
        }
    }
}

/// Up to 32 page numbers, for SETUP_RINGS / SETUP_MSG_RING.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PpnList {
    ppns: [u64; SETUP_RINGS_MAX_PAGES],
    len: usize,
}

impl PpnList {
    fn of<M: SharedMem>(mem: &M, pages: u32) -> Self {
        let mut l = PpnList {
            ppns: [0; SETUP_RINGS_MAX_PAGES],
            len: 0,
        };
        let base = mem.device_addr() / PAGE_SIZE as u64;
        for (i, p) in l.ppns.iter_mut().take(pages as usize).enumerate() {
            *p = base + i as u64;
            l.len += 1;
        }
        l
    }
    /// The PPNs.
    pub fn as_slice(&self) -> &[u64] {
        &self.ppns[..self.len]
    }
}

/// Why rings could not be built over the memory given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingSetupError {
    /// A ring's memory is smaller than its pages or not page-aligned.
    BadMemory(RingKind),
    /// The rings-state page is smaller than a page or not page-aligned.
    BadStatePage,
}

/// The three rings over their memory (one contiguous, page-aligned
/// allocation each), with the driver's indices and the context table whose
/// commands carry tokens `T`. The caller serializes all calls.
pub struct Rings<M: SharedMem, T> {
    state: M,
    req: M,
    cmp: M,
    msg: Option<M>,
    geometry: Geometry,
    /// Next request index to fill (free-running).
    req_prod: u32,
    /// The request index last written to reqProdIdx.
    req_published: u32,
    /// Next completion to consume (free-running).
    cmp_cons: u32,
    /// Next message to consume (free-running).
    msg_cons: u32,
    slots: Vec<Slot<T>>,
    free: Vec<u16>,
    /// Context index of each request slot between req_published and
    /// req_prod (to mark them published).
    slot_context: Vec<u16>,
    /// Published commands not yet completed.
    published_outstanding: u32,
}

fn page_aligned<M: SharedMem>(mem: &M, pages: u32) -> bool {
    mem.device_addr() % PAGE_SIZE as u64 == 0 && mem.len() >= pages as usize * PAGE_SIZE
}

impl<M: SharedMem, T> Rings<M, T> {
    /// The memory of the rings state, request, completion and (if any)
    /// message rings (for their DMA handles' fault check).
    pub fn memories(&self) -> [Option<&M>; 4] {
        [
            Some(&self.state),
            Some(&self.req),
            Some(&self.cmp),
            self.msg.as_ref(),
        ]
    }

    /// Rings of `geometry` over the memory given (zeroed by the caller, as
    /// DmaBuffer::alloc does). `msg` is ignored without a message ring.
    pub fn new(
        geometry: Geometry,
        state: M,
        req: M,
        cmp: M,
        msg: Option<M>,
    ) -> Result<Self, RingSetupError> {
        if !page_aligned(&state, 1) {
            return Err(RingSetupError::BadStatePage);
        }
        if !page_aligned(&req, geometry.req_pages.get()) {
            return Err(RingSetupError::BadMemory(RingKind::Request));
        }
        if !page_aligned(&cmp, geometry.cmp_pages.get()) {
            return Err(RingSetupError::BadMemory(RingKind::Completion));
        }
        let msg = match (geometry.msg_pages, msg) {
            (Some(p), Some(m)) if page_aligned(&m, p.get()) => Some(m),
            (Some(_), _) => return Err(RingSetupError::BadMemory(RingKind::Message)),
            (None, _) => None,
        };
        let n = geometry.req_entries() as usize;
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, || Slot::Free);
        // Lowest context first: popped from the end.
        let free = (0..n as u16).rev().collect();
        Ok(Rings {
            state,
            req,
            cmp,
            msg,
            geometry,
            req_prod: 0,
            req_published: 0,
            cmp_cons: 0,
            msg_cons: 0,
            slots,
            free,
            slot_context: alloc::vec![0; n],
            published_outstanding: 0,
        })
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The rings-state page (for the core's own checks and tests).
    pub fn state_page(&self) -> &M {
        &self.state
    }

    /// SETUP_RINGS for these rings: build with the lists this returns.
    pub fn setup_rings_ppns(&self) -> (u64, PpnList, PpnList) {
        (
            self.state.device_addr() / PAGE_SIZE as u64,
            PpnList::of(&self.req, self.geometry.req_pages.get()),
            PpnList::of(&self.cmp, self.geometry.cmp_pages.get()),
        )
    }

    /// SETUP_MSG_RING's page list, if there is a message ring.
    pub fn setup_msg_ring_ppns(&self) -> Option<PpnList> {
        match (&self.msg, self.geometry.msg_pages) {
            (Some(m), Some(p)) => Some(PpnList::of(m, p.get())),
            _ => None,
        }
    }

    /// Builds the command from [`Rings::setup_rings_ppns`]' lists.
    pub fn setup_rings_command<'a>(rs_ppn: u64, req: &'a PpnList, cmp: &'a PpnList) -> Command<'a> {
        Command::SetupRings {
            rings_state_ppn: rs_ppn,
            req_ppns: req.as_slice(),
            cmp_ppns: cmp.as_slice(),
        }
    }

    /// After SETUP_RINGS (which zeroes the device's indices) and
    /// SETUP_MSG_RING: checks the log2 fields the device wrote against the
    /// driver's geometry.
    pub fn check_device_geometry(&self) -> Result<(), GeometryMismatch> {
        self.check_device_geometry_of(true)
    }

    /// [`Self::check_device_geometry`], the message ring's field only when
    /// `msg` (the device took SETUP_MSG_RING).
    pub fn check_device_geometry_of(&self, msg: bool) -> Result<(), GeometryMismatch> {
        self.state.sync_for_cpu(0, PAGE_SIZE);
        let mut checks = [
            (RingKind::Request, rs::REQ_LOG2, self.geometry.req_entries()),
            (
                RingKind::Completion,
                rs::CMP_LOG2,
                self.geometry.cmp_entries(),
            ),
            (
                RingKind::Message,
                rs::MSG_LOG2,
                if msg { self.geometry.msg_entries() } else { 0 },
            ),
        ]
        .into_iter();
        checks.try_for_each(|(ring, off, entries)| {
            if entries == 0 {
                return Ok(());
            }
            let device = self.state.read_u32(off);
            let expected = entries.trailing_zeros();
            if device == expected {
                Ok(())
            } else {
                Err(GeometryMismatch {
                    ring,
                    expected,
                    device,
                })
            }
        })
    }

    /// Free contexts (= request slots the driver may still fill).
    pub fn free_contexts(&self) -> usize {
        self.free.len()
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Fills the next request slot with the descriptor `build` makes for
    /// the context allocated to it, and takes `token` as the command. The
    /// device sees it only after [`Rings::publish`].
    pub fn submit<E>(
        &mut self,
        token: T,
        build: impl FnOnce(u64) -> Result<[u8; REQ_DESC_SIZE], E>,
    ) -> Result<Context, SubmitError<T, E>> {
        let Some(&idx) = self.free.last() else {
            return Err(SubmitError::Full(token));
        };
        let ctx = Context(idx);
        let desc = match build(ctx.value()) {
            Ok(d) => d,
            Err(e) => return Err(SubmitError::Encode(e, token)),
        };
        self.free.pop();
        let mask = self.geometry.req_entries() - 1;
        let slot = (self.req_prod & mask) as usize;
        self.req.write_bytes(slot * REQ_DESC_SIZE, &desc);
        if let Some(s) = self.slot_context.get_mut(slot) {
            *s = idx;
        }
        if let Some(s) = self.slots.get_mut(ctx.index()) {
            *s = Slot::Outstanding {
                token,
                published: false,
            };
        }
        self.req_prod = self.req_prod.wrapping_add(1);
        Ok(ctx)
    }

    /// Makes every filled descriptor visible and stores reqProdIdx; the
    /// caller rings the doorbell after. Returns the number published.
    pub fn publish(&mut self) -> u32 {
        let n = self.req_prod.wrapping_sub(self.req_published);
        if n == 0 {
            return 0;
        }
        let entries = self.geometry.req_entries();
        let mask = entries - 1;
        let first = self.req_published & mask;
        // The filled slots, in at most two runs (before and after the wrap).
        let run1 = n.min(entries - first);
        self.req.sync_for_device(
            first as usize * REQ_DESC_SIZE,
            run1 as usize * REQ_DESC_SIZE,
        );
        if n > run1 {
            self.req
                .sync_for_device(0, (n - run1) as usize * REQ_DESC_SIZE);
        }
        for i in 0..n.min(entries) {
            let slot = (self.req_published.wrapping_add(i) & mask) as usize;
            let idx = self.slot_context.get(slot).copied().unwrap_or(0);
            if let Some(Slot::Outstanding { published, .. }) = self.slots.get_mut(usize::from(idx))
                && !*published
            {
                *published = true;
                self.published_outstanding += 1;
            }
        }
        // The descriptors before the index that publishes them.
        fence(Ordering::Release);
        self.state.write_u32(rs::REQ_PROD, self.req_prod);
        self.state.sync_for_device(rs::REQ_PROD, 4);
        self.req_published = self.req_prod;
        n
    }

    /// Requests published that the device has not consumed, from the
    /// device-written reqConsIdx; `None` if that index is impossible
    /// (ahead of the producer or more than a ring behind).
    pub fn device_pending_requests(&self) -> Option<u32> {
        self.state.sync_for_cpu(rs::REQ_CONS, 4);
        let cons = self.state.read_u32(rs::REQ_CONS);
        let pending = self.req_published.wrapping_sub(cons);
        (pending <= self.geometry.req_entries()).then_some(pending)
    }

    /// The device-written request-call threshold.
    pub fn device_req_call_threshold(&self) -> u32 {
        self.state.sync_for_cpu(rs::REQ_CALL_THRESHOLD, 4);
        self.state.read_u32(rs::REQ_CALL_THRESHOLD)
    }

    /// Consumes at most one completion. Loop until `Empty` (at most the
    /// ring size in one go), or stop at `Runaway`.
    pub fn reap(&mut self) -> Reap<T> {
        self.state.sync_for_cpu(rs::CMP_PROD, 4);
        let device_prod = self.state.read_u32(rs::CMP_PROD);
        let avail = device_prod.wrapping_sub(self.cmp_cons);
        if avail == 0 {
            return Reap::Empty;
        }
        if avail > self.published_outstanding || avail > self.geometry.cmp_entries() {
            return Reap::Runaway {
                device_prod,
                cons: self.cmp_cons,
                outstanding: self.published_outstanding,
            };
        }
        // The index before the descriptor it covers.
        fence(Ordering::Acquire);
        let mask = self.geometry.cmp_entries() - 1;
        let off = (self.cmp_cons & mask) as usize * CMP_DESC_SIZE;
        self.cmp.sync_for_cpu(off, CMP_DESC_SIZE);
        let mut b = [0u8; CMP_DESC_SIZE];
        self.cmp.read_bytes(off, &mut b);
        let c = Completion::parse(&b);
        self.cmp_cons = self.cmp_cons.wrapping_add(1);
        self.state.write_u32(rs::CMP_CONS, self.cmp_cons);
        self.state.sync_for_device(rs::CMP_CONS, 4);
        match self.take_context(c.context) {
            Ok((context, token)) => Reap::Done(Reaped {
                context,
                token,
                completion: c,
            }),
            Err(bad) => Reap::Dropped(bad),
        }
    }

    fn take_context(&mut self, raw: u64) -> Result<(Context, T), BadCompletion> {
        let out_of_range = BadCompletion::ContextOutOfRange { context: raw };
        let idx = raw
            .checked_sub(1)
            .and_then(|i| u16::try_from(i).ok())
            .filter(|&i| usize::from(i) < self.slots.len())
            .ok_or(out_of_range)?;
        let slot = self.slots.get_mut(usize::from(idx)).ok_or(out_of_range)?;
        match slot {
            Slot::Free => Err(BadCompletion::NeverIssued { context: raw }),
            Slot::Reaped => Err(BadCompletion::Duplicate { context: raw }),
            Slot::Outstanding {
                published: false, ..
            } => Err(BadCompletion::NotPublished { context: raw }),
            Slot::Outstanding { .. } => {
                let Slot::Outstanding { token, .. } = core::mem::replace(slot, Slot::Reaped) else {
                    return Err(out_of_range);
                };
                self.published_outstanding = self.published_outstanding.saturating_sub(1);
                self.free.push(idx);
                Ok((Context(idx), token))
            }
        }
    }

    /// After ADAPTER_RESET (and draining the completion ring, which the
    /// reset fills with BUSRESET completions): takes back every command
    /// still outstanding, one per call, and when none is left resets the
    /// driver's indices for a new SETUP_RINGS (which zeroes the device's).
    /// The caller completes each with CMD_RESET.
    pub fn reclaim_one(&mut self) -> Option<(Context, T)> {
        let found = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Outstanding { .. }));
        let Some(i) = found else {
            self.reset_indices();
            return None;
        };
        let slot = self.slots.get_mut(i)?;
        let Slot::Outstanding { token, published } = core::mem::replace(slot, Slot::Reaped) else {
            return None;
        };
        if published {
            self.published_outstanding = self.published_outstanding.saturating_sub(1);
        }
        self.free.push(i as u16);
        Some((Context(i as u16), token))
    }

    fn reset_indices(&mut self) {
        self.req_prod = 0;
        self.req_published = 0;
        self.cmp_cons = 0;
        self.msg_cons = 0;
        self.published_outstanding = 0;
        for s in &mut self.slots {
            *s = Slot::Free;
        }
        self.free.clear();
        self.free.extend((0..self.slots.len() as u16).rev());
        for off in [rs::REQ_PROD, rs::CMP_CONS, rs::MSG_CONS] {
            self.state.write_u32(off, 0);
        }
        self.state.sync_for_device(0, PAGE_SIZE);
    }

    /// The command in flight under context index `index` (the core's
    /// slot), if any.
    pub fn token_mut(&mut self, index: u16) -> Option<&mut T> {
        match self.slots.get_mut(usize::from(index)) {
            Some(Slot::Outstanding { token, .. }) => Some(token),
            _ => None,
        }
    }

    /// Calls `f` on every command in flight, with its context index.
    pub fn for_each_outstanding(&mut self, f: &mut dyn FnMut(u16, &mut T)) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Slot::Outstanding { token, .. } = s {
                f(i as u16, token);
            }
        }
    }

    /// After ADAPTER_RESET: takes back every command still outstanding
    /// (in one pass over the table, whatever the completion ring holds:
    /// the reset's BUSRESET completions are not read) and resets the
    /// driver's indices for a new SETUP_RINGS, which zeroes the device's.
    /// The caller ends each command as reset.
    pub fn reclaim_all(&mut self, f: &mut dyn FnMut(T)) {
        for s in &mut self.slots {
            if let Slot::Outstanding { token, .. } = core::mem::replace(s, Slot::Free) {
                f(token);
            }
        }
        self.reset_indices();
    }

    /// Whether the device has produced completions the driver has not
    /// consumed (one read of `cmpProdIdx`).
    pub fn completions_waiting(&self) -> bool {
        self.state.sync_for_cpu(rs::CMP_PROD, 4);
        self.state.read_u32(rs::CMP_PROD) != self.cmp_cons
    }

    /// The driver's completion consumer index.
    pub fn completions_consumed(&self) -> u32 {
        self.cmp_cons
    }

    /// One look at the message ring.
    pub fn msg_window(&self) -> Option<MsgWindow> {
        self.msg.as_ref()?;
        self.state.sync_for_cpu(rs::MSG_PROD, 4);
        let prod = self.state.read_u32(rs::MSG_PROD);
        Some(msg_window(prod, self.msg_cons, self.geometry.msg_entries()))
    }

    /// Consumes the next message (after a window with `n > 0`); `None` if
    /// there is none or no message ring.
    pub fn next_message(&mut self) -> Option<RawMessage> {
        let entries = self.geometry.msg_entries();
        let MsgWindow::Available { n, .. } = self.msg_window()? else {
            return None;
        };
        if n == 0 {
            return None;
        }
        fence(Ordering::Acquire);
        let msg = self.msg.as_ref()?;
        let off = (self.msg_cons & (entries - 1)) as usize * MSG_DESC_SIZE;
        msg.sync_for_cpu(off, MSG_DESC_SIZE);
        let mut b = [0u8; MSG_DESC_SIZE];
        msg.read_bytes(off, &mut b);
        self.msg_cons = self.msg_cons.wrapping_add(1);
        self.state.write_u32(rs::MSG_CONS, self.msg_cons);
        self.state.sync_for_device(rs::MSG_CONS, 4);
        Some(RawMessage::parse(&b))
    }

    /// After an overflow: skips to the device's producer (the caller then
    /// rescans every target).
    pub fn skip_messages(&mut self) {
        self.state.sync_for_cpu(rs::MSG_PROD, 4);
        self.msg_cons = self.state.read_u32(rs::MSG_PROD);
        self.state.write_u32(rs::MSG_CONS, self.msg_cons);
        self.state.sync_for_device(rs::MSG_CONS, 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shmem::host::HostMem;
    use std::rc::Rc;

    /// HostMem shared between the "driver" (Rings) and the test playing
    /// the device.
    type Shared = Rc<HostMem>;

    struct Dev {
        state: Shared,
        req: Shared,
        cmp: Shared,
        msg: Shared,
        cmp_prod: u32,
    }

    impl Dev {
        fn complete(&mut self, context: u64, entries: u32) {
            let c = Completion {
                context,
                ..Default::default()
            };
            let slot = (self.cmp_prod & (entries - 1)) as usize;
            self.cmp.write_bytes(slot * 32, &c.to_bytes());
            self.cmp_prod = self.cmp_prod.wrapping_add(1);
            self.state.write_u32(rs::CMP_PROD, self.cmp_prod);
        }
        fn req_context(&self, slot: usize) -> u64 {
            self.req.read_u64(slot * 128)
        }
    }

    fn rings(g: Geometry) -> (Rings<Shared, u32>, Dev) {
        let mk = |pages: u32, base: u64| Rc::new(HostMem::new(pages as usize * 4096, base));
        let state = mk(1, 0x10_0000);
        let req = mk(g.req_pages.get(), 0x20_0000);
        let cmp = mk(g.cmp_pages.get(), 0x40_0000);
        let msg = mk(1, 0x60_0000);
        let r = Rings::new(
            g,
            state.clone(),
            req.clone(),
            cmp.clone(),
            Some(msg.clone()),
        )
        .unwrap();
        (
            r,
            Dev {
                state,
                req,
                cmp,
                msg,
                cmp_prod: 0,
            },
        )
    }

    fn small() -> Geometry {
        Geometry {
            req_pages: RingPages::new(1).unwrap(),
            cmp_pages: RingPages::new(1).unwrap(),
            msg_pages: MsgRingPages::new(1),
        }
    }

    fn desc(ctx: u64) -> Result<[u8; 128], ()> {
        let mut d = [0u8; 128];
        d[..8].copy_from_slice(&ctx.to_le_bytes());
        Ok(d)
    }

    #[test]
    fn page_counts() {
        for n in 0..40 {
            assert_eq!(
                RingPages::new(n).is_some(),
                [1, 2, 4, 8, 16, 32].contains(&n),
                "{n}"
            );
            assert_eq!(
                MsgRingPages::new(n).is_some(),
                [1, 2, 4, 8, 16].contains(&n),
                "{n}"
            );
        }
    }

    #[test]
    fn geometry_choice() {
        let g = Geometry::choose(16, 0, true);
        assert_eq!((g.req_pages.get(), g.cmp_pages.get()), (8, 8));
        assert_eq!(
            (g.req_entries(), g.cmp_entries(), g.msg_entries()),
            (256, 1024, 32)
        );
        assert_eq!(Geometry::choose(17, 0, false).req_pages.get(), 32);
        assert_eq!(Geometry::choose(65, 0, false).msg_entries(), 0);
        assert_eq!(
            Geometry::choose(8, 300, true).req_pages.get(),
            16,
            "300 requests: 16 pages"
        );
        assert_eq!(
            Geometry::choose(8, 1 << 20, true).req_pages.get(),
            32,
            "capped"
        );
        for t in [0, 1, 16, 17, 64, 256] {
            for q in [0, 1, 31, 33, 255, 257, 1000, 1025, u32::MAX] {
                let g = Geometry::choose(t, q, true);
                assert!(g.req_pages.get().is_power_of_two());
                assert!(
                    g.cmp_entries() >= g.req_entries(),
                    "completion ring never overflows"
                );
                assert!(g.req_entries() >= q.min(1024));
            }
        }
    }

    #[test]
    fn setup_lists_and_device_log2_check() {
        let (r, dev) = rings(small());
        let (rs_ppn, req, cmp) = r.setup_rings_ppns();
        assert_eq!(rs_ppn, 0x100);
        assert_eq!(req.as_slice(), &[0x200]);
        assert_eq!(cmp.as_slice(), &[0x400]);
        assert_eq!(r.setup_msg_ring_ppns().unwrap().as_slice(), &[0x600]);
        let cmd = Rings::<Shared, u32>::setup_rings_command(rs_ppn, &req, &cmp);
        assert!(cmd.encode().is_ok());
        dev.state.write_u32(rs::REQ_LOG2, 5);
        dev.state.write_u32(rs::CMP_LOG2, 7);
        dev.state.write_u32(rs::MSG_LOG2, 5);
        assert_eq!(r.check_device_geometry(), Ok(()));
        dev.state.write_u32(rs::CMP_LOG2, 12);
        assert_eq!(
            r.check_device_geometry(),
            Err(GeometryMismatch {
                ring: RingKind::Completion,
                expected: 7,
                device: 12
            })
        );
    }

    #[test]
    fn submit_publish_reap_round_trip_with_wrap() {
        let (mut r, mut dev) = rings(small());
        // Several laps of the 32-entry ring.
        for round in 0..5u32 {
            let mut ctxs = Vec::new();
            for i in 0..20 {
                ctxs.push(r.submit::<()>(round * 100 + i, desc).unwrap());
            }
            assert_eq!(
                dev.state.read_u32(rs::REQ_PROD),
                round * 20,
                "not yet published"
            );
            assert_eq!(r.publish(), 20);
            assert_eq!(dev.state.read_u32(rs::REQ_PROD), (round + 1) * 20);
            // The device completes them in reverse order.
            for k in (0..20).rev() {
                let slot = ((round * 20 + k) % 32) as usize;
                dev.complete(dev.req_context(slot), 128);
            }
            for k in (0..20).rev() {
                match r.reap() {
                    Reap::Done(d) => {
                        assert_eq!(d.token, round * 100 + k);
                        assert_eq!(d.context, ctxs[k as usize]);
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(r.reap(), Reap::Empty);
            assert_eq!(dev.state.read_u32(rs::CMP_CONS), (round + 1) * 20);
            assert_eq!(r.outstanding(), 0);
        }
    }

    #[test]
    fn contexts_are_nonzero_and_32_bit() {
        let (mut r, _) = rings(small());
        let mut seen = Vec::new();
        while let Ok(c) = r.submit::<()>(0, desc) {
            assert!(c.value() >= 1 && c.value() <= 32);
            seen.push(c.value());
        }
        seen.sort();
        assert_eq!(seen, (1..=32).collect::<Vec<_>>());
    }

    #[test]
    fn flow_control_full_ring_is_busy() {
        let (mut r, mut dev) = rings(small());
        for i in 0..32 {
            r.submit::<()>(i, desc).unwrap();
        }
        assert_eq!(r.submit::<()>(99, desc), Err(SubmitError::Full(99)));
        r.publish();
        dev.complete(dev.req_context(0), 128);
        assert!(matches!(r.reap(), Reap::Done(_)));
        assert!(r.submit::<()>(100, desc).is_ok(), "one slot free again");
        assert_eq!(r.submit(101, |_| Err("bad")), Err(SubmitError::Full(101)));
    }

    #[test]
    fn encode_failure_gives_the_token_back_and_uses_no_slot() {
        let (mut r, _) = rings(small());
        assert_eq!(
            r.submit(7, |_| Err("bad")),
            Err(SubmitError::Encode("bad", 7))
        );
        assert_eq!(r.free_contexts(), 32);
        assert_eq!(r.publish(), 0);
    }

    #[test]
    fn bad_completions_are_dropped_with_verdicts() {
        let (mut r, mut dev) = rings(small());
        let a = r.submit::<()>(1, desc).unwrap();
        r.publish();
        let unpublished = r.submit::<()>(2, desc).unwrap();
        // a context never issued, one out of range, zero, above 32 bits
        for (ctx, verdict) in [
            (5u64, BadCompletion::NeverIssued { context: 5 }),
            (0, BadCompletion::ContextOutOfRange { context: 0 }),
            (33, BadCompletion::ContextOutOfRange { context: 33 }),
            (
                a.value() | 1 << 32,
                BadCompletion::ContextOutOfRange {
                    context: a.value() | 1 << 32,
                },
            ),
            (
                unpublished.value(),
                BadCompletion::NotPublished {
                    context: unpublished.value(),
                },
            ),
        ] {
            dev.complete(ctx, 128);
            assert_eq!(r.reap(), Reap::Dropped(verdict));
        }
        dev.complete(a.value(), 128);
        assert!(matches!(r.reap(), Reap::Done(Reaped { token: 1, .. })));
        assert_eq!(r.outstanding(), 1, "the unpublished one is still ours");
        // Publish the second so that the device may complete something;
        // then a duplicate of the first.
        r.publish();
        dev.complete(a.value(), 128);
        assert_eq!(
            r.reap(),
            Reap::Dropped(BadCompletion::Duplicate { context: a.value() })
        );
    }

    #[test]
    fn runaway_producer_index_consumes_nothing() {
        let (mut r, dev) = rings(small());
        r.submit::<()>(1, desc).unwrap();
        r.publish();
        dev.state.write_u32(rs::CMP_PROD, 2);
        assert_eq!(
            r.reap(),
            Reap::Runaway {
                device_prod: 2,
                cons: 0,
                outstanding: 1
            }
        );
        assert_eq!(dev.state.read_u32(rs::CMP_CONS), 0);
        // An unpublished command cannot complete either.
        let (mut r, dev) = rings(small());
        r.submit::<()>(1, desc).unwrap();
        dev.state.write_u32(rs::CMP_PROD, 1);
        assert!(matches!(r.reap(), Reap::Runaway { outstanding: 0, .. }));
        // Behind the consumer (a huge wrapping difference) likewise.
        dev.state.write_u32(rs::CMP_PROD, u32::MAX);
        assert!(matches!(r.reap(), Reap::Runaway { .. }));
    }

    #[test]
    fn device_pending_requests_checks_the_index() {
        let (mut r, dev) = rings(small());
        for i in 0..4 {
            r.submit::<()>(i, desc).unwrap();
        }
        r.publish();
        dev.state.write_u32(rs::REQ_CONS, 1);
        assert_eq!(r.device_pending_requests(), Some(3));
        dev.state.write_u32(rs::REQ_CONS, 5);
        assert_eq!(r.device_pending_requests(), None, "ahead of the producer");
    }

    #[test]
    fn reclaim_after_reset_returns_every_command_and_resets_indices() {
        let (mut r, mut dev) = rings(small());
        for i in 0..5 {
            r.submit::<()>(i, desc).unwrap();
        }
        r.publish();
        dev.complete(dev.req_context(2), 128);
        assert!(matches!(r.reap(), Reap::Done(Reaped { token: 2, .. })));
        let mut back = Vec::new();
        while let Some((_, t)) = r.reclaim_one() {
            back.push(t);
            assert!(back.len() <= 5);
        }
        back.sort();
        assert_eq!(back, [0, 1, 3, 4]);
        assert_eq!(r.free_contexts(), 32);
        assert_eq!(dev.state.read_u32(rs::REQ_PROD), 0);
        assert_eq!(dev.state.read_u32(rs::CMP_CONS), 0);
        // After SETUP_RINGS the device starts at 0 too: a fresh round works.
        dev.cmp_prod = 0;
        dev.state.write_u32(rs::CMP_PROD, 0);
        let c = r.submit::<()>(9, desc).unwrap();
        r.publish();
        dev.complete(c.value(), 128);
        assert!(matches!(r.reap(), Reap::Done(Reaped { token: 9, .. })));
    }

    #[test]
    fn message_windows() {
        assert_eq!(
            msg_window(0, 0, 32),
            MsgWindow::Available {
                n: 0,
                maybe_lost: false
            }
        );
        assert_eq!(
            msg_window(3, 1, 32),
            MsgWindow::Available {
                n: 2,
                maybe_lost: false
            }
        );
        assert_eq!(
            msg_window(32, 0, 32),
            MsgWindow::Available {
                n: 32,
                maybe_lost: true
            }
        );
        assert_eq!(
            msg_window(33, 0, 32),
            MsgWindow::Overflow { device_prod: 33 }
        );
        assert_eq!(
            msg_window(1, u32::MAX, 32),
            MsgWindow::Available {
                n: 2,
                maybe_lost: false
            }
        );
        assert_eq!(
            msg_window(0, 5, 32),
            MsgWindow::Overflow { device_prod: 0 },
            "behind"
        );
    }

    #[test]
    fn messages_are_consumed_in_order_and_overflow_skips() {
        let (mut r, dev) = rings(small());
        for i in 0..3u32 {
            let mut b = [0u8; 128];
            b[0..4].copy_from_slice(&(i % 2).to_le_bytes());
            b[8..12].copy_from_slice(&(10 + i).to_le_bytes());
            dev.msg.write_bytes(i as usize * 128, &b);
        }
        dev.state.write_u32(rs::MSG_PROD, 3);
        let got: Vec<_> = core::iter::from_fn(|| r.next_message()).take(10).collect();
        assert_eq!(
            got.iter().map(|m| (m.kind, m.target)).collect::<Vec<_>>(),
            [(0, 10), (1, 11), (0, 12)]
        );
        assert_eq!(dev.state.read_u32(rs::MSG_CONS), 3);
        dev.state.write_u32(rs::MSG_PROD, 3 + 40);
        assert_eq!(
            r.msg_window(),
            Some(MsgWindow::Overflow { device_prod: 43 })
        );
        assert_eq!(
            r.next_message(),
            None,
            "nothing is read from an overrun ring"
        );
        r.skip_messages();
        assert_eq!(dev.state.read_u32(rs::MSG_CONS), 43);
        assert_eq!(
            r.msg_window(),
            Some(MsgWindow::Available {
                n: 0,
                maybe_lost: false
            })
        );
    }

    #[test]
    fn memory_must_fit_the_geometry() {
        let g = Geometry::choose(16, 0, true);
        let mk = |len: usize, base: u64| HostMem::new(len, base);
        let r = Rings::<HostMem, ()>::new(
            g,
            mk(4096, 0x1000),
            mk(4096, 0x2000),
            mk(8 * 4096, 0x10000),
            Some(mk(4096, 0x30000)),
        );
        assert!(matches!(
            r,
            Err(RingSetupError::BadMemory(RingKind::Request))
        ));
        let r = Rings::<HostMem, ()>::new(
            g,
            mk(4096, 0x1800),
            mk(8 * 4096, 0x2000),
            mk(8 * 4096, 0x10000),
            None,
        );
        assert!(matches!(r, Err(RingSetupError::BadStatePage)));
        let r = Rings::<HostMem, ()>::new(
            g,
            mk(4096, 0x1000),
            mk(8 * 4096, 0x2000),
            mk(8 * 4096, 0x10000),
            None,
        );
        assert!(matches!(
            r,
            Err(RingSetupError::BadMemory(RingKind::Message))
        ));
    }
}
