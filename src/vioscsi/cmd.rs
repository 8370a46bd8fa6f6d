//! Per-command state: what the packet constructor preallocates in the HBA
//! private area of every `scsi_pkt` (`tran_hba_len` bytes at
//! `pkt_ha_private`), and the command's DMA memory (request header,
//! response, indirect descriptor table).
//!
//! # Ownership
//!
//! A [`Cmd`] has exactly one owner at a time, represented by an
//! [`OwnedCmd`] token (neither `Copy` nor `Clone`); only the token gives
//! access to the command's fields. The state word, readable by anyone,
//! says where the token is:
//! - `IDLE`: nobody in the HBA holds it; [`OwnedCmd::claim`] takes it
//!   (tran_start, setup, teardown);
//! - `QUEUED`: in the ring of request queue `queue`, under that queue's
//!   lock (the watchdog and the abort path look at it there);
//! - `DONE`: a polled command completed; its poller takes the token back
//!   with [`OwnedCmd::reclaim_done`].
//!
//! A completer ends its ownership by storing `IDLE` (then completes the
//! packet) or `DONE`.

use super::proto;
use crate::ddi::dma::{DmaBuffer, DmaMode};
use crate::ddi::{DdiError, Dip, Sleep};
use crate::scsa::PktStatistics;
use crate::scsa::flags::DataDir;
use crate::scsa::pkt::Pkt;
use crate::virtio::ring::DESC_SIZE;
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, Ordering};

/// Not in flight.
pub const IDLE: u8 = 0;
/// Owned by a thread of the HBA (being prepared, or just completed).
pub const OWNED: u8 = 1;
/// In a ring.
pub const QUEUED: u8 = 2;
/// A polled command completed; its poller takes it back.
pub const DONE: u8 = 3;

/// Marks constructed commands.
const MAGIC: u64 = 0x7276_7363_7369_0001;

/// Where the request header, the response and the indirect table live in a
/// command's DMA memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdLayout {
    /// Bytes of the request header (`19 + cdb_size`).
    pub req_len: usize,
    /// Offset of the response.
    pub resp_off: usize,
    /// Bytes of the response (12 + sense).
    pub resp_len: usize,
    /// Offset of the indirect descriptor table.
    pub table_off: usize,
    /// Entries the table has room for (0: no table).
    pub table_entries: usize,
    /// Total bytes.
    pub total: usize,
}

impl CmdLayout {
    /// For CDBs of `cdb_size`, `sense_size` bytes of sense and up to
    /// `segments` data buffers, with or without an indirect table.
    pub fn new(cdb_size: u32, sense_size: u32, segments: u32, indirect: bool) -> Self {
        let req_len = proto::REQ_CDB + cdb_size as usize;
        let resp_off = req_len.next_multiple_of(8);
        let resp_len = proto::RESP_HEADER_LEN + sense_size as usize;
        let table_off = (resp_off + resp_len).next_multiple_of(DESC_SIZE);
        let table_entries = if indirect { segments as usize + 2 } else { 0 };
        CmdLayout {
            req_len,
            resp_off,
            resp_len,
            table_off,
            table_entries,
            total: table_off + DESC_SIZE * table_entries,
        }
    }
}

/// The fields of a command, reached only through its [`OwnedCmd`].
pub struct CmdFields {
    /// The packet while the HBA owns it; `None` for internal commands and
    /// between uses.
    pub pkt: Option<Pkt>,
    /// Request header, response, indirect table.
    pub dma: DmaBuffer,
    /// Completion is polled (FLAG_NOINTR or internal).
    pub polled: bool,
    /// Index of the request queue it went to.
    pub queue: u16,
    /// Its head descriptor in that ring.
    pub head: u16,
    /// The `id` sent to the device (names it for ABORT TASK).
    pub tag: u64,
    /// Target.
    pub target: u8,
    /// LUN.
    pub lun: crate::scsa::addr::LunNumber,
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
    /// The response (kept for internal commands).
    pub response: proto::Response,
    /// Taken back by a device reset, its completion parked for a reaper
    /// that holds no driver lock.
    pub reset_forced: bool,
    /// Its packet was torn down while it was in flight: when it comes
    /// back it is simply idle again.
    pub abandoned: bool,
    /// Link of a [`CmdList`].
    next: Option<OwnedCmd>,
}

