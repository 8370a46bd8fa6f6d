//! A task queue (`ddi_taskq_create(9F)`): where work that may block
//! (discovery, recovery, task management) runs, out of interrupt context.
//!
//! What the DDI promises, and what it leaves to the driver (taskq(9F);
//! usr/src/uts/common/os/taskq.c):
//! - `ddi_taskq_wait` waits for every task dispatched before it, "but does
//!   not stop any new task dispatches": a task dispatched while (or just
//!   after) it waits runs later, perhaps after the caller freed what the
//!   task uses;
//! - `ddi_taskq_destroy` waits for the scheduled tasks, then frees the
//!   queue; "the caller should guarantee that no new tasks are scheduled
//!   for the closing taskq" (a dispatch to a destroyed queue uses freed
//!   memory).
//!
//! So the queue here can be closed ([`TaskQueue::close`]): from then on
//! [`TaskQueue::dispatch`] refuses, and the owner's teardown can make sure
//! that nothing can dispatch any more before it waits and destroys.

use super::{DdiError, Dip};
use crate::ffi;
use core::ffi::{CStr, c_void};
use core::sync::atomic::{AtomicBool, Ordering};

/// A single-threaded task queue, destroyed (after its tasks ran) on drop.
pub struct TaskQueue {
    tq: *mut ffi::ddi_taskq_t,
    /// Set by [`TaskQueue::close`]: no dispatch is accepted any more.
    closed: AtomicBool,
}

// SAFETY: task queues are designed for dispatch from any thread; `closed`
// is atomic.
unsafe impl Send for TaskQueue {}
// SAFETY: `&TaskQueue` allows only ddi_taskq_dispatch/wait(9F), which
// illumos serializes on the queue's own lock, and the atomic `closed`.
unsafe impl Sync for TaskQueue {}

impl TaskQueue {
    /// `ddi_taskq_create(dip, name, 1, TASKQ_DEFAULTPRI, 0)`
    pub fn create(dip: Dip, name: &CStr) -> Result<Self, DdiError> {
        // SAFETY: valid node and NUL-terminated name.
        let tq = unsafe {
            ffi::ddi_taskq_create(dip.as_ptr(), name.as_ptr(), 1, ffi::TASKQ_DEFAULTPRI, 0)
        };
        if tq.is_null() {
            return Err(DdiError::new("ddi_taskq_create", ffi::DDI_FAILURE));
        }
        Ok(Self {
            tq,
            closed: AtomicBool::new(false),
        })
    }

    /// Queues `func(arg)` without sleeping; false if the queue is full or
    /// closed.
    ///
    /// # Safety
    /// `arg` must stay valid until `func` has run (dropping the queue waits
    /// for every queued task).
    pub unsafe fn dispatch(
        &self,
        func: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
    ) -> bool {
        // Acquire pairs with the Release in close(): a dispatcher that runs
        // after close() returned sees it.
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        // SAFETY: valid queue; the caller guarantees arg.
        unsafe {
            ffi::ddi_taskq_dispatch(self.tq, func, arg, ffi::DDI_NOSLEEP as u32) == ffi::DDI_SUCCESS
        }
    }

    /// Refuses every later [`TaskQueue::dispatch`]; tasks already queued
    /// still run. A dispatch that passed its check before this call may
    /// still be under way: the owner must also have stopped every
    /// dispatcher (interrupt handlers, periodic callbacks, the tasks
    /// themselves through [`TaskQueue::wait`]) before dropping the queue.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Waits until every queued task has run (`ddi_taskq_wait(9F)`;
    /// taskq_wait in usr/src/uts/common/os/taskq.c waits until the queue is
    /// empty and no task is active, so tasks queued by running tasks are
    /// waited for too). It does not stop new dispatches: see
    /// [`TaskQueue::close`].
    pub fn wait(&self) {
        // SAFETY: valid queue.
        unsafe { ffi::ddi_taskq_wait(self.tq) }
    }
}

impl Drop for TaskQueue {
    fn drop(&mut self) {
        self.close();
        // SAFETY: created in create(), destroyed once. ddi_taskq_destroy
        // waits for the queued tasks; the owner guarantees that nothing
        // dispatches any more (taskq(9F)), which close() enforces for
        // dispatches through this object.
        unsafe { ffi::ddi_taskq_destroy(self.tq) };
    }
}
