//! The CPU the caller runs on, for spreading work per CPU (the request
//! queue a command goes to).

use crate::ffi;

/// The sequential id (0..ncpus-1) of the CPU the caller runs on
/// (`CPU->cpu_seqid`, sys/cpuvar.h). The caller may migrate right after:
/// the answer is a hint for spreading load, never a lock or an index that
/// must stay true.
pub fn current_seqid() -> u32 {
    // SAFETY: curcpup() returns the current CPU's cpu_t, which the kernel
    // keeps for as long as the CPU exists; a CPU is not deleted while a
    // thread runs on it, and cpu_seqid is set before the CPU runs threads.
    // Only the mirrored leading member is read.
    let seqid = unsafe { (*ffi::curcpup()).cpu_seqid };
    u32::try_from(seqid).unwrap_or(0)
}