impl CmdFields {
    /// Clears what a previous use left behind.
    pub fn reset_for_start(&mut self) {
        self.timed_out = false;
        self.recovery = PktStatistics::empty();
        self.response = proto::Response::default();
        self.reset_forced = false;
        self.abandoned = false;
        self.next = None;
    }
}

/// The per-command state in the HBA private area of a packet (or, for
/// internal commands, in a heap box).
#[repr(C)]
pub struct Cmd {
    magic: u64,
    state: AtomicU8,
    fields: UnsafeCell<CmdFields>,
}

// SAFETY: `fields` is only reached through the unique OwnedCmd token;
// `state` is atomic; `magic` is written only by the constructor and
// destructor, which have exclusive access.
unsafe impl Sync for Cmd {}
// SAFETY: a Cmd holds no thread-bound state (no guard, no thread id):
// `fields` moves with the unique OwnedCmd token, and the kmem cache may run
// the constructor and the destructor on different threads.
unsafe impl Send for Cmd {}

// The framework aligns the HBA private area to 8 bytes (the packet cache is
// created with alignment 8), so the command must not need more.
const _: () = assert!(core::mem::align_of::<Cmd>() <= 8);
// `Cmd::from_raw` reads the magic word at the start of the area.
const _: () = assert!(core::mem::offset_of!(Cmd, magic) == 0);

