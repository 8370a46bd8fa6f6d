//! Time and timers: `ddi_get_lbolt(9F)`, `gethrtime(9F)`, `drv_usectohz(9F)`,
//! `drv_usecwait(9F)`, `delay(9F)`, `timeout(9F)`, `ddi_periodic_add(9F)`.
//! The clock ticks at `HZ` = 100, as illumos does by default.

use super::sync::{check_may_sleep, enter_interrupt_context, leave_interrupt_context};
use super::violation;
use crate::machine::{self, Machine, bump, lock, set_current};
use rvscsi::ffi::{clock_t, ddi_periodic_t, hrtime_t, timeout_id_t};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Clock ticks per second.
pub const HZ: i64 = 100;
const USEC_PER_TICK: i64 = 1_000_000 / HZ;

static BOOT: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Ticks to a duration.
pub fn ticks_to_duration(t: i64) -> Duration {
    Duration::from_micros((t.max(0) as u64).saturating_mul(USEC_PER_TICK as u64))
}

/// A duration to whole ticks (rounded up).
pub fn duration_to_ticks(d: Duration) -> i64 {
    let us = d.as_micros() as i64;
    (us + USEC_PER_TICK - 1) / USEC_PER_TICK
}

/// `ddi_get_lbolt(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_get_lbolt() -> clock_t {
    let _kernel = crate::meter::kernel();
    (BOOT.elapsed().as_micros() as i64) / USEC_PER_TICK
}

/// `ddi_get_lbolt64(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_get_lbolt64() -> i64 {
    let _kernel = crate::meter::kernel();
    ddi_get_lbolt()
}

/// `gethrtime(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn gethrtime() -> hrtime_t {
    let _kernel = crate::meter::kernel();
    BOOT.elapsed().as_nanos() as i64
}

/// `drv_usectohz(9F)` (rounds up, as illumos does).
#[unsafe(no_mangle)]
pub extern "C" fn drv_usectohz(us: clock_t) -> clock_t {
    let _kernel = crate::meter::kernel();
    if us <= 0 {
        0
    } else {
        (us + USEC_PER_TICK - 1) / USEC_PER_TICK
    }
}

/// `drv_hztousec(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn drv_hztousec(ticks: clock_t) -> clock_t {
    let _kernel = crate::meter::kernel();
    ticks.saturating_mul(USEC_PER_TICK)
}

/// Busy waiting one interrupt (a handler invocation, a soft interrupt) may
/// do in all, in microseconds. drv_usecwait(9F) may be called in interrupt
/// context but "wastes processor time ... only for as much time as
/// needed" (NOTES), and while an interrupt thread spins, the interrupts
/// at or below its level wait on that CPU: a handler that polls a device
/// for milliseconds (10 µs at a time or not) stalls the system. A
/// millisecond is far beyond any register handshake a handler needs.
pub const INTERRUPT_SPIN_LIMIT_US: i64 = 1000;

thread_local! {
    /// Busy waiting in the current interrupt so far, and whether it was
    /// already reported.
    static INTERRUPT_SPIN: std::cell::Cell<(i64, bool)> = const { std::cell::Cell::new((0, false)) };
}

/// A new interrupt starts on the calling thread (called by
/// [`super::sync::enter_interrupt_context`] on its outermost entry).
pub fn begin_interrupt() {
    INTERRUPT_SPIN.with(|c| c.set((0, false)));
}

/// `drv_usecwait(9F)`: busy-waits in the kernel; here short waits spin
/// and longer ones yield the CPU (the other core runs QEMU). In interrupt
/// context, a single wait of a millisecond or more, or more than
/// [`INTERRUPT_SPIN_LIMIT_US`] of waits in one interrupt, is a violation.
#[unsafe(no_mangle)]
pub extern "C" fn drv_usecwait(us: clock_t) {
    let _kernel = crate::meter::kernel();
    if us <= 0 {
        return;
    }
    // A crash dump polls the device from wherever the panic happened.
    if super::sync::in_interrupt() && !super::panic::panicking() {
        let (total, reported) = INTERRUPT_SPIN.with(|c| {
            let (t, r) = c.get();
            let t = t.saturating_add(us);
            c.set((t, r || t > INTERRUPT_SPIN_LIMIT_US));
            (t, r)
        });
        if us >= 1000 {
            violation(format!(
                "drv_usecwait({us}) in interrupt context: a millisecond or more of busy waiting"
            ));
        } else if total > INTERRUPT_SPIN_LIMIT_US && !reported {
            violation(format!(
                "more than {INTERRUPT_SPIN_LIMIT_US} us of drv_usecwait in one interrupt \
                 (a handler polling the device)"
            ));
        }
    }
    let d = Duration::from_micros(us as u64);
    if us < 20 {
        let end = Instant::now() + d;
        while Instant::now() < end {
            std::hint::spin_loop();
        }
    } else {
        std::thread::sleep(d);
    }
}

