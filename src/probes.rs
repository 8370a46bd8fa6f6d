//! DTrace statically defined tracing (SDT) probes.
//!
//! A call to an undefined function named `__dtrace_probe_<name>` is a probe
//! site: when the kernel runtime loader relocates the module it records the
//! site and overwrites the 5-byte `call` (or tail-call `jmp`) with no-ops,
//! and the `sdt` provider patches it back to a trap when the probe is
//! enabled (illumos `uts/intel/amd64/krtld/kobj_reloc.c`, sdt_reloc_resolve;
//! `sdt(4D)`). A disabled probe therefore costs a few no-ops. Double
//! underscores in the name become dashes: `__dtrace_probe_rvscsi__cmd__start`
//! is the probe `sdt:rvscsi::rvscsi-cmd-start`.
//!
//! Arguments reach D as `arg0`..`argN`, each a 64-bit value; the list for
//! each probe is in rvscsi(4D). Packet pointers are for correlating events
//! (`args` of start and done match); a probe never dereferences them.

use core::ffi::c_int;

unsafe extern "C" {
    fn __dtrace_probe_rvscsi__cmd__start(pkt: usize, target: usize, lun: usize, queue: usize);
    fn __dtrace_probe_rvscsi__cmd__done(
        pkt: usize,
        reason: usize,
        status: usize,
        state: usize,
        statistics: usize,
    );
    fn __dtrace_probe_rvscsi__cmd__timeout(pkt: usize, target: usize, lun: usize, time_s: usize);
    fn __dtrace_probe_rvscsi__cmd__abort(pkt: usize, target: usize, lun: usize, done: usize);
    fn __dtrace_probe_rvscsi__reset(level: usize, target: usize, lun: usize, done: usize);
}

/// A packet address for tracing (0 when there is none).
pub type PktAddr = usize;

/// `rvscsi-cmd-start`: `pkt` was handed to the device on request queue
/// `queue` (fired under the queue lock, so before its completion).
#[inline(always)]
pub fn cmd_start(pkt: PktAddr, target: u8, lun: crate::scsa::addr::LunNumber, queue: u16) {
    // SAFETY: a probe site; in the kernel the call is replaced by no-ops or
    // a trap into DTrace, in the test bed it records its arguments.
    unsafe {
        __dtrace_probe_rvscsi__cmd__start(pkt, target.into(), lun.into(), queue.into());
    }
}

/// `rvscsi-cmd-done`: `pkt` ends with `pkt_reason` `reason`, SCSI status
/// byte `status` and the given `pkt_state`/`pkt_statistics`, just before it
/// goes back to the target driver.
#[inline(always)]
pub fn cmd_done(pkt: PktAddr, reason: u8, status: u8, state: u32, statistics: u32) {
    // SAFETY: a probe site (see cmd_start).
    unsafe {
        __dtrace_probe_rvscsi__cmd__done(
            pkt,
            reason.into(),
            status.into(),
            state as usize,
            statistics as usize,
        );
    }
}

/// `rvscsi-cmd-timeout`: `pkt` outlived its `pkt_time` of `time_s` seconds;
/// recovery starts.
#[inline(always)]
pub fn cmd_timeout(pkt: PktAddr, target: u8, lun: crate::scsa::addr::LunNumber, time_s: c_int) {
    // SAFETY: a probe site (see cmd_start).
    unsafe {
        __dtrace_probe_rvscsi__cmd__timeout(pkt, target.into(), lun.into(), time_s as usize);
    }
}

/// `rvscsi-cmd-abort`: an ABORT TASK for `pkt` (or, with `pkt` 0, ABORT
/// TASK SET of the LUN) ended; `done` tells whether the device performed it.
#[inline(always)]
pub fn cmd_abort(pkt: PktAddr, target: u8, lun: crate::scsa::addr::LunNumber, done: bool) {
    // SAFETY: a probe site (see cmd_start).
    unsafe {
        __dtrace_probe_rvscsi__cmd__abort(pkt, target.into(), lun.into(), done.into());
    }
}

/// `rvscsi-reset`: a reset at `level` (`RESET_LUN`, `RESET_TARGET`,
/// `RESET_ALL`: the whole device) ended; `done` tells whether it worked.
#[inline(always)]
pub fn reset(level: c_int, target: u8, lun: crate::scsa::addr::LunNumber, done: bool) {
    // SAFETY: a probe site (see cmd_start).
    unsafe {
        __dtrace_probe_rvscsi__reset(level as usize, target.into(), lun.into(), done.into());
    }
}
