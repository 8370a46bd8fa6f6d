//! The CPU the caller runs on, for spreading work per CPU (the request
//! queue a command goes to).

use crate::ffi;

/// The sequential id (0..ncpus-1) of the CPU the caller runs on
/// (`CPU->cpu_seqid`, sys/cpuvar.h). The caller may migrate right after:
/// the answer is a hint for spreading load, never a lock or an index that
/// must stay true.
pub fn current_seqid() -> u32 {
    // SAFETY: curcpup() returns the current CPU's cpu_t. If the thread is
    // preempted or the CPU is deleted before the load, the pointer still
    // names valid memory: a deleted CPU's cpu_t goes on the kernel's free
    // list for reuse (mp_cpu_unconfigure_common, i86pc mp_startup.c), it
    // is never freed, so the load reads some CPU's seqid (a hint, as said
    // above). Only the mirrored leading member is read.
    let seqid = unsafe { (*ffi::curcpup()).cpu_seqid };
    u32::try_from(seqid).unwrap_or(0)
}

/// Whether the caller runs in interrupt context: an interrupt thread (a
/// hardware interrupt at or below LOCK_LEVEL, or a soft interrupt such as
/// a timeout(9F) callback) or a CPU servicing a high-level interrupt
/// (`servicing_interrupt()`, uts/common/disp/thread.c). What may sleep or
/// wait long must not run there (delay(9F), condvar(9F), kmem_alloc(9F)
/// CONTEXT sections).
pub fn servicing_interrupt() -> bool {
    // SAFETY: no preconditions; it reads the current thread and CPU.
    unsafe { ffi::servicing_interrupt() != 0 }
}

/// Whether the system is panicking (ddi_in_panic(9F)): then no task queue,
/// timeout or interrupt runs any more, and what must happen (a crash
/// dump's reset) is done at once, polled, without sleeping.
pub fn in_panic() -> bool {
    // SAFETY: no preconditions; it reads `panicstr`.
    unsafe { ffi::ddi_in_panic() != 0 }
}
