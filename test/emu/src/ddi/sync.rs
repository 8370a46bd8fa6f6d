//! `mutex(9F)` and `condvar(9F)`, with the checks the kernel would only
//! catch by deadlocking or panicking: recursive entry and exit by a
//! non-owner (kernel panics in illumos, and here: [`kernel_panic`]),
//! destroy while held, a lock without interrupt priority taken
//! in an interrupt handler, sleeping in interrupt context, a handler
//! returning with a lock held. Each thread's held locks are tracked so
//! that `scsi_hba_pkt_comp` can insist on none.

use super::time::ticks_to_duration;
use super::violation;
use crate::machine::{self, Machine, bump, lock};
use rvscsi::ffi::{clock_t, kcondvar_t, kmutex_t};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::ThreadId;
use std::time::Instant;

struct EmuMutex {
    owner: Mutex<Option<ThreadId>>,
    released: Condvar,
    /// The `arg` of mutex_init: the interrupt priority, 0 for none.
    pri: usize,
    machine: Option<Weak<Machine>>,
}

struct EmuCondvar {
    seq: Mutex<u64>,
    cv: Condvar,
    machine: Option<Weak<Machine>>,
}

static MUTEXES: Mutex<Option<HashMap<usize, Arc<EmuMutex>>>> = Mutex::new(None);
static CONDVARS: Mutex<Option<HashMap<usize, Arc<EmuCondvar>>>> = Mutex::new(None);

thread_local! {
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    static IN_INTERRUPT: Cell<u32> = const { Cell::new(0) };
}

/// Marks the calling thread as running an interrupt handler.
pub fn enter_interrupt_context() {
    if IN_INTERRUPT.with(|c| c.replace(c.get() + 1)) == 0 {
        // A new interrupt: its busy-wait budget starts afresh.
        super::time::begin_interrupt();
    }
}

/// Ends [`enter_interrupt_context`]; a handler may not return holding a lock.
pub fn leave_interrupt_context(m: &Machine) {
    IN_INTERRUPT.with(|c| c.set(c.get().saturating_sub(1)));
    let held = held_locks();
    if held > 0 {
        m.violation(format!("interrupt handler returned holding {held} lock(s)"));
    }
}

/// Ends [`enter_interrupt_context`] without a machine to report to.
pub fn leave_interrupt_context_unchecked() {
    IN_INTERRUPT.with(|c| c.set(c.get().saturating_sub(1)));
}

/// Whether the calling thread is in an interrupt handler.
pub fn in_interrupt() -> bool {
    IN_INTERRUPT.with(|c| c.get() > 0)
}

/// Checks that the caller may block (`what` names the blocking call).
pub fn check_may_sleep(what: &str) {
    if in_interrupt() {
        violation(format!("{what} called in interrupt context (it may sleep)"));
    }
}

/// How many driver locks the calling thread holds.
pub fn held_locks() -> usize {
    HELD.with(|h| h.borrow().len())
}

fn key<T>(p: *const T) -> usize {
    p as usize
}

fn get_mutex(mp: *const kmutex_t, func: &str) -> Option<Arc<EmuMutex>> {
    let m = lock(&MUTEXES)
        .get_or_insert_with(HashMap::new)
        .get(&key(mp))
        .cloned();
    if m.is_none() {
        violation(format!(
            "{func} on a mutex that was never initialized ({mp:p})"
        ));
    }
    m
}

fn machine_of(w: &Option<Weak<Machine>>) -> Option<Arc<Machine>> {
    w.as_ref().and_then(Weak::upgrade)
}

/// `mutex_init(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn mutex_init(mp: *mut kmutex_t, _name: *mut c_char, _typ: c_int, arg: *mut c_void) {
    let _kernel = crate::meter::kernel();
    if mp.is_null() {
        violation("mutex_init(NULL)");
        return;
    }
    let m = machine::current();
    let emu = Arc::new(EmuMutex {
        owner: Mutex::new(None),
        released: Condvar::new(),
        pri: arg as usize,
        machine: m.as_ref().map(Arc::downgrade),
    });
    if lock(&MUTEXES)
        .get_or_insert_with(HashMap::new)
        .insert(key(mp), emu)
        .is_some()
    {
        violation(format!("mutex_init of a live mutex ({mp:p})"));
    } else if let Some(m) = &m {
        bump(&m.live.mutexes, 1);
    }
}