/// `delay(9F)`: "can be called from user and kernel contexts" (its
/// CONTEXT section; drv_usecwait(9F): delay "cannot be used at interrupt
/// time"): a violation in interrupt context.
#[unsafe(no_mangle)]
pub extern "C" fn delay(ticks: clock_t) {
    let _kernel = crate::meter::kernel();
    check_may_sleep("delay");
    if super::panic::panicking() {
        // clock() does nothing once panicstr is set: lbolt stands still
        // and the wakeup never comes (uts/common/os/clock.c).
        violation("delay(9F) during a panic: the clock no longer runs, it never returns");
        return;
    }
    std::thread::sleep(ticks_to_duration(ticks));
}

// ---- timeout(9F) ----------------------------------------------------------

type Callback = unsafe extern "C" fn(*mut c_void);

struct Timer {
    due: Instant,
    func: Callback,
    arg: usize,
    machine: Option<Arc<Machine>>,
}

#[derive(Default)]
struct Timers {
    pending: HashMap<u64, Timer>,
    /// The id of the callback running now, if any.
    running: Option<u64>,
}

static TIMERS: LazyLock<(Mutex<Timers>, Condvar)> = LazyLock::new(|| {
    std::thread::Builder::new()
        .name("emu-timeout".into())
        .spawn(timer_thread)
        .expect("the emulation's timer thread");
    (Mutex::new(Timers::default()), Condvar::new())
});
static NEXT_TIMER: AtomicU64 = AtomicU64::new(1);

