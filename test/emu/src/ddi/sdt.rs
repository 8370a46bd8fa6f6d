//! DTrace SDT probe sites (`__dtrace_probe_*`). In the kernel, krtld turns
//! each call into no-ops that DTrace can enable; here each firing is
//! recorded against the current machine so that tests can assert that the
//! probes fire where rvscsi(4D) says, with the arguments it documents.
//!
//! Each site is `#[inline(never)]`: in the kernel it is a call into
//! another object that krtld patches, never code the compiler can pull
//! into the driver's function, and inlined here its bookkeeping (the
//! meter's frame, the firing's arguments) would be counted as the driver's
//! instructions (`bench::own_instructions`).

use crate::machine::{self, lock};
use std::sync::Mutex;

/// Firings kept per machine (older ones are dropped, the counts are not).
pub const KEPT: usize = 65_536;

/// One probe firing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firing {
    /// The probe name as D sees it (`rvscsi-cmd-start`).
    pub name: &'static str,
    /// `arg0`..`argN`.
    pub args: Vec<u64>,
}

/// What one machine's probes recorded.
#[derive(Default)]
pub struct ProbeLog {
    inner: Mutex<ProbeLogInner>,
}

#[derive(Default)]
struct ProbeLogInner {
    firings: std::collections::VecDeque<Firing>,
    counts: std::collections::BTreeMap<&'static str, u64>,
}

impl ProbeLog {
    fn record(&self, f: Firing) {
        let mut g = lock(&self.inner);
        *g.counts.entry(f.name).or_default() += 1;
        if g.firings.len() == KEPT {
            g.firings.pop_front();
        }
        g.firings.push_back(f);
    }

    /// How often `name` fired.
    pub fn count(&self, name: &str) -> u64 {
        lock(&self.inner).counts.get(name).copied().unwrap_or(0)
    }

    /// The kept firings of `name`, oldest first.
    pub fn firings(&self, name: &str) -> Vec<Firing> {
        lock(&self.inner)
            .firings
            .iter()
            .filter(|f| f.name == name)
            .cloned()
            .collect()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        let mut g = lock(&self.inner);
        g.firings.clear();
        g.counts.clear();
    }
}

fn fire(name: &'static str, args: &[usize]) {
    let f = Firing {
        name,
        args: args.iter().map(|&a| a as u64).collect(),
    };
    match machine::current() {
        Some(m) => m.probes.record(f),
        None => super::violation(format!("probe {name} fired outside any machine's context")),
    }
}

/// `sdt:rvscsi::rvscsi-cmd-start`
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn __dtrace_probe_rvscsi__cmd__start(
    pkt: usize,
    target: usize,
    lun: usize,
    queue: usize,
) {
    let _probe = crate::meter::probe();
    fire("rvscsi-cmd-start", &[pkt, target, lun, queue]);
}

/// `sdt:rvscsi::rvscsi-cmd-done`
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn __dtrace_probe_rvscsi__cmd__done(
    pkt: usize,
    reason: usize,
    status: usize,
    state: usize,
    statistics: usize,
) {
    let _probe = crate::meter::probe();
    fire("rvscsi-cmd-done", &[pkt, reason, status, state, statistics]);
}

/// `sdt:rvscsi::rvscsi-cmd-timeout`
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn __dtrace_probe_rvscsi__cmd__timeout(
    pkt: usize,
    target: usize,
    lun: usize,
    time_s: usize,
) {
    let _probe = crate::meter::probe();
    fire("rvscsi-cmd-timeout", &[pkt, target, lun, time_s]);
}

/// `sdt:rvscsi::rvscsi-cmd-abort`
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn __dtrace_probe_rvscsi__cmd__abort(
    pkt: usize,
    target: usize,
    lun: usize,
    done: usize,
) {
    let _probe = crate::meter::probe();
    fire("rvscsi-cmd-abort", &[pkt, target, lun, done]);
}

/// `sdt:rvscsi::rvscsi-reset`
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn __dtrace_probe_rvscsi__reset(
    level: usize,
    target: usize,
    lun: usize,
    done: usize,
) {
    let _probe = crate::meter::probe();
    fire("rvscsi-reset", &[level, target, lun, done]);
}

/// The recording function of the probe whose call sites reference symbol
/// `name` (`__dtrace_probe_rvscsi__cmd__start`), for enabling the probe
/// sites of a loaded module.
pub fn probe_function(name: &str) -> Option<usize> {
    let f: usize = match name {
        "__dtrace_probe_rvscsi__cmd__start" => {
            __dtrace_probe_rvscsi__cmd__start as *const () as usize
        }
        "__dtrace_probe_rvscsi__cmd__done" => {
            __dtrace_probe_rvscsi__cmd__done as *const () as usize
        }
        "__dtrace_probe_rvscsi__cmd__timeout" => {
            __dtrace_probe_rvscsi__cmd__timeout as *const () as usize
        }
        "__dtrace_probe_rvscsi__cmd__abort" => {
            __dtrace_probe_rvscsi__cmd__abort as *const () as usize
        }
        "__dtrace_probe_rvscsi__reset" => __dtrace_probe_rvscsi__reset as *const () as usize,
        _ => return None,
    };
    Some(f)
}
