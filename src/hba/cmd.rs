//! Per-command state: what the packet constructor preallocates in the HBA
//! private area of every `scsi_pkt` (`tran_hba_len` bytes at
//! `pkt_ha_private`): the fields every SCSA HBA keeps for a command, and
//! the device family's own part (`X`: its DMA memory for request headers,
//! responses, SG lists, and what it decodes a completion from).
//!
//! # Ownership
//!
//! A [`Cmd`] has exactly one owner at a time, represented by an
//! [`OwnedCmd`] token (neither `Copy` nor `Clone`); only the token gives
//! access to the command's fields. The state word, readable by anyone,
//! says where the token is ([`CmdState`]):
//! - `Idle`: nobody in the HBA holds it; [`OwnedCmd::claim`] takes it
//!   (tran_start, setup, teardown);
//! - `Queued`: in the ring of request queue `queue`, under that queue's
//!   lock (the watchdog and the abort path look at it there);
//! - `Done`: a polled command completed; its poller takes the token back
//!   with [`OwnedCmd::reclaim_done`].
//!
//! A completer ends its ownership by storing `Idle` (then completes the
//! packet) or `Done`.

use crate::scsa::PktStatistics;
use crate::scsa::addr::LunNumber;
use crate::scsa::flags::DataDir;
use crate::scsa::pkt::Pkt;
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, Ordering};

/// Where a command's token is (the state word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CmdState {
    /// Not in flight.
    Idle = 0,
    /// Owned by a thread of the HBA (being prepared, or just completed).
    Owned = 1,
    /// In a ring.
    Queued = 2,
    /// A polled command completed; its poller takes it back.
    Done = 3,
}

impl CmdState {
    fn from_word(w: u8) -> CmdState {
        match w {
            0 => CmdState::Idle,
            1 => CmdState::Owned,
            2 => CmdState::Queued,
            _ => CmdState::Done,
        }
    }
}

/// Marks constructed commands.
const MAGIC: u64 = 0x7276_7363_7369_0001;

/// The fields of a command, reached only through its [`OwnedCmd`].
pub struct CmdFields<X> {
    /// The packet while the HBA owns it; `None` for internal commands and
    /// between uses.
    pub pkt: Option<Pkt>,
    /// Completion is polled (FLAG_NOINTR or internal).
    pub polled: bool,
    /// Index of the request queue it went to.
    pub queue: u16,
    /// Its slot in that queue's ring (the family's name for it: a
    /// virtqueue head descriptor, a pvscsi context slot).
    pub slot: u16,
    /// Unique per start (never reused): names it to the device for an
    /// abort, and tells a slot's new command from an old one.
    pub tag: u64,
    /// Target.
    pub target: u8,
    /// LUN.
    pub lun: LunNumber,
    /// Tick after which it has timed out; 0: never.
    pub deadline: i64,
    /// The watchdog found it past its deadline.
    pub timed_out: bool,
    /// Statistics bits of the recovery steps taken for it.
    pub recovery: PktStatistics,
    /// Data bytes of this transfer.
    pub xfer: usize,
    /// Data direction.
    pub dir: DataDir,
    /// Taken back by a device reset, its completion parked for a reaper
    /// that holds no driver lock.
    pub reset_forced: bool,
    /// Its packet was torn down while it was in flight: when it comes
    /// back it is simply idle again.
    pub abandoned: bool,
    /// The device family's part.
    pub dev: X,
    /// Link of a [`CmdList`].
    next: Option<OwnedCmd<X>>,
}

impl<X> CmdFields<X> {
    /// Clears what a previous use left behind (the family's part is the
    /// family's to clear, in its `prepare`).
    pub fn reset_for_start(&mut self) {
        self.timed_out = false;
        self.recovery = PktStatistics::empty();
        self.reset_forced = false;
        self.abandoned = false;
        self.next = None;
    }
}

/// The per-command state in the HBA private area of a packet (or, for
/// internal commands, in a heap box).
#[repr(C)]
pub struct Cmd<X> {
    magic: u64,
    state: AtomicU8,
    fields: UnsafeCell<CmdFields<X>>,
}