/// `mutex_destroy(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn mutex_destroy(mp: *mut kmutex_t) {
    let _kernel = crate::meter::kernel();
    let Some(emu) = lock(&MUTEXES)
        .get_or_insert_with(HashMap::new)
        .remove(&key(mp))
    else {
        violation(format!("mutex_destroy of an unknown mutex ({mp:p})"));
        return;
    };
    if lock(&emu.owner).is_some() {
        violation("mutex_destroy of a held mutex");
    }
    if let Some(m) = machine_of(&emu.machine) {
        bump(&m.live.mutexes, -1);
    }
}

fn acquire(emu: &EmuMutex, mp: *const kmutex_t) {
    let me = std::thread::current().id();
    let mut owner = lock(&emu.owner);
    if *owner == Some(me) {
        // illumos: mutex_vector_enter (usr/src/uts/common/os/mutex.c)
        // panics "recursive mutex_enter" when the owner of a held adaptive
        // mutex is curthread (the recursive mutex_enter bug of the in-tree
        // pvscsi).
        drop(owner);
        kernel_panic(&format!("recursive mutex_enter ({mp:p})"));
    }
    while owner.is_some() {
        owner = emu.released.wait(owner).unwrap_or_else(|p| p.into_inner());
    }
    *owner = Some(me);
    HELD.with(|h| h.borrow_mut().push(key(mp)));
}

/// What a kernel panic is in the test bed: the violation is recorded and
/// printed, then the process aborts, as the machine would stop. Nothing
/// after it runs: a test cannot pass over it, and one that wants to see it
/// runs the scenario in a child process.
pub fn kernel_panic(what: &str) -> ! {
    violation(format!("panic: {what}"));
    eprintln!("rvscsi-emu: PANIC: {what}");
    std::process::abort()
}

fn release(emu: &EmuMutex, mp: *const kmutex_t, func: &str) {
    let me = std::thread::current().id();
    let mut owner = lock(&emu.owner);
    if *owner != Some(me) {
        drop(owner);
        // illumos: the mutex_exit fast path (usr/src/uts/intel/ml/
        // lock_prim.S) compares the owner with curthread and otherwise
        // calls mutex_vector_exit (usr/src/uts/common/os/mutex.c), which
        // for an adaptive mutex not owned by the caller panics the system
        // with "mutex_exit: not owner". cv_wait and cv_timedwait release
        // the mutex the same way. (A spin mutex, above LOCK_LEVEL, is
        // released without the check there; the driver's locks are below
        // it, and the bed checks every lock.)
        kernel_panic(&format!(
            "mutex_exit: not owner ({func} of a mutex the thread does not hold, {mp:p})"
        ));
    }
    *owner = None;
    emu.released.notify_one();
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(i) = h.iter().rposition(|&k| k == key(mp)) {
            h.remove(i);
        }
    });
}

/// `mutex_enter(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn mutex_enter(mp: *mut kmutex_t) {
    let _kernel = crate::meter::kernel();
    let Some(emu) = get_mutex(mp, "mutex_enter") else {
        return;
    };
    // mutex_vector_enter skips this check in a panic (mutex.c).
    if in_interrupt() && emu.pri == 0 && !super::panic::panicking() {
        violation(
            "a mutex initialized without an interrupt priority was taken in an interrupt handler",
        );
    }
    acquire(&emu, mp);
}

/// `mutex_tryenter(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn mutex_tryenter(mp: *mut kmutex_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(emu) = get_mutex(mp, "mutex_tryenter") else {
        return 0;
    };
    let me = std::thread::current().id();
    let mut owner = lock(&emu.owner);
    if owner.is_some() {
        return 0;
    }
    *owner = Some(me);
    HELD.with(|h| h.borrow_mut().push(key(mp)));
    1
}

/// `mutex_exit(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn mutex_exit(mp: *mut kmutex_t) {
    let _kernel = crate::meter::kernel();
    if let Some(emu) = get_mutex(mp, "mutex_exit") {
        release(&emu, mp, "mutex_exit");
    }
}

/// `mutex_owned(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn mutex_owned(mp: *const kmutex_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(emu) = get_mutex(mp, "mutex_owned") else {
        return 0;
    };
    let owned = *lock(&emu.owner) == Some(std::thread::current().id());
    c_int::from(owned)
}

