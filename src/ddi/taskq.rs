//! A task queue (`ddi_taskq_create(9F)`): where work that may block
//! (discovery, recovery, task management) runs, out of interrupt context.

use super::{DdiError, Dip};
use crate::ffi;
use core::ffi::{CStr, c_void};

/// A single-threaded task queue, destroyed (after its tasks ran) on drop.
pub struct TaskQueue {
    tq: *mut ffi::ddi_taskq_t,
}

// SAFETY: task queues are designed for dispatch from any thread.
unsafe impl Send for TaskQueue {}
// SAFETY: as above.
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
        Ok(Self { tq })
    }

    /// Queues `func(arg)` without sleeping; false if the queue is full.
    ///
    /// # Safety
    /// `arg` must stay valid until `func` has run (dropping the queue waits
    /// for every queued task).
    pub unsafe fn dispatch(
        &self,
        func: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
    ) -> bool {
        // SAFETY: valid queue; the caller guarantees arg.
        unsafe {
            ffi::ddi_taskq_dispatch(self.tq, func, arg, ffi::DDI_NOSLEEP as u32) == ffi::DDI_SUCCESS
        }
    }

    /// Waits until every queued task has run (`ddi_taskq_wait(9F)`).
    pub fn wait(&self) {
        // SAFETY: valid queue.
        unsafe { ffi::ddi_taskq_wait(self.tq) }
    }
}

impl Drop for TaskQueue {
    fn drop(&mut self) {
        // SAFETY: created in create(); ddi_taskq_destroy waits for tasks.
        unsafe { ffi::ddi_taskq_destroy(self.tq) };
    }
}
