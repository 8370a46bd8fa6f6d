//! Time: `ddi_get_lbolt64(9F)`, `drv_usectohz(9F)`, `drv_usecwait(9F)`,
//! `gethrtime(9F)` and periodic callbacks (`ddi_periodic_add(9F)`).

use crate::ffi;
use core::ffi::c_void;

/// Clock ticks since boot (`ddi_get_lbolt64(9F)`).
pub fn lbolt() -> i64 {
    // SAFETY: no preconditions.
    unsafe { ffi::ddi_get_lbolt64() }
}

/// Microseconds to clock ticks (`drv_usectohz(9F)`).
pub fn usec_to_ticks(usec: i64) -> i64 {
    // SAFETY: no preconditions.
    unsafe { ffi::drv_usectohz(usec) }
}

/// Busy-waits at least `usec` microseconds (`drv_usecwait(9F)`).
pub fn usec_wait(usec: i64) {
    // SAFETY: no preconditions.
    unsafe { ffi::drv_usecwait(usec) }
}

/// Sleeps at least `ticks` clock ticks (`delay(9F)`); thread context only.
pub fn delay_ticks(ticks: i64) {
    // SAFETY: no preconditions beyond thread context, which callers ensure.
    unsafe { ffi::delay(ticks) }
}

/// One pause of a polling loop that has gone round `*spins` times: 10 µs
/// busy waits at first, then (where sleeping is allowed) a clock tick
/// each, so a long wait does not hold the CPU.
pub fn poll_pause(spins: &mut u32, can_sleep: bool) {
    *spins = spins.saturating_add(1);
    if can_sleep && *spins > 100 {
        delay_ticks(1);
    } else {
        usec_wait(10);
    }
}

/// High-resolution time in nanoseconds (`gethrtime(9F)`).
pub fn hrtime() -> i64 {
    // SAFETY: no preconditions.
    unsafe { ffi::gethrtime() }
}

/// A callback run every interval until dropped (`ddi_periodic_add(9F)`,
/// level 0: kernel context, may block briefly).
pub struct Periodic {
    id: ffi::ddi_periodic_t,
}

// SAFETY: the periodic id is a kernel handle usable from any thread.
unsafe impl Send for Periodic {}
// SAFETY: no &self methods touch it.
unsafe impl Sync for Periodic {}

impl Periodic {
    /// Starts calling `func(arg)` every `interval_ns` nanoseconds.
    ///
    /// # Safety
    /// `arg` must remain valid for `func` until the returned value is
    /// dropped; `ddi_periodic_delete` waits for a running call to finish.
    pub unsafe fn start(
        func: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
        interval_ns: i64,
    ) -> Self {
        // SAFETY: the caller guarantees arg's validity.
        let id = unsafe { ffi::ddi_periodic_add(func, arg, interval_ns, 0) };
        Self { id }
    }
}

impl Drop for Periodic {
    /// `ddi_periodic_delete(9F)`: "if the callback function is already
    /// executing ... when the request is cancelled, ddi_periodic_delete()
    /// will block until it finishes executing", and it is not called again
    /// after the return (i_untimeout in usr/src/uts/common/os/ddi_periodic.c
    /// marks it cancelled and waits while it is executing). So the drop
    /// must not run inside the callback (illumos panics: "called from its
    /// own handler"), nor with a lock held that the callback takes.
    fn drop(&mut self) {
        // SAFETY: id came from ddi_periodic_add and is deleted once.
        unsafe { ffi::ddi_periodic_delete(self.id) };
    }
}
