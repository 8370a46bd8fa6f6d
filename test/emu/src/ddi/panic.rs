//! `ddi_in_panic(9F)`: whether the system is panicking. illumos answers
//! `panicstr != NULL` (uts/common/os/sunddi.c); from then on the panic
//! thread runs alone, and a crash dump drives the disk's HBA polled
//! (sddump in sd.c resets with `scsi_reset(RESET_ALL)` and gives up if
//! that returns 0). A test declares a machine panicking with
//! [`set_panicking`]; what the kernel stops doing in a panic is modelled:
//! clock() returns at once once `panicstr` is set (uts/common/os/clock.c),
//! so lbolt stands still and `delay(9F)` would never return (a
//! violation here), and task queues get no CPU (a test holds them with
//! `taskq::hold_tasks`). What a panic exempts is exempted too:
//! mutex_vector_enter skips its "adaptive at high PIL" check
//! (uts/common/os/mutex.c), and the dump polls the device, so busy
//! waiting in the interrupt the panic came from is no violation. Not
//! modelled: in a panic mutex_vector_enter also stops waiting for an
//! owner; here a lock is still waited for, as the test's other threads
//! still run.

use crate::machine::{Machine, lock};
use std::ffi::c_int;
use std::sync::{Arc, Mutex, Weak};

static PANICKING: Mutex<Vec<Weak<Machine>>> = Mutex::new(Vec::new());

/// Declares machine `m` panicking (`on`) or not.
pub fn set_panicking(m: &Arc<Machine>, on: bool) {
    let mut p = lock(&PANICKING);
    p.retain(|w| w.upgrade().is_some_and(|w| !Arc::ptr_eq(&w, m)));
    if on {
        p.push(Arc::downgrade(m));
    }
}

/// Whether the calling thread's machine is panicking.
pub fn panicking() -> bool {
    let Some(m) = crate::machine::current() else {
        return false;
    };
    lock(&PANICKING)
        .iter()
        .any(|w| w.upgrade().is_some_and(|w| Arc::ptr_eq(&w, &m)))
}

/// `ddi_in_panic(9F)`: 1 while the system panics, else 0.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_in_panic() -> c_int {
    let _kernel = crate::meter::kernel();
    c_int::from(panicking())
}
