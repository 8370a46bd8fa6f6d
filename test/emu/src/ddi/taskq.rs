//! Task queues (`ddi_taskq_create(9F)`): one worker thread each.
//!
//! As taskq(9F) and usr/src/uts/common/os/taskq.c: `ddi_taskq_wait`
//! waits until the queue is empty and no task runs, and stops no new
//! dispatch; `ddi_taskq_destroy` waits the same way and then frees the
//! queue, the caller guaranteeing that nothing is dispatched any more
//! (taskq_destroy ASSERTs the queue empty after its wait). A task thread
//! may be scheduled late: a test can hold the tasks of a machine back
//! ([`hold_tasks`]) until someone waits for them, and run code right
//! after a driver's `ddi_taskq_wait` returns ([`after_wait`]), to put an
//! interrupt or a dispatch in the window a teardown leaves.

use super::devinfo::node;
use super::sync::check_may_sleep;
use super::violation;
use crate::machine::{Machine, bump, lock, set_current};
use rvscsi::ffi::{self, ddi_taskq_t, dev_info_t, pri_t};
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::{Arc, Condvar, Mutex};

type Task = (unsafe extern "C" fn(*mut c_void), usize);

struct Queue {
    tasks: VecDeque<Task>,
    running: bool,
    closing: bool,
    /// Queued tasks wait (the thread is not scheduled) until a
    /// `ddi_taskq_wait` or `ddi_taskq_destroy` on the queue.
    held: bool,
}

struct TaskQ {
    state: Mutex<Queue>,
    cv: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    machine: Arc<Machine>,
}

/// The live task queues, by the handle the driver holds (the address of
/// the `TaskQ`). Each caller takes its own reference under the lock: a
/// `ddi_taskq_destroy` on another thread (tests run in parallel) only
/// drops the registry's, so a queue found here stays allocated for as
/// long as its finder uses it.
static TASKQS: Mutex<Vec<(usize, Arc<TaskQ>)>> = Mutex::new(Vec::new());

fn get(tq: *mut ddi_taskq_t, func: &str) -> Option<Arc<TaskQ>> {
    let found = lock(&TASKQS)
        .iter()
        .find(|(a, _)| *a == tq as usize)
        .map(|(_, q)| q.clone());
    if found.is_none() {
        violation(format!("{func} on an unknown task queue"));
    }
    found
}

/// The task queues of machine `m` (references taken under the registry
/// lock).
fn queues_of(m: &Arc<Machine>) -> Vec<Arc<TaskQ>> {
    lock(&TASKQS)
        .iter()
        .filter(|(_, q)| Arc::ptr_eq(&q.machine, m))
        .map(|(_, q)| q.clone())
        .collect()
}

