//! Named kernel statistics (`kstat_create(9F)`, `kstat_named_init(9F)`,
//! `kstat_install(9F)`, `kstat_delete(9F)`): one `rvscsi:<instance>:hba`
//! kstat per HBA and one `rvscsi:<instance>:queue<N>` per request queue
//! (issue 15).
//!
//! The counters are atomics ([`Counters`]) the driver bumps with relaxed
//! atomic adds wherever it is, interrupt context included, with no lock
//! of its own (a per-queue counter may also be bumped under the queue lock
//! the path already holds: the atomic add costs the same there). They are
//! copied into the kstat's named data only when someone reads the kstat:
//! the kstat driver calls `ks_update(ksp, KSTAT_READ)` before it takes its
//! snapshot (uts/common/io/kstat.c `read_kstat_data`), and our update
//! copies each atomic into its `kstat_named_t`. `ks_lock` stays NULL (the
//! default of `kstat_create`, uts/common/os/kstat_fr.c): reads of atomics
//! need no lock, and KSTAT_ENTER/KSTAT_EXIT then do nothing (sys/kstat.h).
//! Writes (`KSTAT_WRITE`) are refused with `EACCES`, as sys/kstat.h says an
//! update that does not support them should.
//!
//! A kstat that cannot be created is not an attach failure: [`Published`]
//! then keeps counting into its atomics, logs a warning once, and nothing
//! is visible to `kstat(8)` (see [`Published::create`]).
//!
//! Context (kstat_create(9F), kstat_install(9F): "user or kernel context";
//! kstat_delete(9F): "any context"): create in attach(9E), drop in
//! detach(9E) or a failed attach; [`Counters`] from anywhere.

use super::Dip;
use crate::ffi;
use alloc::boxed::Box;
use core::ffi::{CStr, c_int};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

/// The module name every rvscsi kstat is published under (`ks_module`).
pub const MODULE: &CStr = c"rvscsi";
/// The class of the HBA's kstats (`ks_class`), as `kstat -c controller`
/// selects the statistics of disk controllers.
pub const CLASS: &CStr = c"controller";

/// `name`, checked at compile time to fit a kstat name field
/// (`KSTAT_STRLEN` bytes with the NUL: kstat_create(9F) and
/// kstat_named_init(9F) silently cut longer names, kstat_fr.c
/// `kstat_set_string`) and to be non-empty.
pub const fn checked_name(name: &'static CStr) -> &'static CStr {
    let len = name.to_bytes().len();
    assert!(len > 0, "an empty kstat name");
    assert!(
        len < ffi::KSTAT_STRLEN,
        "a kstat name longer than KSTAT_STRLEN - 1"
    );
    name
}

/// A statistic of a counter set: its index in the set and its name.
pub trait Stat: Copy + 'static {
    /// Every statistic of the set, in kstat order.
    const ALL: &'static [Self];
    /// Its index in [`Stat::ALL`] (and in the kstat's named data).
    fn index(self) -> usize;
    /// Its name (`kstat -p` prints `module:instance:name:<this>`).
    fn name(self) -> &'static CStr;
}

macro_rules! stat_set {
    ($(#[$m:meta])* $ty:ident, $count:ident { $( $(#[$vm:meta])* $v:ident = $name:literal, )* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $ty { $( $(#[$vm])* $v, )* }

        /// How many statistics the set has.
        pub const $count: usize = [$( $ty::$v, )*].len();

        impl Stat for $ty {
            const ALL: &'static [Self] = &[$( $ty::$v, )*];
            fn index(self) -> usize {
                self as usize
            }
            fn name(self) -> &'static CStr {
                match self { $( $ty::$v => const { checked_name($name) }, )* }
            }
        }
    };
}