impl Cmd {
    /// A command with its DMA memory allocated.
    pub fn new(dip: Dip, layout: &CmdLayout, sleep: Sleep) -> Result<Cmd, DdiError> {
        let dma = DmaBuffer::alloc(dip, layout.total, 64, u64::MAX, DmaMode::Streaming, sleep)?;
        Ok(Cmd {
            magic: MAGIC,
            state: AtomicU8::new(IDLE),
            fields: UnsafeCell::new(CmdFields {
                pkt: None,
                dma,
                polled: false,
                queue: 0,
                head: 0,
                tag: 0,
                target: 0,
                lun: crate::scsa::addr::LunNumber::ZERO,
                deadline: 0,
                timed_out: false,
                recovery: PktStatistics::empty(),
                xfer: 0,
                dir: DataDir::None,
                response: proto::Response::default(),
                reset_forced: false,
                abandoned: false,
                next: None,
            }),
        })
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
    /// `p` must be null or point at `size_of::<Cmd>()` initialized bytes
    /// (a packet's HBA private area, which the framework allocates with
    /// the packet and our constructor fills) that stay allocated for `'a`,
    /// and a live command there must stay alive for `'a` (our destructor
    /// runs only when the framework destroys the packet).
    pub unsafe fn from_raw<'a>(p: *const Cmd) -> Option<&'a Cmd> {
        if p.is_null() || !p.is_aligned() {
            return None;
        }
        // SAFETY: `p` is aligned (checked) and points at initialized
        // readable bytes (caller); `magic` is at offset 0 (asserted above,
        // after the struct). `addr_of!` forms no reference. A plain read
        // suffices: what matters is that no `&Cmd` exists before the check.
        // No data race: our destructor (which writes `magic = 0`) runs
        // only when the framework frees the packet, and kmem gives each
        // object to one owner at a time (kmem_cache_alloc(9F) hands an
        // object out once until kmem_cache_free), so it cannot run while
        // the packet's owner calls an entry point with it.
        let magic = unsafe { core::ptr::addr_of!((*p).magic).read() };
        if magic != MAGIC {
            return None;
        }
        // SAFETY: the magic says our constructor made a `Cmd` here and our
        // destructor (which clears it) has not run; it lives for 'a (caller).
        Some(unsafe { &*p })
    }

    /// The state word.
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

impl Drop for Cmd {
    fn drop(&mut self) {
        // A destroyed command can never be mistaken for a live one.
        self.magic = 0;
    }
}

/// The unique right to use a [`Cmd`]'s fields.
#[derive(Debug, PartialEq, Eq)]
pub struct OwnedCmd(NonNull<Cmd>);

// SAFETY: the token moves between threads (submitter, ring, completer);
// exclusivity is what it encodes.
unsafe impl Send for OwnedCmd {}

impl OwnedCmd {
    /// Takes an `IDLE` command; `None` if someone owns it (a packet started
    /// twice, or torn down while in flight).
    pub fn claim(cmd: &Cmd) -> Option<OwnedCmd> {
        Self::take(cmd, IDLE)
    }

    /// Takes back a polled command its completer marked `DONE`.
    pub fn reclaim_done(cmd: &Cmd) -> Option<OwnedCmd> {
        Self::take(cmd, DONE)
    }

    fn take(cmd: &Cmd, from: u8) -> Option<OwnedCmd> {
        cmd.state
            .compare_exchange(from, OWNED, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some(OwnedCmd(NonNull::from(cmd)))
    }

    /// The command (state word, identity).
    pub fn cmd(&self) -> &Cmd {
        // SAFETY: a token exists only for a live command (the packet or
        // internal box outlives every use of the command by the HBA).
        unsafe { self.0.as_ref() }
    }

    /// Whether this token is for `cmd`.
    pub fn is(&self, cmd: &Cmd) -> bool {
        core::ptr::eq(self.0.as_ptr(), cmd)
    }

    /// The fields.
    pub fn fields(&mut self) -> &mut CmdFields {
        // SAFETY: the token is unique (created only by a successful state
        // transition, never copied), so this is the only access path.
        unsafe { &mut *self.cmd().fields.get() }
    }

    /// The fields, read-only.
    pub fn fields_ref(&self) -> &CmdFields {
        // SAFETY: as in fields().
        unsafe { &*self.cmd().fields.get() }
    }

    /// Records that the command is in a ring (under the queue's lock).
    pub fn mark_queued(&self) {
        self.cmd().state.store(QUEUED, Ordering::Release);
    }

    /// Marks the command owned again after it left a ring.
    pub fn mark_owned(&self) {
        self.cmd().state.store(OWNED, Ordering::Release);
    }

    /// Gives the command up: `IDLE` for the target driver, or `DONE` for a
    /// polled command's poller.
    pub fn release(self, state: u8) {
        self.cmd().state.store(state, Ordering::Release);
    }
}

/// A list of commands linked through their fields, built under a queue
/// lock and completed after it is dropped. No allocation.
#[derive(Default)]
pub struct CmdList {
    head: Option<OwnedCmd>,
    len: usize,
}

impl CmdList {
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
    pub fn push(&mut self, mut c: OwnedCmd) {
        c.fields().next = self.head.take();
        self.head = Some(c);
        self.len += 1;
    }

    /// Removes a command.
    pub fn pop(&mut self) -> Option<OwnedCmd> {
        let mut c = self.head.take()?;
        self.head = c.fields().next.take();
        self.len -= 1;
        Some(c)
    }

    /// Takes out the first command (in list order) for which `pred` holds;
    /// the others keep their order. Bounded by the length.
    pub fn remove_first(&mut self, mut pred: impl FnMut(&OwnedCmd) -> bool) -> Option<OwnedCmd> {
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
    pub fn take_where(&mut self, mut pred: impl FnMut(&OwnedCmd) -> bool) -> CmdList {
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

    /// Calls `f` on every command (bounded by the length).
    pub fn for_each(&mut self, mut f: impl FnMut(&mut OwnedCmd)) {
        let mut rest = CmdList::new();
        while let Some(mut c) = self.pop() {
            f(&mut c);
            rest.push(c);
        }
        *self = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_for_qemu() {
        let l = CmdLayout::new(32, 96, 254, true);
        assert_eq!(l.req_len, 51);
        assert_eq!(l.resp_off, 56);
        assert_eq!(l.resp_len, 108);
        assert_eq!(l.table_off, 176);
        assert_eq!(l.table_entries, 256);
        assert_eq!(l.total, 176 + 16 * 256);
        assert_eq!(CmdLayout::new(32, 96, 254, false).total, 176);
    }
}