fn timer_thread() {
    let (m, c) = &*TIMERS;
    let mut t = lock(m);
    loop {
        let now = Instant::now();
        let due = t
            .pending
            .iter()
            .filter(|(_, x)| x.due <= now)
            .map(|(&id, _)| id)
            .next();
        if let Some(id) = due {
            let Some(timer) = t.pending.remove(&id) else {
                continue;
            };
            t.running = Some(id);
            drop(t);
            if let Some(mm) = &timer.machine {
                bump(&mm.live.timeouts, -1);
            }
            let _g = timer.machine.as_ref().map(set_current);
            // Timeout callbacks run at soft-interrupt level: no sleeping.
            enter_interrupt_context();
            {
                let _m = crate::meter::driver();
                // SAFETY: the driver registered func/arg with timeout(9F) and
                // has not cancelled it (untimeout waits for a running one).
                unsafe { (timer.func)(timer.arg as *mut c_void) };
            }
            if let Some(mm) = &timer.machine {
                leave_interrupt_context(mm);
            } else {
                super::sync::leave_interrupt_context_unchecked();
            }
            t = lock(m);
            t.running = None;
            c.notify_all();
            continue;
        }
        let next = t.pending.values().map(|x| x.due).min();
        t = match next {
            Some(d) => {
                c.wait_timeout(t, d.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => c.wait(t).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

/// `timeout(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn timeout(func: Callback, arg: *mut c_void, ticks: clock_t) -> timeout_id_t {
    let _kernel = crate::meter::kernel();
    let id = NEXT_TIMER.fetch_add(1, Ordering::Relaxed);
    let m = machine::current();
    if let Some(m) = &m {
        bump(&m.live.timeouts, 1);
    }
    let (tm, c) = &*TIMERS;
    lock(tm).pending.insert(
        id,
        Timer {
            due: Instant::now() + ticks_to_duration(ticks),
            func,
            arg: arg as usize,
            machine: m,
        },
    );
    c.notify_all();
    id as timeout_id_t
}

/// `untimeout(9F)`: cancels, or waits for a callback already running.
#[unsafe(no_mangle)]
pub extern "C" fn untimeout(id: timeout_id_t) -> clock_t {
    let _kernel = crate::meter::kernel();
    let id = id as u64;
    let (tm, c) = &*TIMERS;
    let mut t = lock(tm);
    if let Some(x) = t.pending.remove(&id) {
        if let Some(m) = &x.machine {
            bump(&m.live.timeouts, -1);
        }
        return duration_to_ticks(x.due.saturating_duration_since(Instant::now()));
    }
    while t.running == Some(id) {
        t = c.wait(t).unwrap_or_else(|p| p.into_inner());
    }
    -1
}

// ---- ddi_periodic_add(9F) ---------------------------------------------------

struct Periodic {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    machine: Option<Arc<Machine>>,
    ticks: Arc<HeldTicks>,
}

/// A periodic's ticks while a test holds its machine's periodics
/// ([`hold_periodics`]): how many the test asked for, how many ran.
#[derive(Default)]
struct HeldTicks {
    counts: Mutex<(u64, u64)>,
    changed: Condvar,
}

/// Machines (by address) whose periodics only tick when the test fires
/// them ([`hold_periodics`]).
static HELD_MACHINES: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn machine_key(m: &Arc<Machine>) -> usize {
    Arc::as_ptr(m) as usize
}

fn is_held(m: Option<&Arc<Machine>>) -> bool {
    m.is_some_and(|m| lock(&HELD_MACHINES).contains(&machine_key(m)))
}

/// While alive, the periodics of its machine run only when
/// [`fire_periodics`] asks, one tick per call, instead of on their own
/// clock. illumos never promises when a periodic runs (ddi_periodic_add(9F):
/// "the exact time interval ... cannot be guaranteed"; level-0 handlers go
/// through a task queue, usr/src/uts/common/os/ddi_periodic.c), so a test
/// that decides when the ticks come is one schedule the kernel may
/// produce, and its assertions then count ticks instead of racing a clock.
/// Dropping it gives the periodics back their clock.
#[must_use = "the periodics tick on their own again when this is dropped"]
pub struct PeriodicHold {
    machine: Arc<Machine>,
}

/// Holds `m`'s periodics (see [`PeriodicHold`]), those added later too.
/// A tick already running finishes; none starts on its own after this
/// returns.
pub fn hold_periodics(m: &Arc<Machine>) -> PeriodicHold {
    let mut held = lock(&HELD_MACHINES);
    if !held.contains(&machine_key(m)) {
        held.push(machine_key(m));
    }
    drop(held);
    // A tick that had already passed its hold check runs to completion
    // first: wait until every periodic of `m` is between ticks.
    for p in machine_periodics(m) {
        let _c = lock(&p.counts);
    }
    PeriodicHold { machine: m.clone() }
}

impl Drop for PeriodicHold {
    fn drop(&mut self) {
        let key = machine_key(&self.machine);
        lock(&HELD_MACHINES).retain(|&k| k != key);
        for p in machine_periodics(&self.machine) {
            p.changed.notify_all();
        }
    }
}

fn machine_periodics(m: &Arc<Machine>) -> Vec<Arc<HeldTicks>> {
    lock(&PERIODICS)
        .get_or_insert_with(HashMap::new)
        .values()
        .filter(|p| p.machine.as_ref().is_some_and(|pm| Arc::ptr_eq(pm, m)))
        .map(|p| p.ticks.clone())
        .collect()
}

/// How long [`fire_periodics`] waits for a tick before it calls the test
/// hung: a hang guard, far beyond any tick's run time.
const FIRE_GUARD: Duration = Duration::from_secs(120);

/// Runs one tick of each of `hold`'s machine's periodics, each on its own
/// thread as the kernel would, and returns once they have all finished;
/// the number of periodics that ticked. Panics (the test is hung) if one
/// does not finish within a generous guard.
pub fn fire_periodics(hold: &PeriodicHold) -> usize {
    let all = machine_periodics(&hold.machine);
    let mut targets = Vec::with_capacity(all.len());
    for p in &all {
        let mut c = lock(&p.counts);
        c.0 += 1;
        targets.push(c.0);
        p.changed.notify_all();
    }
    for (p, target) in all.iter().zip(targets) {
        let start = Instant::now();
        let mut c = lock(&p.counts);
        while c.1 < target {
            let left = FIRE_GUARD.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "a held periodic's tick did not finish within {FIRE_GUARD:?}"
            );
            c = p
                .changed
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    all.len()
}

static PERIODICS: Mutex<Option<HashMap<u64, Periodic>>> = Mutex::new(None);
static NEXT_PERIODIC: AtomicU64 = AtomicU64::new(1);

/// `ddi_periodic_add(9F)`: calls `func(arg)` every `interval` ns in kernel
/// context (level 0) on its own thread.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_periodic_add(
    func: Callback,
    arg: *mut c_void,
    interval: hrtime_t,
    level: c_int,
) -> ddi_periodic_t {
    let _kernel = crate::meter::kernel();
    if level != 0 {
        violation("ddi_periodic_add at an interrupt level (the driver asks for level 0)");
    }
    let id = NEXT_PERIODIC.fetch_add(1, Ordering::Relaxed);
    let m = machine::current();
    if let Some(m) = &m {
        bump(&m.live.periodics, 1);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ticks = Arc::new(HeldTicks::default());
    let (s2, m2, a, t2) = (stop.clone(), m.clone(), arg as usize, ticks.clone());
    let interval = Duration::from_nanos(interval.max(1_000_000) as u64);
    let thread = std::thread::Builder::new()
        .name("emu-periodic".into())
        .spawn(move || {
            let _g = m2.as_ref().map(set_current);
            let mut next = Instant::now() + interval;
            while !s2.load(Ordering::Acquire) {
                // Held (a test fires the ticks): the hold check and the
                // tick happen under the tick counts' lock, so that
                // hold_periodics can wait out a tick that has begun.
                let mut c = lock(&t2.counts);
                if is_held(m2.as_ref()) {
                    if c.1 < c.0 {
                        {
                            let _m = crate::meter::driver();
                            // SAFETY: registered by the driver;
                            // ddi_periodic_delete joins this thread before
                            // returning.
                            unsafe { func(a as *mut c_void) };
                        }
                        c.1 += 1;
                        t2.changed.notify_all();
                    } else {
                        // Woken by a fire, a release or (to see a stop)
                        // every few milliseconds.
                        let _ = t2.changed.wait_timeout(c, Duration::from_millis(5));
                    }
                    next = Instant::now() + interval;
                    continue;
                }
                let now = Instant::now();
                if now < next {
                    drop(c);
                    std::thread::park_timeout((next - now).min(Duration::from_millis(5)));
                    continue;
                }
                next += interval;
                {
                    let _m = crate::meter::driver();
                    // SAFETY: registered by the driver; ddi_periodic_delete
                    // joins this thread before returning.
                    unsafe { func(a as *mut c_void) };
                }
                // The tick counts' lock (`c`) is held over the tick, so a
                // hold waits for it.
                drop(c);
            }
        })
        .expect("a periodic thread");
    lock(&PERIODICS).get_or_insert_with(HashMap::new).insert(
        id,
        Periodic {
            stop,
            thread,
            machine: m,
            ticks,
        },
    );
    id as ddi_periodic_t
}

/// `ddi_periodic_delete(9F)`: returns after a running call finished.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_periodic_delete(req: ddi_periodic_t) {
    let _kernel = crate::meter::kernel();
    let Some(p) = lock(&PERIODICS)
        .get_or_insert_with(HashMap::new)
        .remove(&(req as u64))
    else {
        violation("ddi_periodic_delete of an unknown request");
        return;
    };
    if p.thread.thread().id() == std::thread::current().id() {
        violation("ddi_periodic_delete from its own handler (the kernel would deadlock)");
        return;
    }
    p.stop.store(true, Ordering::Release);
    p.thread.thread().unpark();
    let _ = p.thread.join();
    if let Some(m) = &p.machine {
        bump(&m.live.periodics, -1);
    }
}

#[cfg(test)]
mod periodic_hold_tests {
    use super::*;
    use crate::machine::{Backend, MachineConfig, VirtioPci};

    static TICKS: AtomicU64 = AtomicU64::new(0);

    extern "C" fn count_tick(_arg: *mut c_void) {
        TICKS.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits (bounded: a hang guard) until the periodic has ticked past
    /// `at_least` on its own clock.
    fn ticks_on_its_own_past(at_least: u64) {
        let start = Instant::now();
        while TICKS.load(Ordering::SeqCst) <= at_least {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the periodic never ticked on its own"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_held_periodic_ticks_only_when_fired() {
        let mut config = MachineConfig::virtio_scsi(Vec::new());
        config.backend = Backend::Memory;
        config.virtio = VirtioPci::ModernOnly;
        let m = Machine::launch(config).expect("an in-memory machine");
        let _current = set_current(&m);
        let id = ddi_periodic_add(count_tick, core::ptr::null_mut(), 1_000_000, 0);
        ticks_on_its_own_past(0);
        let hold = hold_periodics(&m);
        let held_at = TICKS.load(Ordering::SeqCst);
        // Many intervals of the periodic's own clock pass: none ticks.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(TICKS.load(Ordering::SeqCst), held_at, "no tick while held");
        assert_eq!(fire_periodics(&hold), 1, "the one periodic of the machine");
        assert_eq!(
            TICKS.load(Ordering::SeqCst),
            held_at + 1,
            "one tick per fire"
        );
        assert_eq!(fire_periodics(&hold), 1);
        assert_eq!(TICKS.load(Ordering::SeqCst), held_at + 2);
        drop(hold);
        ticks_on_its_own_past(held_at + 2);
        ddi_periodic_delete(id);
    }
}