stat_set! {
    /// The HBA-wide statistics (`rvscsi:<instance>:hba`).
    HbaStat, HBA_STATS {
        /// Commands accepted by tran_start(9E) (and the driver's own).
        Started = c"commands_started",
        /// Commands completed (to SCSA, or to their poller).
        Completed = c"commands_completed",
        /// tran_start(9E) returned TRAN_BUSY (ring full, or a reset under
        /// way).
        TranBusy = c"tran_busy",
        /// tran_start(9E) returned TRAN_BADPKT.
        TranBadPkt = c"tran_badpkt",
        /// Commands that ran past their pkt_time.
        Timeouts = c"timeouts",
        /// ABORT TASK / ABORT TASK SET the device performed.
        AbortsDone = c"aborts_done",
        /// ... that it refused, did not answer, or could not be sent.
        AbortsFailed = c"aborts_failed",
        /// LUN resets (LOGICAL UNIT RESET) the device performed.
        LunResetsDone = c"lun_resets_done",
        /// ... that failed.
        LunResetsFailed = c"lun_resets_failed",
        /// Target resets (I_T NEXUS RESET or the family's nearest) done.
        TargetResetsDone = c"target_resets_done",
        /// ... that failed.
        TargetResetsFailed = c"target_resets_failed",
        /// Device resets begun (recovery, RESET_ALL, a broken device).
        DeviceResets = c"device_resets",
        /// Device resets after which the device did not come back.
        DeviceResetsFailed = c"device_resets_failed",
        /// Interrupt handler invocations (claimed or not).
        Interrupts = c"interrupts",
        /// Timed-out commands whose whole recovery ladder short of a
        /// device reset failed: the device stopped answering.
        NoResponse = c"no_response",
        /// Times the device set DEVICE_NEEDS_RESET (virtio 1.2 §2.1.1).
        NeedsReset = c"device_needs_reset",
        /// Events (virtio-scsi event queue, PVSCSI messages) received.
        Events = c"events",
        /// Completions naming a command already completed.
        CmplDuplicate = c"cmpl_duplicate",
        /// Completions naming no command the driver issued.
        CmplUnknown = c"cmpl_unknown",
        /// Completions the device cannot have written legitimately (an id
        /// out of any range, a request it cannot have seen yet).
        CmplImpossible = c"cmpl_impossible",
        /// Completion indexes further ahead than the device can have
        /// completed (the device is reset).
        RingRunaway = c"ring_runaway",
        /// Access or DMA handle faults found (ddi_fm_*_err_get(9F)).
        HandleFaults = c"handle_faults",
        /// Request queues the watchdog found with completions that had
        /// waited a whole tick unconsumed, and reaped: an interrupt that
        /// never came.
        WatchdogReaps = c"watchdog_reaps",
        /// Completion passes that ran out with completions still waiting
        /// (a device completing as fast as they are reaped): the queue
        /// went to the work task.
        RearmHandoffs = c"rearm_handoffs",
        /// The negotiated feature bits (virtio) or 0 (PVSCSI).
        Features = c"features",
        /// The interrupt type in use: DDI_INTR_TYPE_FIXED (1), MSI (2),
        /// MSIX (4), or 0 when polled.
        IntrType = c"intr_type",
        /// Interrupt vectors held.
        IntrVectors = c"intr_vectors",
        /// Request queues.
        Queues = c"queues",
    }
}

stat_set! {
    /// The statistics of one request queue (`rvscsi:<instance>:queue<N>`).
    QueueStat, QUEUE_STATS {
        /// Commands placed on the ring.
        Commands = c"commands",
        /// Doorbell writes (device notifications) for this queue.
        Doorbells = c"doorbells",
        /// Interrupts that reaped this queue.
        Interrupts = c"interrupts",
        /// Completions the device returned on this ring.
        Completions = c"completions",
        /// The most completions one completion pass took (a high-water
        /// mark, updated once per pass).
        BatchMax = c"batch_max",
        /// Commands refused because the ring was full (TRAN_BUSY).
        RingFull = c"ring_full",
    }
}

/// The counters of one kstat: atomics any context may bump.
pub struct Counters<const N: usize> {
    values: [AtomicU64; N],
}

