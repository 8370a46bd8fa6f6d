//! Where the CPU goes while a measurement runs: in the driver, or in the
//! (emulated) kernel around it.
//!
//! The bench wants the driver's own cost per command. The emulated DDI is
//! far more expensive than illumos's (it checks every rule, and its
//! `ddi_dma_sync` copies buffers to guest RAM), and the device model runs
//! inside the doorbell write, so timing whole calls would measure the
//! emulation. Instead every driver entry point the framework calls opens
//! a [`driver`] frame and every kernel function the driver calls opens a
//! [`kernel`] frame; time is charged to the innermost frame's side. The
//! driver's share is its own code only; the number of kernel calls it
//! made is counted, as what illumos charges for them depends on illumos.
//! DTrace probe sites open a [`probe`] frame instead: counted apart, since
//! krtld replaces each `__dtrace_probe_*` call with no-ops when it loads
//! the module (sdt_reloc_resolve, uts/intel/amd64/krtld/kobj_reloc.c), so
//! a disabled probe is no kernel call.
//!
//! Under callgrind (valgrind's instruction counter), the same frames turn
//! instruction collection on and off (`CALLGRIND_TOGGLE_COLLECT`, run with
//! `--collect-atstart=no`), so the instructions callgrind reports are the
//! driver's own. Collection state is per thread in callgrind, as the
//! frames are.
//!
//! Nothing is measured until [`arm`]; unarmed, a frame costs one atomic
//! load.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

static ARMED: AtomicBool = AtomicBool::new(false);
static DRIVER_NS: AtomicU64 = AtomicU64::new(0);
static DRIVER_ENTRIES: AtomicU64 = AtomicU64::new(0);
static KERNEL_CALLS: AtomicU64 = AtomicU64::new(0);
static PROBE_CALLS: AtomicU64 = AtomicU64::new(0);
static SWITCHES: AtomicU64 = AtomicU64::new(0);
/// Count kernel calls per call site too ([`sites`]).
static BY_SITE: AtomicBool = AtomicBool::new(false);
/// Kernel calls per call site (the emulated function's `meter::kernel()`
/// line), while [`count_sites`] is on.
static SITES: std::sync::Mutex<std::collections::BTreeMap<(&'static str, u32), u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Which side a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Driver,
    Kernel,
    /// A DTrace probe site: the kernel's side, counted apart.
    Probe,
}

/// Deepest nesting tracked (driver -> kernel -> driver ... ); deeper
/// frames are charged to the frame at the limit.
const MAX_DEPTH: usize = 64;

struct Stack {
    sides: Vec<Side>,
    /// Frames not pushed because the stack was full.
    overflow: usize,
    since: Instant,
}

thread_local! {
    static IN_DRIVER: Cell<bool> = const { Cell::new(false) };
    static STACK: RefCell<Stack> = RefCell::new(Stack {
        sides: Vec::with_capacity(MAX_DEPTH),
        overflow: 0,
        since: Instant::now(),
    });
}

/// What was measured since the last [`take`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Nanoseconds spent in driver frames.
    pub driver_ns: u64,
    /// Driver entry points called from outside the driver.
    pub driver_entries: u64,
    /// Kernel functions the driver called (probe sites not included).
    pub kernel_calls: u64,
    /// DTrace probe sites the driver passed.
    pub probe_calls: u64,
    /// Side switches (each adds a little bookkeeping to the driver's
    /// share: see [`calibrate`]).
    pub switches: u64,
}

/// Starts (or stops) measuring.
pub fn arm(on: bool) {
    ARMED.store(on, Ordering::SeqCst);
}

/// The counts since the last call, and zeroes them.
pub fn take() -> Reading {
    Reading {
        driver_ns: DRIVER_NS.swap(0, Ordering::SeqCst),
        driver_entries: DRIVER_ENTRIES.swap(0, Ordering::SeqCst),
        kernel_calls: KERNEL_CALLS.swap(0, Ordering::SeqCst),
        probe_calls: PROBE_CALLS.swap(0, Ordering::SeqCst),
        switches: SWITCHES.swap(0, Ordering::SeqCst),
    }
}

/// A frame; closes on drop, on the thread that opened it (not `Send`:
/// the stacks and callgrind's collection state are per thread).
#[must_use = "a frame measures until it is dropped"]
pub struct Frame {
    /// Opened while armed (so it is on the stack).
    pushed: bool,
    side: Side,
    _this_thread: std::marker::PhantomData<*const ()>,
}

/// Opens a driver frame: the framework is about to call a driver entry
/// point.
#[inline(always)]
pub fn driver() -> Frame {
    open(Side::Driver)
}

