//! The split virtqueue (virtio 1.2 §2.7), driver side.
//!
//! The queue lives in memory shared with the device ([`SharedMem`]); the
//! driver keeps its own *shadow* of every descriptor it wrote and of every
//! chain it made available, so that nothing the device writes is ever used
//! to find driver memory: a used element's `id` only selects one of our own
//! outstanding chains (and is rejected if it names none), its `len` is
//! clamped to what the chain offered the device, and descriptors are freed
//! by walking the shadow, not the ring.
//!
//! Layout (§2.7, with the legacy alignment of §2.7.2 so that one layout
//! serves both transports): descriptor table (16 bytes per entry), then the
//! available ring (`flags`, `idx`, `ring[size]`, `used_event`), then, at the
//! next 4096-byte boundary, the used ring (`flags`, `idx`,
//! `ring[size]` of `{id, len}`, `avail_event`).
//!
//! Nothing here allocates or blocks; every loop is bounded by the queue
//! size. The caller serializes all calls (one lock per queue).

use crate::shmem::SharedMem;
use alloc::vec::Vec;
use core::sync::atomic::{Ordering, fence};

/// `VIRTQ_DESC_F_NEXT`: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors (§2.7.5.3).
pub const DESC_F_INDIRECT: u16 = 4;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT` (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VIRTQ_USED_F_NO_NOTIFY` (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// Size of one descriptor (`struct virtq_desc`).
pub const DESC_SIZE: usize = 16;
/// Legacy used-ring alignment (§2.7.2; `VIRTIO_PCI_VRING_ALIGN`).
pub const LEGACY_ALIGN: usize = 4096;
/// Largest queue size the spec allows (§2.7: at most 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// `vring_need_event` (§2.7.10): whether moving an index from `old` to
/// `new` crosses `event`, i.e. the other side asked to be told. Correct
/// across the 16-bit wrap of all three values.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Where each part of a queue of `size` entries lives, in bytes from the
/// start of its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Number of entries (a power of two).
    pub size: u16,
    /// Offset of the available ring.
    pub avail: usize,
    /// Offset of the used ring.
    pub used: usize,
    /// Bytes needed in all.
    pub total: usize,
}

impl Layout {
    /// The layout for `size` entries; `None` unless `size` is a power of two
    /// between 1 and 32768 (§2.7: "Queue Size ... is a power of 2" for
    /// legacy; we require it for both so that indices wrap cleanly).
    pub fn new(size: u16) -> Option<Layout> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return None;
        }
        let n = usize::from(size);
        let avail = DESC_SIZE * n;
        let avail_len = 6 + 2 * n;
        let used = (avail + avail_len).next_multiple_of(LEGACY_ALIGN);
        let used_len = 6 + 8 * n;
        Some(Layout {
            size,
            avail,
            used,
            total: used + used_len,
        })
    }

    fn desc(&self, i: u16) -> usize {
        DESC_SIZE * usize::from(i)
    }
    fn avail_flags(&self) -> usize {
        self.avail
    }
    fn avail_idx(&self) -> usize {
        self.avail + 2
    }
    fn avail_slot(&self, slot: u16) -> usize {
        self.avail + 4 + 2 * usize::from(slot)
    }
    fn used_event(&self) -> usize {
        self.avail + 4 + 2 * usize::from(self.size)
    }
    fn used_flags(&self) -> usize {
        self.used
    }
    fn used_idx(&self) -> usize {
        self.used + 2
    }
    fn used_slot(&self, slot: u16) -> usize {
        self.used + 4 + 8 * usize::from(slot)
    }
    fn avail_event(&self) -> usize {
        self.used + 4 + 8 * usize::from(self.size)
    }
}

/// One buffer of a chain: bus address, length, and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Bus address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (otherwise it reads it).
    pub device_writes: bool,
}

/// Why a chain could not be made available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddError {
    /// Not enough free descriptors now; retry after completions.
    Full,
    /// The chain can never be sent: empty, longer than the queue, or a
    /// device-readable buffer after a device-writable one (§2.7.4.2).
    Invalid,
}

/// What was wrong with a used element the device returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsedError {
    /// The `id` names no chain we made available (out of range, or a
    /// descriptor that never headed a chain): the element is dropped.
    UnknownId {
        /// The id the device wrote.
        id: u32,
    },
    /// The `id` names a chain the device already returned, and no chain
    /// was made available at that head since (a duplicate or stale used
    /// element): the element is dropped.
    AlreadyReturned {
        /// The id the device wrote.
        id: u32,
    },
    /// The device's used index moved more than a whole ring ahead of the
    /// driver: the device is broken and must be reset; nothing is consumed.
    IndexRunaway {
        /// The used index the device wrote.
        device_idx: u16,
        /// The next index the driver expected to consume.
        expected: u16,
    },
}

/// A chain the device returned.
#[derive(Debug, PartialEq, Eq)]
pub struct Used<T> {
    /// The token given when the chain was added.
    pub token: T,
    /// Bytes the device wrote, clamped to what the chain offered.
    pub len: u32,
    /// The device claimed to write more than the chain offered.
    pub len_clamped: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Debug)]
struct Head<T> {
    token: T,
    ndesc: u16,
    writable: u64,
}

/// What a descriptor index means as the `id` of a used element. The ring
/// keeps this one step of history so that a repeated used element can be
/// told from one naming a descriptor that never headed a chain (both are
/// dropped; the HBA counts them apart, issue 15).
#[derive(Debug)]
enum HeadSlot<T> {
    /// No chain was ever made available with this head (since the queue
    /// was set up or last reset).
    Never,
    /// A chain headed here is with the device.
    Outstanding(Head<T>),
    /// The device returned the chain headed here; none has been made
    /// available at this head since. (The descriptor itself may be in
    /// use again inside another chain: it still heads none.)
    Returned,
}