impl<const N: usize> Counters<N> {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            values: [const { AtomicU64::new(0) }; N],
        }
    }

    /// Adds `n` to statistic `s` (relaxed: a kstat reader needs no order
    /// with the I/O path, only each counter's own value).
    pub fn add<S: Stat>(&self, s: S, n: u64) {
        if let Some(v) = self.values.get(s.index()) {
            v.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds one to statistic `s`.
    pub fn bump<S: Stat>(&self, s: S) {
        self.add(s, 1);
    }

    /// Raises statistic `s` to `v` if it is lower (a high-water mark).
    pub fn raise_to<S: Stat>(&self, s: S, v: u64) {
        if let Some(c) = self.values.get(s.index()) {
            c.fetch_max(v, Ordering::Relaxed);
        }
    }

    /// Sets statistic `s` to `v` (a fact, not a count: the features, the
    /// interrupt type).
    pub fn set<S: Stat>(&self, s: S, v: u64) {
        if let Some(c) = self.values.get(s.index()) {
            c.store(v, Ordering::Relaxed);
        }
    }

    /// Adds `n` to statistic `s` when the caller is its only writer (it
    /// holds the lock every writer of `s` holds: a request queue's lock):
    /// a relaxed load and store, no locked read-modify-write. Readers
    /// (the kstat update) still see a whole value.
    pub fn add_exclusive<S: Stat>(&self, s: S, n: u64) {
        if let Some(c) = self.values.get(s.index()) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        }
    }

    /// [`Self::raise_to`] for the only writer of `s` (see
    /// [`Self::add_exclusive`]).
    pub fn raise_exclusive<S: Stat>(&self, s: S, v: u64) {
        if let Some(c) = self.values.get(s.index())
            && c.load(Ordering::Relaxed) < v
        {
            c.store(v, Ordering::Relaxed);
        }
    }

    /// The current value of statistic `s`.
    pub fn get<S: Stat>(&self, s: S) -> u64 {
        self.value_at(s.index())
    }

    fn value_at(&self, i: usize) -> u64 {
        self.values.get(i).map_or(0, |v| v.load(Ordering::Relaxed))
    }
}

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// A kstat name (`ks_name`), NUL-terminated in a fixed buffer (no heap).
#[derive(Clone, Copy)]
pub struct KstatName {
    buf: [u8; ffi::KSTAT_STRLEN],
}

impl KstatName {
    /// `hba`
    pub const fn hba() -> Self {
        let mut buf = [0u8; ffi::KSTAT_STRLEN];
        buf[0] = b'h';
        buf[1] = b'b';
        buf[2] = b'a';
        Self { buf }
    }

    /// `queue<n>`, `n` in decimal (`queue0`, `queue15`).
    pub fn queue(n: u16) -> Self {
        let mut buf = [0u8; ffi::KSTAT_STRLEN];
        buf[..5].copy_from_slice(b"queue");
        let mut digits = [0u8; 5];
        let mut len = 0;
        let mut v = n;
        loop {
            digits[len] = b'0' + (v % 10) as u8;
            len += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for i in 0..len {
            buf[5 + i] = digits[len - 1 - i];
        }
        Self { buf }
    }

    /// The name as a C string.
    pub fn as_c_str(&self) -> &CStr {
        // The buffer always holds a NUL: names are at most 10 bytes here.
        CStr::from_bytes_until_nul(&self.buf).unwrap_or(c"")
    }
}

/// Why a kstat is not published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KstatError {
    /// `kstat_create(9F)` returned NULL (no memory, a name collision, or
    /// an argument it refuses: it logs which, kstat_fr.c).
    CreateFailed,
    /// More statistics than a `uint_t` counts (never, for the sets here).
    TooMany,
}

/// The counters of one named kstat and, when `kstat_create` succeeded, the
/// installed kstat that publishes them; `kstat_delete(9F)` on drop.
///
/// The counters are on the heap so that their address, which the kstat's
/// `ks_private` holds for the update callback, stays put however the
/// owner moves.
pub struct Published<const N: usize> {
    counters: Box<Counters<N>>,
    ksp: Option<NonNull<ffi::kstat_t>>,
}

// SAFETY: the kstat pointer is only handed to kstat_delete(9F) (any
// context, any thread) in Drop; the counters are atomics.
unsafe impl<const N: usize> Send for Published<N> {}
// SAFETY: `&Published` reaches only the atomic counters and a bool test
// of the pointer; nothing mutates the kstat through a shared reference.
unsafe impl<const N: usize> Sync for Published<N> {}

impl<const N: usize> Published<N> {
    /// Creates and installs `rvscsi:<instance of dip>:<name>` (class
    /// [`CLASS`], `KSTAT_TYPE_NAMED`, one `KSTAT_DATA_UINT64` per
    /// statistic of the set `S`, in order: `N` must be its size, checked
    /// at compile time, so that a statistic's index is its named entry). If the kstat cannot be created the result still
    /// counts (its counters work) but publishes nothing, and a warning says
    /// so: statistics are not worth failing attach for.
    ///
    /// Call from attach(9E) (user or kernel context, kstat_create(9F)).
    pub fn create<S: Stat>(dip: Dip, name: &KstatName) -> Self {
        const { assert!(S::ALL.len() == N, "N is not the size of the statistic set") };
        let counters = Box::new(Counters::new());
        match Self::install(dip, name, S::ALL, &counters) {
            Ok(ksp) => Self {
                counters,
                ksp: Some(ksp),
            },
            Err(e) => {
                crate::dev_warn!(
                    dip,
                    "kstat {}:{}:{} not published ({:?}); counting without it",
                    "rvscsi",
                    dip.instance(),
                    name.as_c_str().to_str().unwrap_or("?"),
                    e
                );
                Self {
                    counters,
                    ksp: None,
                }
            }
        }
    }

