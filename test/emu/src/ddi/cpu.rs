//! The emulated CPUs: `curcpup()` (sys/cpuvar.h) and
//! `servicing_interrupt()` (sys/disp.h). Each thread runs on one CPU,
//! given round-robin when it first asks, or pinned by a test with
//! [`run_on`]; the machine has [`NCPUS`] of them.

use rvscsi::ffi::cpu;
use std::cell::Cell;
use std::ffi::c_int;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// CPUs of the emulated machine.
pub const NCPUS: usize = 8;

fn cpus() -> &'static [cpu; NCPUS] {
    static CPUS: OnceLock<[cpu; NCPUS]> = OnceLock::new();
    CPUS.get_or_init(|| {
        std::array::from_fn(|i| cpu {
            // Ids need not be dense in illumos; seqids are.
            cpu_id: 100 + i as i32,
            cpu_seqid: i as i32,
        })
    })
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The calling thread runs on CPU `seqid` (modulo [`NCPUS`]) from now on.
pub fn run_on(seqid: usize) {
    CURRENT.with(|c| c.set(Some(seqid % NCPUS)));
}

/// The sequential id of the CPU the calling thread runs on.
pub fn current() -> usize {
    CURRENT.with(|c| match c.get() {
        Some(n) => n,
        None => {
            let n = NEXT.fetch_add(1, Ordering::Relaxed) % NCPUS;
            c.set(Some(n));
            n
        }
    })
}

/// `curcpup()`: the current CPU.
#[unsafe(no_mangle)]
pub extern "C" fn curcpup() -> *mut cpu {
    let _kernel = crate::meter::kernel();
    // The driver only reads through it, as through the kernel's.
    std::ptr::from_ref(&cpus()[current()]).cast_mut()
}

/// `servicing_interrupt()` (uts/common/disp/thread.c): 1 on an interrupt
/// thread (`T_INTR_THREAD`: hardware interrupts at or below LOCK_LEVEL and
/// soft interrupts, timeout(9F) callbacks among them) or on a CPU
/// servicing a high-level interrupt, else 0. Here: while the emulated
/// interrupt delivery runs a handler, or the timer thread a timeout(9F)
/// callback ([`super::sync::enter_interrupt_context`]); task queues and
/// `ddi_periodic_add` level-0 callbacks run in kernel thread context.
#[unsafe(no_mangle)]
pub extern "C" fn servicing_interrupt() -> c_int {
    let _kernel = crate::meter::kernel();
    c_int::from(super::sync::in_interrupt())
}