/// A split virtqueue over memory `M`, whose chains carry tokens `T`.
pub struct SplitQueue<M, T> {
    mem: M,
    layout: Layout,
    shadow: Vec<Desc>,
    heads: Vec<HeadSlot<T>>,
    free_head: u16,
    num_free: u16,
    /// Next free slot of the available ring (free-running).
    avail_idx: u16,
    /// `avail_idx` when the device was last told about new chains.
    published_idx: u16,
    /// `avail_idx` at the last notification decision (for need_event).
    notified_idx: u16,
    /// Next used element to consume (free-running).
    last_used: u16,
    /// The device's used index as last read and checked (never more
    /// than a ring ahead of `last_used`): elements up to it are consumed
    /// without reading (and syncing) the index again for each.
    used_seen: u16,
    /// The lowest offset of a descriptor written since the last publish
    /// (synced for the device together with the available ring entries,
    /// before the index that exposes them).
    desc_dirty_from: Option<usize>,
    /// Used elements consumed since the queue was made (never wraps in
    /// practice): what a watchdog compares between its looks.
    consumed: u64,
    /// `consumed` at a watchdog look that found elements waiting.
    waiting_mark: Option<u64>,
    event_idx: bool,
}

impl<M: SharedMem, T> SplitQueue<M, T> {
    /// The memory the ring lives in (for its DMA handle's fault check).
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// A queue of `size` entries in `mem` (zeroed, at least
    /// `Layout::new(size).total` bytes). `event_idx` says whether
    /// `VIRTIO_F_EVENT_IDX` was negotiated.
    pub fn new(mem: M, size: u16, event_idx: bool) -> Option<Self> {
        let layout = Layout::new(size)?;
        if mem.len() < layout.total {
            return None;
        }
        let n = usize::from(size);
        let mut shadow = Vec::with_capacity(n);
        for i in 0..n {
            shadow.push(Desc {
                next: ((i + 1) % n) as u16,
                ..Desc::default()
            });
        }
        let mut heads = Vec::with_capacity(n);
        heads.resize_with(n, || HeadSlot::Never);
        Some(Self {
            mem,
            layout,
            shadow,
            heads,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            published_idx: 0,
            notified_idx: 0,
            last_used: 0,
            used_seen: 0,
            desc_dirty_from: None,
            consumed: 0,
            waiting_mark: None,
            event_idx,
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// The memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains made available and not yet returned.
    pub fn outstanding(&self) -> usize {
        self.heads
            .iter()
            .filter(|h| matches!(h, HeadSlot::Outstanding(_)))
            .count()
    }

    /// The memory the queue lives in.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Bus addresses of the descriptor table, available ring and used ring
    /// (for the transport's queue setup).
    pub fn addresses(&self) -> (u64, u64, u64) {
        let base = self.mem.device_addr();
        (
            base,
            base + self.layout.avail as u64,
            base + self.layout.used as u64,
        )
    }

    fn write_desc(&mut self, i: u16, d: Desc) {
        self.shadow[usize::from(i)] = d;
        let off = self.layout.desc(i);
        // struct virtq_desc (§2.7.5), little-endian, in one write (one
        // bounds check rather than four).
        let mut b = [0u8; DESC_SIZE];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write_bytes(off, &b);
        // Synced by publish(), with the ring entries, in one call.
        self.desc_dirty_from = Some(self.desc_dirty_from.map_or(off, |lo| lo.min(off)));
    }

    fn take_free(&mut self) -> u16 {
        let i = self.free_head;
        self.free_head = self.shadow[usize::from(i)].next;
        self.num_free -= 1;
        i
    }

    fn put_avail(&mut self, head: u16, token: T, ndesc: u16, writable: u64) {
        self.heads[usize::from(head)] = HeadSlot::Outstanding(Head {
            token,
            ndesc,
            writable,
        });
        let slot = self.avail_idx & (self.layout.size - 1);
        self.mem.write_u16(self.layout.avail_slot(slot), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Adds a chain of direct descriptors carrying `token`; returns its head.
    /// Device-readable segments must come first.
    /// On error the token comes back.
    pub fn add_chain<I>(&mut self, segs: I, token: T) -> Result<u16, (T, AddError)>
    where
        I: IntoIterator<Item = Segment>,
        I::IntoIter: ExactSizeIterator,
    {
        let segs = segs.into_iter();
        let mut w = match self.begin_chain(segs.len()) {
            Ok(w) => w,
            Err(e) => return Err((token, e)),
        };
        for s in segs {
            if let Err(e) = w.push(s) {
                return Err((token, e));
            }
        }
        w.commit(token)
    }

    /// Starts a chain of `n` direct descriptors: push each segment, then
    /// commit with the chain's token. A writer dropped before its commit
    /// gives the descriptors back. (Segments can thus be read from data
    /// that the token itself owns.)
    pub fn begin_chain(&mut self, n: usize) -> Result<ChainWriter<'_, M, T>, AddError> {
        if n == 0 || n > usize::from(self.layout.size) {
            return Err(AddError::Invalid);
        }
        if n > usize::from(self.num_free) {
            return Err(AddError::Full);
        }
        let head = self.free_head;
        Ok(ChainWriter {
            q: self,
            head,
            want: n,
            pushed: 0,
            writable: 0,
            seen_writable: false,
            committed: false,
        })
    }

    /// Adds one descriptor pointing at an indirect table of `entries`
    /// descriptors at bus address `table` (§2.7.5.3), the table already
    /// written and synced by the caller, which also tells how many bytes the
    /// table's buffers let the device write. On error the token comes back.
    pub fn add_indirect(
        &mut self,
        table: u64,
        entries: u16,
        writable: u64,
        token: T,
    ) -> Result<u16, (T, AddError)> {
        if entries == 0 || entries > self.layout.size {
            return Err((token, AddError::Invalid));
        }
        if self.num_free == 0 {
            return Err((token, AddError::Full));
        }
        let i = self.take_free();
        let len = u32::from(entries) * DESC_SIZE as u32;
        self.write_desc(
            i,
            Desc {
                addr: table,
                len,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
        );
        self.put_avail(i, token, 1, writable);
        Ok(i)
    }

    /// Makes every chain added since the last call visible to the device,
    /// and returns whether the device wants to be notified (§2.7.13.3:
    /// `avail_event` with EVENT_IDX, else `VIRTQ_USED_F_NO_NOTIFY`).
    pub fn publish(&mut self) -> bool {
        self.expose() && self.notify_needed()
    }

    /// Makes every chain added since the last call visible to the device
    /// without deciding about a notification (that is
    /// [`Self::notify_needed`]'s, once for a batch); true if there was
    /// anything new.
    pub fn expose(&mut self) -> bool {
        let new = self.avail_idx;
        let old = self.published_idx;
        if new == old {
            return false;
        }
        // The ring entries first, then the index that exposes them.
        let size = self.layout.size;
        let first = old & (size - 1);
        let count = new.wrapping_sub(old);
        let upto = u32::from(first) + u32::from(count);
        // The descriptors written since the last publish lie below the
        // available ring (the table comes first, §2.7): one sync from the
        // lowest of them up to the last new entry covers both (the
        // descriptors and entries in between are the driver's own,
        // unchanged or synced already; ring memory is consistent).
        let slots_end = |n: u16| self.layout.avail_slot(first) + 2 * usize::from(n);
        let from = |at: usize| self.desc_dirty_from.map_or(at, |lo| lo.min(at));
        if upto <= u32::from(size) {
            let at = self.layout.avail_slot(first);
            let lo = from(at);
            self.mem.sync_for_device(lo, slots_end(count) - lo);
        } else {
            let head_part = size - first;
            let at = self.layout.avail_slot(first);
            let lo = from(at);
            self.mem.sync_for_device(lo, slots_end(head_part) - lo);
            self.mem.sync_for_device(
                self.layout.avail_slot(0),
                2 * usize::from(count - head_part),
            );
        }
        self.desc_dirty_from = None;
        fence(Ordering::Release);
        self.mem.write_u16(self.layout.avail_idx(), new);
        self.mem.sync_for_device(self.layout.avail_idx(), 2);
        self.published_idx = new;
        // The index store must be visible before we read the device's
        // suppression state (a store-load ordering).
        fence(Ordering::SeqCst);
        true
    }

    /// Whether the chains exposed since the last notification decision
    /// need a notification now: one decision over the whole batch, as
    /// §2.7.10.2 allows (with EVENT_IDX, whether `avail_event` lies among
    /// them). False when nothing was exposed since.
    pub fn notify_needed(&mut self) -> bool {
        let new = self.published_idx;
        let old = self.notified_idx;
        if new == old {
            return false;
        }
        self.notified_idx = new;
        if self.event_idx {
            let off = self.layout.avail_event();
            self.mem.sync_for_cpu(off, 2);
            need_event(self.mem.read_u16(off), new, old)
        } else {
            let off = self.layout.used_flags();
            self.mem.sync_for_cpu(off, 2);
            self.mem.read_u16(off) & USED_F_NO_NOTIFY == 0
        }
    }

    /// The device's used index (synced from the device).
    fn device_used_idx(&self) -> u16 {
        let off = self.layout.used_idx();
        self.mem.sync_for_cpu(off, 2);
        self.mem.read_u16(off)
    }

    /// Whether the device has returned chains not yet consumed.
    pub fn has_used(&self) -> bool {
        self.device_used_idx() != self.last_used
    }

    /// Consumes the next used element, if any.
    pub fn pop_used(&mut self) -> Option<Result<Used<T>, UsedError>> {
        if self.used_seen == self.last_used {
            // Everything seen is consumed: read the device's index again.
            let device_idx = self.device_used_idx();
            if device_idx == self.last_used {
                return None;
            }
            // The used ring has `size` slots: a device more than that
            // ahead of us has overwritten entries we never read and cannot
            // be trusted. (Fewer, but more than we have outstanding,
            // yields UnknownId entries below, which are dropped one by
            // one.)
            let ahead = device_idx.wrapping_sub(self.last_used);
            if ahead > self.layout.size {
                return Some(Err(UsedError::IndexRunaway {
                    device_idx,
                    expected: self.last_used,
                }));
            }
            // The elements up to the index are read after it, synced for
            // the CPU in one call (two where the range wraps).
            fence(Ordering::Acquire);
            self.sync_used_slots(self.last_used, ahead);
            self.used_seen = device_idx;
        }
        let slot = self.last_used & (self.layout.size - 1);
        let off = self.layout.used_slot(slot);
        let id = self.mem.read_u32(off);
        let len = self.mem.read_u32(off + 4);
        self.last_used = self.last_used.wrapping_add(1);
        self.consumed += 1;
        let Some(slot) = usize::try_from(id).ok().and_then(|i| self.heads.get_mut(i)) else {
            return Some(Err(UsedError::UnknownId { id }));
        };
        let head = match core::mem::replace(slot, HeadSlot::Returned) {
            HeadSlot::Outstanding(head) => head,
            HeadSlot::Returned => return Some(Err(UsedError::AlreadyReturned { id })),
            HeadSlot::Never => {
                *slot = HeadSlot::Never;
                return Some(Err(UsedError::UnknownId { id }));
            }
        };
        self.free_chain(id as u16, head.ndesc);
        let clamped = u64::from(len) > head.writable;
        let len = if clamped { head.writable as u32 } else { len };
        Some(Ok(Used {
            token: head.token,
            len,
            len_clamped: clamped,
        }))
    }

    /// Syncs `count` (at most a ring's worth) used elements from
    /// free-running index `from` for the CPU.
    fn sync_used_slots(&self, from: u16, count: u16) {
        let size = self.layout.size;
        let first = from & (size - 1);
        let head_part = count.min(size - first);
        self.mem
            .sync_for_cpu(self.layout.used_slot(first), 8 * usize::from(head_part));
        if count > head_part {
            self.mem
                .sync_for_cpu(self.layout.used_slot(0), 8 * usize::from(count - head_part));
        }
    }

    fn free_chain(&mut self, head: u16, ndesc: u16) {
        // Walk our shadow, never the device-visible table.
        let mut last = head;
        for _ in 1..ndesc {
            last = self.shadow[usize::from(last)].next;
        }
        self.shadow[usize::from(last)].next = self.free_head;
        self.free_head = head;
        self.num_free += ndesc;
    }

    /// For a watchdog's periodic look: whether used elements have been
    /// waiting since the previous look without the driver consuming any
    /// in between (nobody is reaping this queue). The first look that
    /// finds elements waiting only marks them.
    pub fn used_waiting_since_last_look(&mut self) -> bool {
        let waiting = self.has_used();
        let stalled = waiting && self.waiting_mark == Some(self.consumed);
        self.waiting_mark = waiting.then_some(self.consumed);
        stalled
    }

    /// Asks the device to interrupt when it returns the next chain, and
    /// returns whether chains are already waiting (then the caller must
    /// poll again, or it could miss them: §2.7.10).
    ///
    /// With EVENT_IDX this writes `used_event` := the next index the
    /// driver will consume, then fences (store-load) and re-reads the
    /// device's used index. The device interrupts when its used index
    /// moves past `used_event` (§2.7.7.2; QEMU: vring_need_event in
    /// virtio_split_should_notify). True therefore means: the device may
    /// already have moved past the new `used_event` before it saw it, and
    /// then it will not interrupt for this queue again until the driver
    /// consumes what is waiting and re-arms; the caller must consume it
    /// itself or arrange to be called again. False means the device saw
    /// the new `used_event` before it published anything more, so its
    /// next completion interrupts.
    pub fn enable_interrupts(&mut self) -> bool {
        if self.event_idx {
            let off = self.layout.used_event();
            self.mem.write_u16(off, self.last_used);
            self.mem.sync_for_device(off, 2);
        } else {
            let off = self.layout.avail_flags();
            self.mem.write_u16(off, 0);
            self.mem.sync_for_device(off, 2);
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Asks the device not to interrupt for this queue (a hint, §2.7.10).
    pub fn disable_interrupts(&mut self) {
        if self.event_idx {
            // Point used_event as far back as possible: the device only
            // interrupts when its index crosses it.
            let off = self.layout.used_event();
            self.mem
                .write_u16(off, self.last_used.wrapping_sub(1).wrapping_add(0x8000));
            self.mem.sync_for_device(off, 2);
        } else {
            let off = self.layout.avail_flags();
            self.mem.write_u16(off, AVAIL_F_NO_INTERRUPT);
            self.mem.sync_for_device(off, 2);
        }
    }

    /// The token of outstanding chain `head`.
    pub fn token_mut(&mut self, head: u16) -> Option<&mut T> {
        match self.heads.get_mut(usize::from(head))? {
            HeadSlot::Outstanding(h) => Some(&mut h.token),
            HeadSlot::Never | HeadSlot::Returned => None,
        }
    }

    /// Visits every outstanding chain's token (for timeout scans).
    pub fn for_each_outstanding(&mut self, mut f: impl FnMut(u16, &mut T)) {
        for (i, h) in self.heads.iter_mut().enumerate() {
            if let HeadSlot::Outstanding(h) = h {
                f(i as u16, &mut h.token);
            }
        }
    }

    /// Takes back every outstanding chain after the device was reset (it
    /// will never return them) and returns the ring to its initial state.
    /// `f` receives each token.
    pub fn reclaim_all(&mut self, mut f: impl FnMut(T)) {
        for h in self.heads.iter_mut() {
            // A reset device remembers nothing: nothing it returns from
            // now on can be a repeat.
            if let HeadSlot::Outstanding(h) = core::mem::replace(h, HeadSlot::Never) {
                f(h.token);
            }
        }
        let n = usize::from(self.layout.size);
        for (i, d) in self.shadow.iter_mut().enumerate() {
            *d = Desc {
                next: ((i + 1) % n) as u16,
                ..Desc::default()
            };
        }
        self.free_head = 0;
        self.num_free = self.layout.size;
        self.avail_idx = 0;
        self.published_idx = 0;
        self.notified_idx = 0;
        self.last_used = 0;
        self.used_seen = 0;
        self.waiting_mark = None;
        let zeros = [0u8; 64];
        let mut off = 0;
        while off < self.layout.total {
            let n = zeros.len().min(self.layout.total - off);
            self.mem.write_bytes(off, &zeros[..n]);
            off += n;
        }
        self.mem.sync_for_device(0, self.layout.total);
    }
}

/// A chain being written (see [`SplitQueue::begin_chain`]).
pub struct ChainWriter<'a, M: SharedMem, T> {
    q: &'a mut SplitQueue<M, T>,
    head: u16,
    want: usize,
    pushed: usize,
    writable: u64,
    seen_writable: bool,
    committed: bool,
}

impl<M: SharedMem, T> ChainWriter<'_, M, T> {
    /// Writes the next segment.
    pub fn push(&mut self, seg: Segment) -> Result<(), AddError> {
        if self.pushed == self.want || (self.seen_writable && !seg.device_writes) {
            return Err(AddError::Invalid);
        }
        self.seen_writable |= seg.device_writes;
        let i = self.q.take_free();
        self.pushed += 1;
        let last = self.pushed == self.want;
        let mut flags = if seg.device_writes { DESC_F_WRITE } else { 0 };
        if !last {
            flags |= DESC_F_NEXT;
        }
        // Descriptors come off the free list in order, so the next one is
        // known before it is taken.
        let next = if last { 0 } else { self.q.free_head };
        self.q.write_desc(
            i,
            Desc {
                addr: seg.addr,
                len: seg.len,
                flags,
                next,
            },
        );
        if seg.device_writes {
            self.writable += u64::from(seg.len);
        }
        Ok(())
    }

    /// Makes the chain available with `token`; returns its head. On error
    /// (fewer segments pushed than reserved) the token comes back.
    pub fn commit(mut self, token: T) -> Result<u16, (T, AddError)> {
        if self.pushed != self.want {
            return Err((token, AddError::Invalid));
        }
        self.committed = true;
        self.q
            .put_avail(self.head, token, self.want as u16, self.writable);
        Ok(self.head)
    }
}

impl<M: SharedMem, T> Drop for ChainWriter<'_, M, T> {
    fn drop(&mut self) {
        if !self.committed && self.pushed > 0 {
            self.q.free_chain(self.head, self.pushed as u16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hba::io::{AfterPass, REAP_PASSES, ReapPasses};
    use crate::shmem::host::HostMem;
    use proptest::prelude::*;
    use std::collections::{HashMap, VecDeque};
    use std::vec;
    use std::vec::Vec;

    /// A chain as the device sees it: head index and (address, length,
    /// device-writes) of each buffer.
    type DeviceChain = (u16, Vec<(u64, u32, bool)>);

    /// The device side of a split queue, reading the same host memory.
    struct FakeDevice {
        layout: Layout,
        last_avail: u16,
        used_idx: u16,
        event_idx: bool,
    }

    impl FakeDevice {
        fn new(size: u16, event_idx: bool) -> Self {
            Self {
                layout: Layout::new(size).unwrap(),
                last_avail: 0,
                used_idx: 0,
                event_idx,
            }
        }

        /// Takes every newly available chain: (head, [(addr, len, writes)]).
        fn take_avail(&mut self, mem: &HostMem) -> Vec<DeviceChain> {
            let idx = mem.read_u16(self.layout.avail_idx());
            let mut out = Vec::new();
            while self.last_avail != idx {
                let slot = self.last_avail & (self.layout.size - 1);
                let head = mem.read_u16(self.layout.avail_slot(slot));
                let mut segs = Vec::new();
                let mut i = head;
                for _ in 0..self.layout.size {
                    let off = self.layout.desc(i);
                    let flags = mem.read_u16(off + 12);
                    segs.push((
                        mem.read_u64(off),
                        mem.read_u32(off + 8),
                        flags & DESC_F_WRITE != 0,
                    ));
                    if flags & DESC_F_NEXT == 0 {
                        break;
                    }
                    i = mem.read_u16(off + 14);
                }
                out.push((head, segs));
                self.last_avail = self.last_avail.wrapping_add(1);
            }
            if self.event_idx {
                mem.write_u16(self.layout.avail_event(), self.last_avail);
            }
            out
        }

        fn complete(&mut self, mem: &HostMem, id: u32, len: u32) {
            let slot = self.used_idx & (self.layout.size - 1);
            let off = self.layout.used_slot(slot);
            mem.write_u32(off, id);
            mem.write_u32(off + 4, len);
            self.used_idx = self.used_idx.wrapping_add(1);
            mem.write_u16(self.layout.used_idx(), self.used_idx);
        }
    }

    fn queue(size: u16, event_idx: bool) -> SplitQueue<HostMem, u32> {
        let layout = Layout::new(size).unwrap();
        SplitQueue::new(HostMem::new(layout.total, 0x10_0000), size, event_idx).unwrap()
    }

    fn seg(addr: u64, len: u32, device_writes: bool) -> Segment {
        Segment {
            addr,
            len,
            device_writes,
        }
    }

    #[test]
    fn layout_matches_the_legacy_formula() {
        // virtio 1.2 section 2.7.2: for 256 entries, 4096 bytes of
        // descriptors, 518 of avail, used at the next 4096 boundary.
        let l = Layout::new(256).unwrap();
        assert_eq!((l.avail, l.used, l.total), (4096, 8192, 8192 + 6 + 8 * 256));
        assert!(Layout::new(0).is_none());
        assert!(Layout::new(100).is_none());
        assert!(Layout::new(65535).is_none());
        assert!(Layout::new(32768).is_some());
    }

    #[test]
    fn chain_round_trip_and_free_list() {
        let mut q = queue(8, false);
        let mut dev = FakeDevice::new(8, false);
        let h = q
            .add_chain(
                [
                    seg(0x1000, 51, false),
                    seg(0x2000, 108, true),
                    seg(0x3000, 4096, true),
                ],
                7,
            )
            .unwrap();
        assert_eq!(q.num_free(), 5);
        assert!(q.publish(), "without NO_NOTIFY the device wants a kick");
        let avail = dev.take_avail(q.mem());
        assert_eq!(
            avail,
            vec![(
                h,
                vec![
                    (0x1000, 51, false),
                    (0x2000, 108, true),
                    (0x3000, 4096, true)
                ]
            )]
        );
        dev.complete(q.mem(), u32::from(h), 108 + 512);
        let u = q.pop_used().unwrap().unwrap();
        assert_eq!(
            u,
            Used {
                token: 7,
                len: 620,
                len_clamped: false
            }
        );
        assert_eq!(q.num_free(), 8);
        assert!(q.pop_used().is_none());
    }

    #[test]
    fn rejects_impossible_chains() {
        let mut q = queue(4, false);
        assert_eq!(q.add_chain([], 1), Err((1, AddError::Invalid)));
        assert_eq!(
            q.add_chain([seg(1, 1, true), seg(2, 1, false)], 1),
            Err((1, AddError::Invalid))
        );
        let five = [seg(1, 1, false); 5];
        assert_eq!(q.add_chain(five, 1), Err((1, AddError::Invalid)));
        q.add_chain([seg(1, 1, false); 3], 1).unwrap();
        assert_eq!(
            q.add_chain([seg(1, 1, false); 2], 2),
            Err((2, AddError::Full))
        );
        assert_eq!(q.add_indirect(0x5000, 0, 0, 3), Err((3, AddError::Invalid)));
        assert_eq!(q.add_indirect(0x5000, 5, 0, 3), Err((3, AddError::Invalid)));
        q.add_indirect(0x5000, 4, 100, 3).unwrap();
        assert_eq!(q.add_indirect(0x6000, 2, 0, 4), Err((4, AddError::Full)));
    }

    #[test]
    fn abandoned_chains_give_their_descriptors_back() {
        let mut q = queue(8, false);
        {
            let mut w = q.begin_chain(3).unwrap();
            w.push(seg(1, 1, false)).unwrap();
            w.push(seg(2, 1, true)).unwrap();
            assert_eq!(
                w.push(seg(3, 1, false)),
                Err(AddError::Invalid),
                "readable after writable"
            );
        }
        assert_eq!(q.num_free(), 8);
        let mut w = q.begin_chain(2).unwrap();
        w.push(seg(1, 1, false)).unwrap();
        assert_eq!(
            w.commit(9),
            Err((9, AddError::Invalid)),
            "fewer segments than reserved"
        );
        assert_eq!(q.num_free(), 8);
        // The free list is intact: the whole ring can still be used.
        for t in 0..8 {
            q.add_chain([seg(1, 1, false)], t).unwrap();
        }
        assert_eq!(q.num_free(), 0);
    }

    #[test]
    fn hostile_used_entries_never_reach_driver_memory() {
        let mut q = queue(8, false);
        let mut dev = FakeDevice::new(8, false);
        let h = q.add_indirect(0x9000, 3, 100, 42).unwrap();
        q.publish();
        dev.take_avail(q.mem());
        // An id out of range, then one that was never made available.
        dev.complete(q.mem(), 1000, 0);
        assert_eq!(q.pop_used(), Some(Err(UsedError::UnknownId { id: 1000 })));
        dev.complete(q.mem(), 5, 0);
        assert_eq!(q.pop_used(), Some(Err(UsedError::UnknownId { id: 5 })));
        assert_eq!(q.outstanding(), 1, "a bogus id completes nothing");
        // Claiming more than the chain offered: clamped.
        dev.complete(q.mem(), u32::from(h), 1 << 30);
        assert_eq!(
            q.pop_used(),
            Some(Ok(Used {
                token: 42,
                len: 100,
                len_clamped: true
            }))
        );
        // The same id again: a duplicate completion is dropped.
        dev.complete(q.mem(), u32::from(h), 1);
        assert_eq!(
            q.pop_used(),
            Some(Err(UsedError::AlreadyReturned { id: u32::from(h) }))
        );
        assert_eq!(q.num_free(), 8);
        // The used index jumping past what is outstanding.
        assert_eq!(q.add_indirect(0x9000, 3, 100, 43), Ok(h), "LIFO reuse");
        q.publish();
        q.mem().write_u16(
            Layout::new(8).unwrap().used_idx(),
            dev.used_idx.wrapping_add(9),
        );
        assert!(matches!(
            q.pop_used(),
            Some(Err(UsedError::IndexRunaway { .. }))
        ));
        assert_eq!(q.outstanding(), 1, "a runaway index consumes nothing");
    }

    #[test]
    fn a_head_made_available_again_completes_and_a_reset_forgets_returns() {
        let mut q = queue(8, false);
        let mut dev = FakeDevice::new(8, false);
        let h = q.add_indirect(0x9000, 1, 0, 1).unwrap();
        q.publish();
        dev.take_avail(q.mem());
        dev.complete(q.mem(), u32::from(h), 0);
        assert!(matches!(q.pop_used(), Some(Ok(Used { token: 1, .. }))));
        // Reused at the same head: the next return of `h` is the new
        // chain's, not a duplicate.
        assert_eq!(q.add_indirect(0x9000, 1, 0, 2), Ok(h));
        q.publish();
        dev.take_avail(q.mem());
        dev.complete(q.mem(), u32::from(h), 0);
        assert!(matches!(q.pop_used(), Some(Ok(Used { token: 2, .. }))));
        assert_eq!(q.token_mut(h), None, "returned: no token");
        // After a reset the device remembers nothing: `h` names nothing
        // it can repeat.
        let other = q.add_indirect(0x9000, 1, 0, 3).unwrap();
        q.reclaim_all(|_| {});
        let mut dev = FakeDevice::new(8, false);
        dev.complete(q.mem(), u32::from(h), 0);
        assert_eq!(
            q.pop_used(),
            Some(Err(UsedError::UnknownId { id: u32::from(h) }))
        );
        dev.complete(q.mem(), u32::from(other), 0);
        assert_eq!(
            q.pop_used(),
            Some(Err(UsedError::UnknownId {
                id: u32::from(other)
            }))
        );
    }

    #[test]
    fn event_idx_suppresses_notifications_until_asked() {
        let mut q = queue(16, true);
        let mut dev = FakeDevice::new(16, true);
        let l = Layout::new(16).unwrap();
        // The device asks to be told at index 0: the first publish kicks.
        q.add_indirect(0x1000, 2, 0, 1).unwrap();
        assert!(q.publish());
        dev.take_avail(q.mem()); // avail_event := 1
        // The device has not yet asked about index 2: no kick for it...
        q.mem().write_u16(l.avail_event(), 2);
        q.add_indirect(0x1000, 2, 0, 2).unwrap();
        assert!(!q.publish());
        // ...but the next one crosses avail_event == 2.
        q.add_indirect(0x1000, 2, 0, 3).unwrap();
        assert!(q.publish());
        // Without EVENT_IDX, NO_NOTIFY suppresses.
        let mut q = queue(16, false);
        q.mem().write_u16(l.used_flags(), USED_F_NO_NOTIFY);
        q.add_indirect(0x1000, 2, 0, 1).unwrap();
        assert!(!q.publish());
    }

    #[test]
    fn one_notification_decision_covers_every_chain_exposed_since_the_last() {
        let mut q = queue(16, true);
        let mut dev = FakeDevice::new(16, true);
        let l = Layout::new(16).unwrap();
        assert!(!q.notify_needed(), "nothing exposed, nothing to tell");
        // Three chains exposed one by one, decided once: avail_event (1)
        // lies among them, so one notification covers them all.
        q.mem().write_u16(l.avail_event(), 1);
        for i in 0..3 {
            q.add_indirect(0x1000, 2, 0, i).unwrap();
            assert!(q.expose());
            assert_eq!(
                q.mem().read_u16(l.avail_idx()),
                i as u16 + 1,
                "visible at once"
            );
        }
        assert!(!q.expose(), "nothing new");
        assert!(q.notify_needed());
        assert!(!q.notify_needed(), "decided already");
        assert_eq!(dev.take_avail(q.mem()).len(), 3);
        // The device asks about index 9: a batch ending at 5 does not
        // reach it, one ending at 10 does.
        q.mem().write_u16(l.avail_event(), 9);
        for i in 3..5 {
            q.add_indirect(0x1000, 2, 0, i).unwrap();
            q.expose();
        }
        assert!(!q.notify_needed());
        for i in 5..10 {
            q.add_indirect(0x1000, 2, 0, i).unwrap();
            q.expose();
        }
        assert!(q.notify_needed());
        // Without EVENT_IDX: NO_NOTIFY clear asks for one per batch, and
        // never for an empty one.
        let mut q = queue(16, false);
        q.add_indirect(0x1000, 2, 0, 1).unwrap();
        q.add_indirect(0x1000, 2, 0, 2).unwrap();
        assert!(q.expose());
        assert!(q.notify_needed());
        assert!(!q.notify_needed(), "an empty batch needs none");
    }

    #[test]
    fn enable_interrupts_reports_a_race() {
        let mut q = queue(8, true);
        let mut dev = FakeDevice::new(8, true);
        let h = q.add_indirect(0x1000, 2, 0, 1).unwrap();
        q.publish();
        dev.take_avail(q.mem());
        assert!(!q.enable_interrupts());
        assert_eq!(q.mem().read_u16(Layout::new(8).unwrap().used_event()), 0);
        dev.complete(q.mem(), u32::from(h), 0);
        assert!(
            q.enable_interrupts(),
            "a completion arrived before interrupts were re-armed"
        );
    }

    /// The device side with QEMU's notification rules (hw/virtio/virtio.c:
    /// virtqueue_split_flush and virtio_split_should_notify): a decision
    /// after every completion; with EVENT_IDX the first decision after
    /// reset always notifies, later ones iff `used_event` lies in
    /// [previous decision's used index, used index), mod 2^16.
    struct QemuDevice {
        dev: FakeDevice,
        signalled_used: u16,
        signalled_used_valid: bool,
    }

    impl QemuDevice {
        fn new(size: u16, event_idx: bool) -> Self {
            Self {
                dev: FakeDevice::new(size, event_idx),
                signalled_used: 0,
                signalled_used_valid: false,
            }
        }

        /// Publishes one completion; whether it interrupts.
        fn complete(&mut self, mem: &HostMem, id: u32) -> bool {
            let old = self.dev.used_idx;
            self.dev.complete(mem, id, 0);
            let new = self.dev.used_idx;
            if i32::from(new.wrapping_sub(self.signalled_used) as i16)
                < i32::from(new.wrapping_sub(old))
            {
                self.signalled_used_valid = false;
            }
            if !self.dev.event_idx {
                return mem.read_u16(self.dev.layout.avail_flags()) & AVAIL_F_NO_INTERRUPT == 0;
            }
            let valid = self.signalled_used_valid;
            self.signalled_used_valid = true;
            let before = self.signalled_used;
            self.signalled_used = new;
            let used_event = mem.read_u16(self.dev.layout.used_event());
            !valid || need_event(used_event, new, before)
        }
    }

    #[test]
    fn a_rearm_that_finds_more_leaves_the_device_silent_until_the_driver_catches_up() {
        let mut q = queue(8, true);
        let mut dev = QemuDevice::new(8, true);
        let mut heads = Vec::new();
        for t in 0..4 {
            heads.push(q.add_indirect(0x1000, 2, 0, t).unwrap());
        }
        q.publish();
        dev.dev.take_avail(q.mem());
        assert!(!q.enable_interrupts(), "nothing yet");
        assert!(dev.complete(q.mem(), u32::from(heads[0])), "first decision");
        assert!(q.pop_used().is_some());
        assert!(q.pop_used().is_none(), "the driver's last look: empty");
        // A completion lands after that look, before the re-arm: the
        // device still sees used_event 0, behind [1, 2): no interrupt.
        assert!(!dev.complete(q.mem(), u32::from(heads[1])));
        assert!(q.enable_interrupts(), "the re-check finds it");
        // The driver stops here (out of passes). The device is past
        // used_event (1) already: its later completions never interrupt.
        assert!(!dev.complete(q.mem(), u32::from(heads[2])));
        assert!(!dev.complete(q.mem(), u32::from(heads[3])));
        // Catching up and re-arming where the device is restores it.
        let mut n = 0;
        while q.pop_used().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(!q.enable_interrupts());
        let h = q.add_indirect(0x1000, 2, 0, 9).unwrap();
        q.publish();
        dev.dev.take_avail(q.mem());
        assert!(
            dev.complete(q.mem(), u32::from(h)),
            "used_event 4 lies in [4, 5)"
        );
    }

    #[test]
    fn a_watchdog_look_reports_only_what_waited_a_whole_interval() {
        let mut q = queue(8, true);
        let mut dev = FakeDevice::new(8, true);
        assert!(!q.used_waiting_since_last_look());
        let a = q.add_indirect(0x1000, 2, 0, 1).unwrap();
        let b = q.add_indirect(0x1000, 2, 0, 2).unwrap();
        q.publish();
        dev.take_avail(q.mem());
        dev.complete(q.mem(), u32::from(a), 0);
        assert!(!q.used_waiting_since_last_look(), "first seen: marked");
        assert!(q.used_waiting_since_last_look(), "still waiting, untouched");
        // Consumption between two looks is progress, even with more waiting.
        dev.complete(q.mem(), u32::from(b), 0);
        assert!(q.pop_used().is_some());
        assert!(!q.used_waiting_since_last_look());
        assert!(q.used_waiting_since_last_look());
        assert!(q.pop_used().is_some());
        assert!(!q.used_waiting_since_last_look(), "nothing waiting");
        assert!(!q.used_waiting_since_last_look());
    }

    /// The re-arm discipline of a bounded reap run against a device that
    /// completes at any point, the re-arm window included, with QEMU's
    /// notification rules. Each reap makes passes of "consume all,
    /// re-arm, re-check" on this ring and decides after each pass with the
    /// driver's own rule (`io::ReapPasses`, which `VioScsi::reap_as` runs
    /// with `REAP_PASSES`); on `HandOff` another reap comes later, as the
    /// work task does for the queue (`hand_off: false` is a driver that
    /// drops it instead). What this does not run is the rest of `reap_as`
    /// (locks, completion to the target drivers, the work task itself):
    /// test/sim/tests/async_device.rs runs that against the emulated
    /// device. Returns the completions left waiting once the run has
    /// settled (no interrupt, no hand-off pending, nothing at the device),
    /// the stall; None if it did not settle within its bound.
    fn stranded_after_random_run(
        seed: u64,
        event_idx: bool,
        passes: u32,
        hand_off: bool,
    ) -> Option<usize> {
        let size = 16u16;
        let mut q = queue(size, event_idx);
        let mut dev = QemuDevice::new(size, event_idx);
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut at_device: VecDeque<u16> = VecDeque::new();
        let mut irq = false;
        let mut handed_off = false;
        let mut token = 0u32;
        q.enable_interrupts();
        let submit = |q: &mut SplitQueue<HostMem, u32>,
                      dev: &mut QemuDevice,
                      at_device: &mut VecDeque<u16>,
                      token: &mut u32| {
            while q.num_free() > 0 {
                q.add_indirect(0x1000, 2, 0, *token).unwrap();
                *token += 1;
            }
            q.publish();
            for (h, _) in dev.dev.take_avail(q.mem()) {
                at_device.push_back(h);
            }
        };
        submit(&mut q, &mut dev, &mut at_device, &mut token);
        for round in 0..4000u32 {
            let draining = round >= 3000;
            let r = next() % 4;
            if r < 2 && !at_device.is_empty() {
                let h = at_device.pop_front().unwrap();
                irq |= dev.complete(q.mem(), u32::from(h));
                continue;
            }
            if !(irq || handed_off) {
                if draining && at_device.is_empty() {
                    break;
                }
                continue;
            }
            // An interrupt (or the hand-off's task) runs the reap.
            irq = false;
            handed_off = false;
            let mut budget = ReapPasses::new(passes);
            let mut passes_run = 0;
            loop {
                passes_run += 1;
                assert!(passes_run <= passes.max(1), "the pass budget bounds a reap");
                loop {
                    // The device may complete between any two looks.
                    if next() % 3 == 0 && !at_device.is_empty() {
                        let h = at_device.pop_front().unwrap();
                        irq |= dev.complete(q.mem(), u32::from(h));
                    }
                    match q.pop_used() {
                        Some(u) => assert!(u.is_ok()),
                        None => break,
                    }
                }
                // The window: after the last look, before the re-arm.
                while next() % 2 == 0 && !at_device.is_empty() {
                    let h = at_device.pop_front().unwrap();
                    irq |= dev.complete(q.mem(), u32::from(h));
                }
                match budget.after_pass(q.enable_interrupts()) {
                    AfterPass::Settled => break,
                    AfterPass::Again => {}
                    AfterPass::HandOff => {
                        handed_off = hand_off;
                        break;
                    }
                }
            }
            if !draining {
                submit(&mut q, &mut dev, &mut at_device, &mut token);
            }
        }
        // Settled: no interrupt and no hand-off pending, nothing left to
        // complete.
        if irq || handed_off || !at_device.is_empty() {
            return None;
        }
        let mut left = 0;
        while q.pop_used().is_some() {
            left += 1;
        }
        Some(left)
    }

    /// Every run of `runs` settles (a run that does not would prove
    /// nothing); how many stranded completions.
    fn stalls_over(
        seeds: core::ops::Range<u64>,
        event_idx: bool,
        passes: u32,
        hand_off: bool,
    ) -> usize {
        let mut stalls = 0;
        for seed in seeds {
            match stranded_after_random_run(seed, event_idx, passes, hand_off) {
                Some(left) => stalls += usize::from(left > 0),
                None => panic!("seed {seed} did not settle within its bound: no verdict"),
            }
        }
        stalls
    }

    #[test]
    fn without_the_hand_off_a_bounded_reap_strands_completions() {
        let stalls = stalls_over(1..200, true, REAP_PASSES, false);
        assert!(stalls > 0, "the adversarial schedule strands completions");
    }

    #[test]
    fn the_drivers_pass_budget_with_its_hand_off_strands_nothing() {
        assert_eq!(stalls_over(1..200, true, REAP_PASSES, true), 0);
        assert_eq!(stalls_over(1..200, false, REAP_PASSES, true), 0);
    }

    #[test]
    fn a_reap_budget_allows_exactly_its_passes() {
        for passes in 0..6u32 {
            let mut b = ReapPasses::new(passes);
            let again = (0..10)
                .take_while(|_| b.after_pass(true) == AfterPass::Again)
                .count();
            assert_eq!(again as u32, passes.max(1) - 1);
            assert_eq!(
                ReapPasses::new(passes).after_pass(false),
                AfterPass::Settled
            );
        }
    }

    #[test]
    fn reclaim_all_returns_every_outstanding_token() {
        let mut q = queue(8, false);
        for t in 0..5 {
            q.add_chain([seg(1, 1, false)], t).unwrap();
        }
        q.publish();
        let mut got = Vec::new();
        q.reclaim_all(|t| got.push(t));
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!((q.num_free(), q.outstanding()), (8, 0));
    }

    proptest! {
        /// need_event is "event lies in [old, new)" modulo 2^16, for every
        /// position of the three indices around the wrap.
        #[test]
        fn need_event_is_wrap_safe(old: u16, step in 0u16..=u16::MAX, event: u16) {
            let new = old.wrapping_add(step);
            let expected = event.wrapping_sub(old) < new.wrapping_sub(old);
            prop_assert_eq!(need_event(event, new, old), expected);
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// With the hand-off, a bounded reap never leaves a completion
        /// without an interrupt or a reap to come, whatever the device's
        /// timing, with or without EVENT_IDX, for any number of passes.
        #[test]
        fn a_bounded_reap_with_hand_off_strands_nothing(
            seed: u64,
            event_idx: bool,
            passes in 1u32..6,
        ) {
            prop_assert_eq!(stranded_after_random_run(seed, event_idx, passes, true), Some(0));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]
        /// Many chains of random shapes, completed in random order across
        /// several 16-bit index wraps: every token comes back exactly once
        /// with its length, and the free count always balances.
        #[test]
        fn ring_survives_index_wraparound(
            size_log in 1u32..6,
            seed in any::<u64>(),
            event_idx: bool,
        ) {
            let size = 1u16 << size_log;
            let mut q = queue(size, event_idx);
            let mut dev = FakeDevice::new(size, event_idx);
            let mut rng = seed;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut in_flight: HashMap<u16, (u32, u32)> = HashMap::new();
            let mut device_q: VecDeque<(u16, u32)> = VecDeque::new();
            let mut returned = 0u32;
            let mut token = 0u32;
            // Enough operations to wrap the 16-bit indices more than once.
            while returned < 70_000 {
                let r = next();
                if r % 3 != 0 && q.num_free() > 0 {
                    let n = 1 + (next() % u64::from(q.num_free().min(4))) as usize;
                    let writable = (next() % 5000) as u32;
                    let mut segs = vec![seg(0x1000, 64, false); n];
                    segs[n - 1] = seg(0x2000, writable, true);
                    let head = if n == 1 && r % 2 == 0 {
                        q.add_indirect(0x3000, 2, u64::from(writable), token).unwrap()
                    } else {
                        q.add_chain(segs.iter().copied(), token).unwrap()
                    };
                    in_flight.insert(head, (token, writable));
                    token = token.wrapping_add(1);
                    q.publish();
                    for (h, _) in dev.take_avail(q.mem()) {
                        device_q.push_back((h, in_flight[&h].1));
                    }
                } else if !device_q.is_empty() {
                    let pick = (next() % device_q.len() as u64) as usize;
                    let (h, w) = device_q.remove(pick).unwrap();
                    dev.complete(q.mem(), u32::from(h), w);
                    let u = q.pop_used().unwrap().unwrap();
                    let (t, wl) = in_flight.remove(&h).unwrap();
                    prop_assert_eq!(u, Used { token: t, len: wl, len_clamped: false });
                    returned += 1;
                }
                let held: usize = in_flight.len();
                prop_assert!(usize::from(q.num_free()) + held <= usize::from(size));
                prop_assert_eq!(q.outstanding(), held);
            }
        }
    }
}
