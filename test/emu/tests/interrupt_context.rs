//! The emulation's interrupt context: `servicing_interrupt()` says so, and
//! what illumos forbids there is recorded as a violation: sleeping
//! (delay(9F) "can be called from user and kernel contexts";
//! kmem_alloc(9F) "from interrupt context only if the KM_NOSLEEP flag is
//! set") and busy waiting for more than a millisecond in one interrupt.
//!
//! No machine here: violations go to the orphan list, shared by the tests
//! of this binary, so each test looks only for its own messages and the
//! tests run one at a time.

use rvscsi::ffi;
use rvscsi_emu::ddi::sync::{enter_interrupt_context, leave_interrupt_context_unchecked};
use rvscsi_emu::ddi::time::{INTERRUPT_SPIN_LIMIT_US, delay, drv_usecwait};
use rvscsi_emu::ddi::{ORPHAN_VIOLATIONS, cpu, kmem};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Violations recorded while `f` ran that contain `what`.
fn violations_during(what: &str, f: impl FnOnce()) -> usize {
    let before = ORPHAN_VIOLATIONS.lock().unwrap().len();
    f();
    ORPHAN_VIOLATIONS.lock().unwrap()[before..]
        .iter()
        .filter(|v| v.contains(what))
        .count()
}

#[test]
fn servicing_interrupt_is_true_only_inside_an_interrupt() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(cpu::servicing_interrupt(), 0);
    enter_interrupt_context();
    assert_eq!(cpu::servicing_interrupt(), 1);
    leave_interrupt_context_unchecked();
    assert_eq!(cpu::servicing_interrupt(), 0);
    // Another thread is not in this one's interrupt.
    enter_interrupt_context();
    let other = std::thread::spawn(|| cpu::servicing_interrupt())
        .join()
        .unwrap();
    leave_interrupt_context_unchecked();
    assert_eq!(other, 0);
}

#[test]
fn more_than_a_millisecond_of_busy_waiting_in_one_interrupt_is_a_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let what = "of drv_usecwait in one interrupt";
    let steps = INTERRUPT_SPIN_LIMIT_US / 10;
    // Up to the limit, 10 us at a time (a short register handshake): fine.
    let n = violations_during(what, || {
        enter_interrupt_context();
        for _ in 0..steps {
            drv_usecwait(10);
        }
        leave_interrupt_context_unchecked();
    });
    assert_eq!(n, 0);
    // One wait more in the same interrupt: a handler polling the device.
    let n = violations_during(what, || {
        enter_interrupt_context();
        for _ in 0..steps + 3 {
            drv_usecwait(10);
        }
        leave_interrupt_context_unchecked();
    });
    assert_eq!(n, 1, "reported once per interrupt");
    // Each interrupt has its own budget; thread context has none.
    let n = violations_during(what, || {
        for _ in 0..2 {
            enter_interrupt_context();
            for _ in 0..steps {
                drv_usecwait(10);
            }
            leave_interrupt_context_unchecked();
        }
        for _ in 0..steps * 2 {
            drv_usecwait(10);
        }
    });
    assert_eq!(n, 0);
}

#[test]
fn sleeping_in_an_interrupt_is_a_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let n = violations_during("delay called in interrupt context", || {
        enter_interrupt_context();
        delay(1);
        leave_interrupt_context_unchecked();
        delay(1);
    });
    assert_eq!(n, 1);
    let n = violations_during("kmem_alloc(KM_SLEEP) called in interrupt context", || {
        enter_interrupt_context();
        let a = kmem::kmem_alloc(64, ffi::KM_SLEEP);
        let b = kmem::kmem_alloc(64, ffi::KM_NOSLEEP);
        leave_interrupt_context_unchecked();
        kmem::kmem_free(a, 64);
        kmem::kmem_free(b, 64);
    });
    assert_eq!(n, 1, "KM_SLEEP only; KM_NOSLEEP is allowed");
}