    fn install<S: Stat>(
        dip: Dip,
        name: &KstatName,
        stats: &[S],
        counters: &Counters<N>,
    ) -> Result<NonNull<ffi::kstat_t>, KstatError> {
        let ndata = u32::try_from(N).map_err(|_| KstatError::TooMany)?;
        // SAFETY: NUL-terminated strings the DDI copies; a named kstat of
        // ndata entries with the framework allocating the data (no flags).
        let ksp = unsafe {
            ffi::kstat_create(
                MODULE.as_ptr(),
                dip.instance(),
                name.as_c_str().as_ptr(),
                CLASS.as_ptr(),
                ffi::KSTAT_TYPE_NAMED,
                ndata,
                0,
            )
        };
        let ksp = NonNull::new(ksp).ok_or(KstatError::CreateFailed)?;
        // SAFETY: kstat_create returned a kstat not yet installed, so no
        // reader sees it and we may set it up (sys/kstat.h, "Step 2");
        // its ks_data holds ndata kstat_named_t (KSTAT_TYPE_NAMED,
        // not virtual, kstat_fr.c kstat_create_zone).
        unsafe {
            let ks = ksp.as_ptr();
            let data = (*ks).ks_data.cast::<ffi::kstat_named_t>();
            for (i, s) in stats.iter().take(N).enumerate() {
                ffi::kstat_named_init(data.add(i), s.name().as_ptr(), ffi::KSTAT_DATA_UINT64);
            }
            (*ks).ks_private = core::ptr::from_ref(counters).cast_mut().cast();
            (*ks).ks_update = Some(update::<N>);
            ffi::kstat_install(ks);
        }
        Ok(ksp)
    }

    /// The counters (bump them from anywhere).
    pub fn counters(&self) -> &Counters<N> {
        &self.counters
    }

    /// Deletes the kstat now (`kstat_delete(9F)`), keeping the counters
    /// (for an owner that must outlive its kstat).
    pub fn unpublish(&mut self) {
        if let Some(ksp) = self.ksp.take() {
            // SAFETY: `ksp` came from kstat_create and was installed by
            // `create` (only then is it stored), and is taken out of
            // `self.ksp` here, so it is deleted exactly once and Drop will
            // not delete it again. kstat_delete(9F) waits out any ks_update
            // in progress and none starts after it returns, so the
            // counters `ks_private` points at (which `self` keeps) are not
            // read once this returns.
            unsafe { ffi::kstat_delete(ksp.as_ptr()) };
        }
    }

    /// Whether the kstat is visible to `kstat(8)`.
    pub fn is_published(&self) -> bool {
        self.ksp.is_some()
    }
}

impl<const N: usize> Drop for Published<N> {
    fn drop(&mut self) {
        // ks_lock is NULL so we cannot hold it. kstat_delete waits for a
        // reader inside update (kstat_hold_bykid), so after it returns no
        // update runs and the counters (dropped after this) are unused.
        self.unpublish();
    }
}