/// Opens a kernel frame: a DDI or SCSA function the driver called.
#[inline(always)]
#[track_caller]
pub fn kernel() -> Frame {
    let f = open(Side::Kernel);
    if f.pushed && BY_SITE.load(Ordering::Relaxed) {
        count_site(std::panic::Location::caller());
    }
    f
}

/// Counts kernel calls per call site as well (slow: a lock per call; for
/// finding out which calls a command makes, not for timing).
pub fn count_sites(on: bool) {
    BY_SITE.store(on, Ordering::SeqCst);
}

/// Whether [`count_sites`] is on.
pub fn counting_sites() -> bool {
    BY_SITE.load(Ordering::SeqCst)
}

/// The kernel calls per call site (file, line of the emulated function's
/// frame) since the last call, and zeroes them: calls from driver frames
/// only, as [`Reading::kernel_calls`] counts them.
pub fn sites() -> Vec<((&'static str, u32), u64)> {
    let mut m = SITES.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *m).into_iter().collect()
}

#[inline(never)]
fn count_site(at: &'static std::panic::Location<'static>) {
    let from_driver = STACK.with(|s| {
        let s = s.borrow();
        let n = s.sides.len();
        n >= 2 && s.sides[n - 2] == Side::Driver
    });
    if from_driver {
        let mut m = SITES.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((at.file(), at.line())).or_default() += 1;
    }
}

/// Opens a probe frame: the driver passed a DTrace probe site (an `sdt`
/// call illumos turns into no-ops while the probe is disabled).
#[inline(always)]
pub fn probe() -> Frame {
    open(Side::Probe)
}

// The order below keeps the bookkeeping out of the driver's share: leaving
// the driver, collection stops first; entering it, collection starts
// last. What remains (the armed check and one thread-local flag) is
// measured by `calibrate` and taken off.

#[inline(always)]
fn open(side: Side) -> Frame {
    let pushed = ARMED.load(Ordering::Relaxed);
    if pushed {
        if side != Side::Driver && IN_DRIVER.get() {
            valgrind::toggle_collect();
            IN_DRIVER.set(false);
        }
        push(side);
        if side == Side::Driver && !IN_DRIVER.get() {
            IN_DRIVER.set(true);
            valgrind::toggle_collect();
        }
    }
    Frame {
        pushed,
        side,
        _this_thread: std::marker::PhantomData,
    }
}

impl Drop for Frame {
    #[inline(always)]
    fn drop(&mut self) {
        if !self.pushed {
            return;
        }
        if self.side == Side::Driver && IN_DRIVER.get() {
            valgrind::toggle_collect();
            IN_DRIVER.set(false);
        }
        if pop() == Some(Side::Driver) && !IN_DRIVER.get() {
            IN_DRIVER.set(true);
            valgrind::toggle_collect();
        }
    }
}

/// Pushes `side`, charging the time since the last switch (past
/// [`MAX_DEPTH`] the frame is only counted, and charged to the one at the
/// limit).
#[inline(never)]
fn push(side: Side) {
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        if s.sides.len() == MAX_DEPTH {
            s.overflow += 1;
            return;
        }
        let outer = s.sides.last().copied();
        match (outer, side) {
            (Some(Side::Driver), Side::Kernel) => {
                KERNEL_CALLS.fetch_add(1, Ordering::Relaxed);
            }
            (Some(Side::Driver), Side::Probe) => {
                PROBE_CALLS.fetch_add(1, Ordering::Relaxed);
            }
            (Some(Side::Kernel | Side::Probe) | None, Side::Driver) => {
                DRIVER_ENTRIES.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        charge(&mut s, outer, Some(side));
        s.sides.push(side);
    })
}

/// Pops the innermost frame; the side now innermost.
#[inline(never)]
fn pop() -> Option<Side> {
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        if s.overflow > 0 {
            s.overflow -= 1;
            return s.sides.last().copied();
        }
        let inner = s.sides.pop();
        let outer = s.sides.last().copied();
        charge(&mut s, inner, outer);
        outer
    })
}

/// Charges the time since the last switch to `from`'s side when the
/// switch is between the driver and anything else.
fn charge(s: &mut Stack, from: Option<Side>, to: Option<Side>) {
    let from_driver = from == Some(Side::Driver);
    if from_driver == (to == Some(Side::Driver)) {
        return;
    }
    let now = Instant::now();
    if from_driver {
        let ns = now.duration_since(s.since).as_nanos() as u64;
        DRIVER_NS.fetch_add(ns, Ordering::Relaxed);
    }
    SWITCHES.fetch_add(1, Ordering::Relaxed);
    s.since = now;
}