fn worker(q: &TaskQ) {
    let _g = set_current(&q.machine);
    let mut s = lock(&q.state);
    loop {
        let next = if s.held { None } else { s.tasks.pop_front() };
        if let Some((f, a)) = next {
            s.running = true;
            drop(s);
            {
                let _m = crate::meter::driver();
                // SAFETY: dispatched by the driver with this argument;
                // ddi_taskq_destroy waits for the queue before freeing it.
                unsafe { f(a as *mut c_void) };
            }
            s = lock(&q.state);
            s.running = false;
            q.cv.notify_all();
        } else if s.closing && s.tasks.is_empty() {
            return;
        } else {
            s = q.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Whether every task queue of machine `m` is empty and idle.
pub fn all_idle(m: &Arc<Machine>) -> bool {
    queues_of(m).into_iter().all(|q| {
        let s = lock(&q.state);
        s.tasks.is_empty() && !s.running
    })
}

/// `ddi_taskq_create(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_taskq_create(
    dip: *mut dev_info_t,
    _name: *const c_char,
    _nthreads: c_int,
    _pri: pri_t,
    _cflags: c_uint,
) -> *mut ddi_taskq_t {
    let _kernel = crate::meter::kernel();
    check_may_sleep("ddi_taskq_create");
    let Some(n) = node(dip, "ddi_taskq_create") else {
        return std::ptr::null_mut();
    };
    let q = Arc::new(TaskQ {
        state: Mutex::new(Queue {
            tasks: VecDeque::new(),
            running: false,
            closing: false,
            held: false,
        }),
        cv: Condvar::new(),
        thread: Mutex::new(None),
        machine: n.machine.clone(),
    });
    let addr = Arc::as_ptr(&q) as usize;
    let mine = q.clone();
    let h = std::thread::Builder::new()
        .name("emu-taskq".into())
        .spawn(move || worker(&mine))
        .expect("a task queue thread");
    *lock(&q.thread) = Some(h);
    lock(&TASKQS).push((addr, q));
    bump(&n.machine.live.taskqs, 1);
    addr as *mut ddi_taskq_t
}

/// `ddi_taskq_dispatch(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_taskq_dispatch(
    tq: *mut ddi_taskq_t,
    func: unsafe extern "C" fn(*mut c_void),
    arg: *mut c_void,
    dflags: c_uint,
) -> c_int {
    let _kernel = crate::meter::kernel();
    if dflags != ffi::DDI_NOSLEEP as c_uint {
        check_may_sleep("ddi_taskq_dispatch(DDI_SLEEP)");
    }
    let Some(q) = get(tq, "ddi_taskq_dispatch") else {
        return ffi::DDI_FAILURE;
    };
    let mut s = lock(&q.state);
    if s.closing {
        violation("ddi_taskq_dispatch to a task queue being destroyed");
        return ffi::DDI_FAILURE;
    }
    s.tasks.push_back((func, arg as usize));
    q.cv.notify_all();
    ffi::DDI_SUCCESS
}

/// `ddi_taskq_wait(9F)`: until every dispatched task has run.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_taskq_wait(tq: *mut ddi_taskq_t) {
    let _kernel = crate::meter::kernel();
    check_may_sleep("ddi_taskq_wait");
    let Some(q) = get(tq, "ddi_taskq_wait") else {
        return;
    };
    if lock(&q.thread)
        .as_ref()
        .is_some_and(|h| h.thread().id() == std::thread::current().id())
    {
        violation("ddi_taskq_wait from a task of the same queue (the kernel would deadlock)");
        return;
    }
    {
        let mut s = lock(&q.state);
        // Whoever waits gets the tasks run.
        s.held = false;
        q.cv.notify_all();
        while !s.tasks.is_empty() || s.running {
            s = q.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
    run_after_wait_hooks(&q.machine);
}

/// Code a test runs right after a `ddi_taskq_wait` of machine `m` returns.
type WaitHook = Arc<Mutex<Box<dyn FnMut() + Send>>>;

static WAIT_HOOKS: Mutex<Vec<(std::sync::Weak<Machine>, WaitHook)>> = Mutex::new(Vec::new());

/// Runs `hook` on the waiting thread each time a `ddi_taskq_wait` on one
/// of machine `m`'s queues (also the one inside `ddi_taskq_destroy`) has
/// finished waiting, before it returns to the driver: the moment a
/// teardown has drained its queue and goes on. The hook must not wait for
/// a task queue itself.
pub fn after_wait(m: &Arc<Machine>, hook: impl FnMut() + Send + 'static) {
    let mut hooks = lock(&WAIT_HOOKS);
    hooks.retain(|(w, _)| w.strong_count() > 0);
    hooks.push((Arc::downgrade(m), Arc::new(Mutex::new(Box::new(hook)))));
}

fn run_after_wait_hooks(m: &Arc<Machine>) {
    let mine: Vec<WaitHook> = lock(&WAIT_HOOKS)
        .iter()
        .filter(|(w, _)| w.upgrade().is_some_and(|w| Arc::ptr_eq(&w, m)))
        .map(|(_, h)| h.clone())
        .collect();
    for h in mine {
        // A hook already running (on another thread) is not run again.
        if let Ok(mut f) = h.try_lock() {
            f();
        }
    }
}

/// Holds back (true) or lets run (false) the queued tasks of every task
/// queue of machine `m`, as a task thread that does not get a CPU; a
/// `ddi_taskq_wait` or `ddi_taskq_destroy` on a queue lets its tasks run.
pub fn hold_tasks(m: &Arc<Machine>, on: bool) {
    for q in queues_of(m) {
        lock(&q.state).held = on;
        q.cv.notify_all();
    }
}

/// `ddi_taskq_destroy(9F)`: waits for the queued tasks, then frees.
///
/// As taskq_destroy (usr/src/uts/common/os/taskq.c): it first waits
/// (taskq_wait), so tasks still queued when it is called are fine; only
/// then does it ASSERT the queue empty and no task active (tq_task list
/// empty, tq_active == 0). So what is a violation here is a task
/// dispatched while the wait ran or after it: a dispatch racing the
/// destroy, which on the kernel runs on (or corrupts) a freed queue.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_taskq_destroy(tq: *mut ddi_taskq_t) {
    let _kernel = crate::meter::kernel();
    ddi_taskq_wait(tq);
    let Some(q) = get(tq, "ddi_taskq_destroy") else {
        return;
    };
    {
        let mut s = lock(&q.state);
        // The ASSERT after taskq_wait: a task dispatched since the wait
        // began would run on a freed queue (here it still runs, after the
        // violation, so the test can finish).
        if !s.tasks.is_empty() || s.running {
            drop(s);
            violation(
                "ddi_taskq_destroy: a task was dispatched while the queue was being destroyed \
                 (taskq(9F): the caller must guarantee that no new tasks are scheduled)",
            );
            s = lock(&q.state);
        }
        s.held = false;
        s.closing = true;
    }
    q.cv.notify_all();
    if let Some(h) = lock(&q.thread).take() {
        let _ = h.join();
    }
    lock(&TASKQS).retain(|(a, _)| *a != tq as usize);
    bump(&q.machine.live.taskqs, -1);
    // The last reference goes with the last user (the worker's went with
    // its thread).
}