// SAFETY: `fields` is only reached through the unique OwnedCmd token;
// `state` is atomic; `magic` is written only by the constructor and
// destructor, which have exclusive access. `X: Send` because the token
// (and with it the family's part) moves between threads.
unsafe impl<X: Send> Sync for Cmd<X> {}
// SAFETY: a Cmd holds no thread-bound state of its own (no guard, no
// thread id); the family's part is Send; the kmem cache may run the
// constructor and the destructor on different threads.
unsafe impl<X: Send> Send for Cmd<X> {}

impl<X> Cmd<X> {
    // The framework aligns the HBA private area to 8 bytes (the packet
    // cache is created with alignment 8), so the command must not need
    // more; `Cmd::from_raw` reads the magic word at the start of the area.
    const LAYOUT_OK: () = {
        assert!(core::mem::align_of::<Cmd<X>>() <= 8);
        assert!(core::mem::offset_of!(Cmd<X>, magic) == 0);
    };

    /// A command around the family's part `dev`.
    pub fn new(dev: X) -> Cmd<X> {
        let () = Self::LAYOUT_OK;
        Cmd {
            magic: MAGIC,
            state: AtomicU8::new(CmdState::Idle as u8),
            fields: UnsafeCell::new(CmdFields {
                pkt: None,
                polled: false,
                queue: 0,
                slot: 0,
                tag: 0,
                target: 0,
                lun: LunNumber::ZERO,
                deadline: 0,
                timed_out: false,
                recovery: PktStatistics::empty(),
                xfer: 0,
                dir: DataDir::None,
                reset_forced: false,
                abandoned: false,
                dev,
                next: None,
            }),
        }
    }

    /// Whether this was made by [`Cmd::new`] and not yet destroyed.
    pub fn is_valid(&self) -> bool {
        self.magic == MAGIC
    }

    /// The command at `p`, if the magic word there says it is a live one.
    /// The word is read first, through the raw pointer, and only then is a
    /// `&Cmd` formed: a reference asserts that a valid `Cmd` is there, so
    /// it must not come before the check. Cheap: one aligned load and a
    /// compare, for the I/O path.
    ///
    /// The magic word is a corruption check (a destroyed command, a stray
    /// pointer into a packet of ours), not a validation of arbitrary
    /// memory: soundness comes from the caller's promise below, that `p`
    /// is the HBA private area of a packet of our cache (entry.rs
    /// `cmd_of_pkt`), which our constructor initialized.
    ///
    /// # Safety
    /// `p` must be null or point at `size_of::<Cmd<X>>()` initialized
    /// bytes (a packet's HBA private area, which the framework allocates
    /// with the packet and our constructor fills, for this HBA's family)
    /// that stay allocated for `'a`, and a live command there must stay
    /// alive for `'a` (our destructor runs only when the framework
    /// destroys the packet).
    pub unsafe fn from_raw<'a>(p: *const Cmd<X>) -> Option<&'a Cmd<X>> {
        if p.is_null() || !p.is_aligned() {
            return None;
        }
        // SAFETY: `p` is aligned (checked) and points at initialized
        // readable bytes (caller); `magic` is at offset 0 (LAYOUT_OK).
        // `addr_of!` forms no reference. No data race: our destructor
        // (which writes `magic = 0`) runs only when the framework frees the
        // packet, and kmem gives each object to one owner at a time
        // (kmem_cache_alloc(9F) hands an object out once until
        // kmem_cache_free), so it cannot run while the packet's owner calls
        // an entry point with it.
        let magic = unsafe { core::ptr::addr_of!((*p).magic).read() };
        if magic != MAGIC {
            return None;
        }
        // SAFETY: the magic says our constructor made a `Cmd` here and our
        // destructor (which clears it) has not run; it lives for 'a (caller).
        Some(unsafe { &*p })
    }

    /// The state word.
    pub fn state(&self) -> CmdState {
        CmdState::from_word(self.state.load(Ordering::Acquire))
    }
}

impl<X> Drop for Cmd<X> {
    fn drop(&mut self) {
        // A destroyed command can never be mistaken for a live one.
        self.magic = 0;
    }
}

/// The unique right to use a [`Cmd`]'s fields.
#[derive(Debug, PartialEq, Eq)]
pub struct OwnedCmd<X>(NonNull<Cmd<X>>);