/// `ks_update` of every [`Published`] kstat: on `KSTAT_READ`, copies each
/// counter into its `kstat_named_t` (`value.ui64`); `KSTAT_WRITE` is
/// refused with `EACCES` (sys/kstat.h, "Dynamic update support").
///
/// # Safety
/// `ksp` is a kstat installed by [`Published::create`] with the same `N`:
/// its `ks_private` points at live `Counters<N>` and its `ks_data` at `N`
/// named entries. The kstat framework calls it so, with the kstat held.
unsafe extern "C" fn update<const N: usize>(ksp: *mut ffi::kstat_t, rw: c_int) -> c_int {
    if rw == ffi::KSTAT_WRITE {
        return ffi::EACCES;
    }
    // SAFETY: the caller's contract: a kstat of ours, held by the
    // framework, whose ks_private is our Counters<N>.
    let (counters, data, ndata) = unsafe {
        let ks = &*ksp;
        (
            &*ks.ks_private.cast::<Counters<N>>(),
            ks.ks_data.cast::<ffi::kstat_named_t>(),
            ks.ks_ndata as usize,
        )
    };
    if data.is_null() {
        return ffi::EIO;
    }
    for i in 0..N.min(ndata) {
        // SAFETY: i < ks_ndata entries of the framework's data section.
        unsafe { (*data.add(i)).value.ui64 = counters.value_at(i) };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::vec::Vec;

    fn names<S: Stat>() -> Vec<&'static str> {
        S::ALL.iter().map(|s| s.name().to_str().unwrap()).collect()
    }

    #[test]
    fn every_statistic_name_fits_is_unique_and_in_order() {
        for (set, all) in [("hba", names::<HbaStat>()), ("queue", names::<QueueStat>())] {
            let unique: HashSet<_> = all.iter().collect();
            assert_eq!(unique.len(), all.len(), "{set}: duplicate names");
            for n in &all {
                assert!(!n.is_empty() && n.len() < ffi::KSTAT_STRLEN, "{set}: {n}");
                assert!(
                    n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{set}: {n} is not a kstat -p friendly name"
                );
            }
        }
        assert_eq!(HbaStat::ALL.len(), HBA_STATS);
        assert_eq!(QueueStat::ALL.len(), QUEUE_STATS);
        for (i, s) in QueueStat::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
        assert_eq!(HbaStat::NeedsReset.name(), c"device_needs_reset");
        assert_eq!(QueueStat::BatchMax.name(), c"batch_max");
    }

    #[test]
    fn kstat_names_are_hba_and_queue_with_the_decimal_number() {
        assert_eq!(KstatName::hba().as_c_str(), c"hba");
        assert_eq!(KstatName::queue(0).as_c_str(), c"queue0");
        assert_eq!(KstatName::queue(7).as_c_str(), c"queue7");
        assert_eq!(KstatName::queue(15).as_c_str(), c"queue15");
        assert_eq!(KstatName::queue(u16::MAX).as_c_str(), c"queue65535");
    }

    #[test]
    fn counters_add_bump_and_keep_a_high_water_mark() {
        let c: Counters<QUEUE_STATS> = Counters::new();
        c.bump(QueueStat::Commands);
        c.add(QueueStat::Commands, 4);
        c.add_exclusive(QueueStat::Commands, 2);
        c.raise_to(QueueStat::BatchMax, 9);
        c.raise_to(QueueStat::BatchMax, 3);
        c.raise_exclusive(QueueStat::BatchMax, 8);
        assert_eq!(c.get(QueueStat::Commands), 7);
        assert_eq!(c.get(QueueStat::BatchMax), 9);
        c.raise_exclusive(QueueStat::BatchMax, 10);
        assert_eq!(c.get(QueueStat::BatchMax), 10);
        c.set(QueueStat::RingFull, 3);
        assert_eq!(c.get(QueueStat::RingFull), 3);
        assert_eq!(c.get(QueueStat::Completions), 0);
    }

    #[test]
    fn the_update_copies_counters_on_read_and_refuses_writes() {
        let c: Counters<QUEUE_STATS> = Counters::new();
        c.add(QueueStat::Completions, 42);
        c.add(QueueStat::Doorbells, 4096);
        // SAFETY: kstat_named_t is plain data; all zero is a valid value.
        let mut data: [ffi::kstat_named_t; QUEUE_STATS] = unsafe { core::mem::zeroed() };
        // SAFETY: as above, for kstat_t (null pointers, no callbacks).
        let mut ks: ffi::kstat_t = unsafe { core::mem::zeroed() };
        ks.ks_private = core::ptr::from_ref(&c).cast_mut().cast();
        ks.ks_data = data.as_mut_ptr().cast();
        ks.ks_ndata = QUEUE_STATS as u32;
        // SAFETY: ks is set up as Published::create does: ks_private is
        // our live Counters, ks_data our QUEUE_STATS entries.
        let refused = unsafe { update::<QUEUE_STATS>(&mut ks, ffi::KSTAT_WRITE) };
        assert_eq!(refused, ffi::EACCES);
        // SAFETY: the same kstat, still pointing at c and data (both live).
        let read = unsafe { update::<QUEUE_STATS>(&mut ks, ffi::KSTAT_READ) };
        assert_eq!(read, 0);
        // SAFETY: every entry is zeroed plain data, so ui64 is initialized
        // (and the update wrote it).
        let v = |s: QueueStat| unsafe { data[s.index()].value.ui64 };
        assert_eq!(v(QueueStat::Completions), 42);
        assert_eq!(v(QueueStat::Doorbells), 4096);
        assert_eq!(v(QueueStat::RingFull), 0);
    }
}