/// `cv_init(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn cv_init(
    cvp: *mut kcondvar_t,
    _name: *mut c_char,
    _typ: c_int,
    _arg: *mut c_void,
) {
    let _kernel = crate::meter::kernel();
    if cvp.is_null() {
        violation("cv_init(NULL)");
        return;
    }
    let m = machine::current();
    let cv = Arc::new(EmuCondvar {
        seq: Mutex::new(0),
        cv: Condvar::new(),
        machine: m.as_ref().map(Arc::downgrade),
    });
    if lock(&CONDVARS)
        .get_or_insert_with(HashMap::new)
        .insert(key(cvp), cv)
        .is_some()
    {
        violation("cv_init of a live condition variable");
    } else if let Some(m) = &m {
        bump(&m.live.condvars, 1);
    }
}

/// `cv_destroy(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn cv_destroy(cvp: *mut kcondvar_t) {
    let _kernel = crate::meter::kernel();
    match lock(&CONDVARS)
        .get_or_insert_with(HashMap::new)
        .remove(&key(cvp))
    {
        Some(cv) => {
            if let Some(m) = machine_of(&cv.machine) {
                bump(&m.live.condvars, -1);
            }
        }
        None => violation("cv_destroy of an unknown condition variable"),
    }
}

fn get_cv(cvp: *const kcondvar_t, func: &str) -> Option<Arc<EmuCondvar>> {
    let cv = lock(&CONDVARS)
        .get_or_insert_with(HashMap::new)
        .get(&key(cvp))
        .cloned();
    if cv.is_none() {
        violation(format!("{func} on an uninitialized condition variable"));
    }
    cv
}

/// Waits on `cvp`, releasing `mp`, until signalled or `deadline`; false on
/// timeout.
fn wait(cvp: *mut kcondvar_t, mp: *mut kmutex_t, deadline: Option<Instant>, func: &str) -> bool {
    check_may_sleep(func);
    let (Some(cv), Some(emu)) = (get_cv(cvp, func), get_mutex(mp, func)) else {
        return false;
    };
    let mut seq = lock(&cv.seq);
    let start = *seq;
    release(&emu, mp, func);
    let mut signalled = true;
    while *seq == start {
        match deadline {
            None => seq = cv.cv.wait(seq).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    signalled = false;
                    break;
                }
                seq = cv
                    .cv
                    .wait_timeout(seq, d - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
    drop(seq);
    acquire(&emu, mp);
    signalled
}

/// `cv_wait(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn cv_wait(cvp: *mut kcondvar_t, mp: *mut kmutex_t) {
    let _kernel = crate::meter::kernel();
    wait(cvp, mp, None, "cv_wait");
}

/// `cv_reltimedwait(9F)`: -1 on timeout, else the ticks left (at least 1).
#[unsafe(no_mangle)]
pub extern "C" fn cv_reltimedwait(
    cvp: *mut kcondvar_t,
    mp: *mut kmutex_t,
    delta: clock_t,
    _res: c_int,
) -> clock_t {
    let _kernel = crate::meter::kernel();
    let d = Instant::now() + ticks_to_duration(delta.max(0));
    if wait(cvp, mp, Some(d), "cv_reltimedwait") {
        super::time::duration_to_ticks(d.saturating_duration_since(Instant::now())).max(1)
    } else {
        -1
    }
}

/// `cv_timedwait(9F)`: `abstime` in lbolt ticks.
#[unsafe(no_mangle)]
pub extern "C" fn cv_timedwait(
    cvp: *mut kcondvar_t,
    mp: *mut kmutex_t,
    abstime: clock_t,
) -> clock_t {
    let _kernel = crate::meter::kernel();
    let now = super::time::ddi_get_lbolt();
    cv_reltimedwait(cvp, mp, abstime - now, 0)
}

/// `cv_signal(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn cv_signal(cvp: *mut kcondvar_t) {
    let _kernel = crate::meter::kernel();
    if let Some(cv) = get_cv(cvp, "cv_signal") {
        *lock(&cv.seq) += 1;
        cv.cv.notify_one();
    }
}

/// `cv_broadcast(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn cv_broadcast(cvp: *mut kcondvar_t) {
    let _kernel = crate::meter::kernel();
    if let Some(cv) = get_cv(cvp, "cv_broadcast") {
        *lock(&cv.seq) += 1;
        cv.cv.notify_all();
    }
}