/// An empty kernel function shaped as the emulated DDI functions are: a
/// C-ABI function whose kernel frame opens in its body, so that its own
/// entry and exit (before the frame opens and after it closes, which
/// illumos's function would spend in the kernel) are measured with the
/// meter's.
#[inline(never)]
extern "C" fn empty_kernel_call(_a: usize, _b: isize, _c: usize, _d: u32) -> i32 {
    let _k = kernel();
    0
}

/// [`empty_kernel_call`] without the frame, and so without any body: what
/// calling a function costs the caller (which the driver pays on illumos
/// too). Its arguments are passed (the caller sets them up) and unused in
/// both, so that the two differ by the frame alone.
#[inline(never)]
extern "C" fn empty_plain_call(_a: usize, _b: isize, _c: usize, _d: u32) -> i32 {
    0
}

type EmptyCall = extern "C" fn(usize, isize, usize, u32) -> i32;

fn calls_in_a_driver_frame(f: EmptyCall, n: u32) -> Reading {
    let _ = take();
    arm(true);
    {
        let _d = driver();
        let f = std::hint::black_box(f);
        for i in 0..n {
            std::hint::black_box(f(i as usize, 1, 2, 3));
        }
    }
    arm(false);
    take()
}

/// The cost of the meter itself: `n` calls of an empty kernel function
/// from inside a driver frame (2n switches, plus the frame's own two),
/// armed. Natively, the driver time this charged, less that of
/// [`calibrate_bare`] (the same calls without kernel frames: the
/// caller's share of a call), divided by the difference in switches is
/// what each switch adds to the driver's share; under callgrind, the
/// instructions collected meanwhile (dump them right after) are the same
/// for instructions. Leaves the counters zeroed and the meter disarmed.
pub fn calibrate(n: u32) -> Reading {
    calls_in_a_driver_frame(empty_kernel_call, n)
}

/// [`calibrate`]'s baseline: the same calls, to a function without a
/// kernel frame.
pub fn calibrate_bare(n: u32) -> Reading {
    calls_in_a_driver_frame(empty_plain_call, n)
}

/// Valgrind client requests (valgrind.h, callgrind.h): a no-op sequence
/// natively, a request when running under valgrind.
pub mod valgrind {
    /// `VG_USERREQ__RUNNING_ON_VALGRIND`
    const RUNNING_ON_VALGRIND: u64 = 0x1001;
    /// `VG_USERREQ_TOOL_BASE('C','T')`: callgrind's requests follow in
    /// order DUMP_STATS, ZERO_STATS, TOGGLE_COLLECT, DUMP_STATS_AT.
    const CALLGRIND_BASE: u64 = 0x4354_0000;
    const ZERO_STATS: u64 = CALLGRIND_BASE + 1;
    const TOGGLE_COLLECT: u64 = CALLGRIND_BASE + 2;
    const DUMP_STATS_AT: u64 = CALLGRIND_BASE + 3;

    #[cfg(target_arch = "x86_64")]
    fn request(args: [u64; 6], default: u64) -> u64 {
        let result: u64;
        // SAFETY: the amd64 client-request sequence of valgrind.h. Natively
        // the four rotations of rdi sum to 128 bits (rdi unchanged) and
        // `xchg rbx, rbx` changes nothing, so rdx keeps `default`; under
        // valgrind the sequence reads the six words `args` points to (live
        // for the whole asm block) and writes the result to rdx.
        unsafe {
            std::arch::asm!(
                "rol rdi, 3",
                "rol rdi, 13",
                "rol rdi, 61",
                "rol rdi, 51",
                "xchg rbx, rbx",
                inout("rdx") default => result,
                in("rax") args.as_ptr(),
                out("rdi") _,
                options(nostack),
            );
        }
        result
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn request(_args: [u64; 6], default: u64) -> u64 {
        default
    }

    /// Whether the process runs under valgrind.
    pub fn running() -> bool {
        request([RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0], 0) != 0
    }

    /// Flips callgrind's instruction collection for the calling thread.
    pub fn toggle_collect() {
        request([TOGGLE_COLLECT, 0, 0, 0, 0, 0], 0);
    }

    /// Zeroes callgrind's counters.
    pub fn zero_stats() {
        request([ZERO_STATS, 0, 0, 0, 0, 0], 0);
    }

    /// Writes callgrind's counters to a new dump file, described by
    /// `label`, and zeroes them.
    pub fn dump_stats_at(label: &std::ffi::CStr) {
        request([DUMP_STATS_AT, label.as_ptr() as u64, 0, 0, 0, 0], 0);
    }
}