// SAFETY: the token moves between threads (submitter, ring, completer);
// exclusivity is what it encodes, and the fields it reaches are Send.
unsafe impl<X: Send> Send for OwnedCmd<X> {}

impl<X> OwnedCmd<X> {
    /// Takes an `Idle` command; `None` if someone owns it (a packet
    /// started twice, or torn down while in flight).
    pub fn claim(cmd: &Cmd<X>) -> Option<OwnedCmd<X>> {
        Self::take(cmd, CmdState::Idle)
    }

    /// Takes back a polled command its completer marked `Done`.
    pub fn reclaim_done(cmd: &Cmd<X>) -> Option<OwnedCmd<X>> {
        Self::take(cmd, CmdState::Done)
    }

    fn take(cmd: &Cmd<X>, from: CmdState) -> Option<OwnedCmd<X>> {
        cmd.state
            .compare_exchange(
                from as u8,
                CmdState::Owned as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .ok()?;
        Some(OwnedCmd(NonNull::from(cmd)))
    }

    /// The command (state word, identity).
    pub fn cmd(&self) -> &Cmd<X> {
        // SAFETY: a token exists only for a live command (the packet or
        // internal box outlives every use of the command by the HBA).
        unsafe { self.0.as_ref() }
    }

    /// Whether this token is for `cmd`.
    pub fn is(&self, cmd: &Cmd<X>) -> bool {
        core::ptr::eq(self.0.as_ptr(), cmd)
    }

    /// The fields.
    pub fn fields(&mut self) -> &mut CmdFields<X> {
        // SAFETY: the token is unique (created only by a successful state
        // transition, never copied), and `&mut self` borrows it
        // exclusively, so this is the only access path to the fields.
        unsafe { &mut *self.cmd().fields.get() }
    }

    /// The fields, read-only.
    pub fn fields_ref(&self) -> &CmdFields<X> {
        // SAFETY: the token is unique; `&self` borrows it, so no `&mut`
        // from `fields()` can exist while this shared borrow does.
        unsafe { &*self.cmd().fields.get() }
    }

    /// Records that the command is in a ring (under the queue's lock).
    pub fn mark_queued(&self) {
        self.cmd()
            .state
            .store(CmdState::Queued as u8, Ordering::Release);
    }

    /// Marks the command owned again after it left a ring.
    pub fn mark_owned(&self) {
        self.cmd()
            .state
            .store(CmdState::Owned as u8, Ordering::Release);
    }

    /// Gives the command up: `Idle` for the target driver, or `Done` for a
    /// polled command's poller.
    pub fn release(self, state: CmdState) {
        self.cmd().state.store(state as u8, Ordering::Release);
    }
}

/// A list of commands linked through their fields, built under a queue
/// lock and completed after it is dropped. No allocation.
pub struct CmdList<X> {
    head: Option<OwnedCmd<X>>,
    len: usize,
}

impl<X> Default for CmdList<X> {
    fn default() -> Self {
        Self::new()
    }
}

impl<X> CmdList<X> {
    /// An empty list.
    pub const fn new() -> Self {
        Self { head: None, len: 0 }
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `c` (in front: completion order within one pass is not
    /// meaningful to SCSA).
    pub fn push(&mut self, mut c: OwnedCmd<X>) {
        c.fields().next = self.head.take();
        self.head = Some(c);
        self.len += 1;
    }

    /// Removes a command.
    pub fn pop(&mut self) -> Option<OwnedCmd<X>> {
        let mut c = self.head.take()?;
        self.head = c.fields().next.take();
        self.len -= 1;
        Some(c)
    }

    /// Takes out the first command (in list order) for which `pred` holds;
    /// the others keep their order. Bounded by the length.
    pub fn remove_first(
        &mut self,
        mut pred: impl FnMut(&OwnedCmd<X>) -> bool,
    ) -> Option<OwnedCmd<X>> {
        let mut reversed = CmdList::new();
        let mut found = None;
        while let Some(c) = self.pop() {
            if found.is_none() && pred(&c) {
                found = Some(c);
            } else {
                reversed.push(c);
            }
        }
        while let Some(c) = reversed.pop() {
            self.push(c);
        }
        found
    }

    /// Takes out every command for which `pred` holds (bounded by the
    /// length; the order of either list is not kept).
    pub fn take_where(&mut self, mut pred: impl FnMut(&OwnedCmd<X>) -> bool) -> CmdList<X> {
        let mut taken = CmdList::new();
        let mut rest = CmdList::new();
        while let Some(c) = self.pop() {
            if pred(&c) {
                taken.push(c);
            } else {
                rest.push(c);
            }
        }
        *self = rest;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;
    use alloc::vec::Vec;

    #[test]
    fn the_state_word_moves_only_along_the_ownership_protocol() {
        let cmd = Box::new(Cmd::new(7u32));
        let other = Box::new(Cmd::new(8u32));
        assert!(cmd.is_valid());
        assert_eq!(cmd.state(), CmdState::Idle);
        assert!(OwnedCmd::reclaim_done(&cmd).is_none(), "not done");
        let c = OwnedCmd::claim(&cmd).expect("idle");
        assert_eq!(cmd.state(), CmdState::Owned);
        assert!(OwnedCmd::claim(&cmd).is_none(), "claimed twice");
        assert!(
            c.is(&cmd) && !c.is(&other),
            "a token names its command only"
        );
        c.mark_queued();
        assert_eq!(cmd.state(), CmdState::Queued);
        c.mark_owned();
        assert_eq!(cmd.state(), CmdState::Owned);
        c.release(CmdState::Done);
        assert_eq!(cmd.state(), CmdState::Done);
        assert!(
            OwnedCmd::claim(&cmd).is_none(),
            "a done command is its poller's"
        );
        let mut c = OwnedCmd::reclaim_done(&cmd).expect("done");
        assert_eq!(c.fields().dev, 7);
        c.release(CmdState::Idle);
        assert_eq!(cmd.state(), CmdState::Idle);
    }

    #[test]
    fn a_new_start_clears_what_the_previous_one_left() {
        let cmd = Box::new(Cmd::new(()));
        let mut c = OwnedCmd::claim(&cmd).expect("idle");
        let f = c.fields();
        f.timed_out = true;
        f.recovery = PktStatistics::TIMEOUT;
        f.reset_forced = true;
        f.abandoned = true;
        f.reset_for_start();
        assert!(!f.timed_out && !f.reset_forced && !f.abandoned);
        assert!(f.recovery.is_empty());
        c.release(CmdState::Idle);
    }

    #[test]
    fn a_destroyed_command_is_not_taken_for_a_live_one() {
        let mut slot = core::mem::MaybeUninit::new(Cmd::new(0u8));
        let p = slot.as_ptr();
        // SAFETY: `p` points at the live command in `slot` for this scope.
        assert!(unsafe { Cmd::from_raw(p) }.is_some());
        // SAFETY: the command in `slot` is initialized and dropped once
        // here; the bytes stay allocated (MaybeUninit) for the read below.
        unsafe { slot.assume_init_drop() };
        // SAFETY: the bytes are still allocated and were initialized (the
        // destructor only cleared the magic word).
        assert!(unsafe { Cmd::from_raw(p) }.is_none());
        // SAFETY: null is allowed.
        assert!(unsafe { Cmd::<u8>::from_raw(core::ptr::null()) }.is_none());
    }

    #[test]
    fn command_lists_keep_every_command_once() {
        let cmds: Vec<Box<Cmd<u32>>> = (0..5).map(|i| Box::new(Cmd::new(i))).collect();
        let mut l = CmdList::new();
        for c in &cmds {
            l.push(OwnedCmd::claim(c).expect("idle"));
        }
        assert_eq!(l.len(), 5);
        assert!(!l.is_empty());
        let two = l.remove_first(|c| c.fields_ref().dev == 2).expect("there");
        assert_eq!(two.fields_ref().dev, 2);
        assert!(l.remove_first(|c| c.fields_ref().dev == 2).is_none());
        let even = l.take_where(|c| c.fields_ref().dev % 2 == 0);
        assert_eq!((even.len(), l.len()), (2, 2));
        let mut seen: Vec<u32> = Vec::new();
        for mut list in [even, l] {
            while let Some(c) = list.pop() {
                seen.push(c.fields_ref().dev);
                c.release(CmdState::Idle);
            }
            assert!(list.is_empty());
        }
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 3, 4]);
        two.release(CmdState::Idle);
        assert!(cmds.iter().all(|c| c.state() == CmdState::Idle));
    }
}
