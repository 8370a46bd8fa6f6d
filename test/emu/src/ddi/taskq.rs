//! Task queues (`ddi_taskq_create(9F)`): one worker thread each.

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
}

struct TaskQ {
    state: Mutex<Queue>,
    cv: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    machine: Arc<Machine>,
}

static TASKQS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn get<'a>(tq: *mut ddi_taskq_t, func: &str) -> Option<&'a TaskQ> {
    if tq.is_null() || !lock(&TASKQS).contains(&(tq as usize)) {
        violation(format!("{func} on an unknown task queue"));
        return None;
    }
    // SAFETY: registered task queues are live boxes.
    Some(unsafe { &*tq.cast::<TaskQ>() })
}

fn worker(q: &TaskQ) {
    let _g = set_current(&q.machine);
    let mut s = lock(&q.state);
    loop {
        if let Some((f, a)) = s.tasks.pop_front() {
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
        } else if s.closing {
            return;
        } else {
            s = q.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Whether every task queue of machine `m` is empty and idle.
pub fn all_idle(m: &Arc<Machine>) -> bool {
    let qs: Vec<usize> = lock(&TASKQS).clone();
    qs.into_iter().all(|a| {
        // SAFETY: registered task queues are live boxes (destroy
        // unregisters before freeing, under the same lock order).
        let q = unsafe { &*(a as *const TaskQ) };
        if !Arc::ptr_eq(&q.machine, m) {
            return true;
        }
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
    let q = Box::new(TaskQ {
        state: Mutex::new(Queue {
            tasks: VecDeque::new(),
            running: false,
            closing: false,
        }),
        cv: Condvar::new(),
        thread: Mutex::new(None),
        machine: n.machine.clone(),
    });
    let p = Box::into_raw(q);
    let addr = p as usize;
    let h = std::thread::Builder::new()
        .name("emu-taskq".into())
        // SAFETY: the box lives until ddi_taskq_destroy joins this thread.
        .spawn(move || worker(unsafe { &*(addr as *const TaskQ) }))
        .expect("a task queue thread");
    // SAFETY: just created.
    *lock(unsafe { &(*p).thread }) = Some(h);
    lock(&TASKQS).push(addr);
    bump(&n.machine.live.taskqs, 1);
    p.cast()
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
    let mut s = lock(&q.state);
    while !s.tasks.is_empty() || s.running {
        s = q.cv.wait(s).unwrap_or_else(|p| p.into_inner());
    }
}

/// `ddi_taskq_destroy(9F)`: waits for the queued tasks, then frees.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_taskq_destroy(tq: *mut ddi_taskq_t) {
    let _kernel = crate::meter::kernel();
    ddi_taskq_wait(tq);
    let Some(q) = get(tq, "ddi_taskq_destroy") else {
        return;
    };
    lock(&q.state).closing = true;
    q.cv.notify_all();
    if let Some(h) = lock(&q.thread).take() {
        let _ = h.join();
    }
    lock(&TASKQS).retain(|&a| a != tq as usize);
    bump(&q.machine.live.taskqs, -1);
    // SAFETY: unregistered, worker joined: nobody uses it any more.
    drop(unsafe { Box::from_raw(tq.cast::<TaskQ>()) });
}
