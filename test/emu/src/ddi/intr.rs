//! Interrupts: `ddi_intr_get_supported_types(9F)`, `ddi_intr_alloc(9F)`,
//! `ddi_intr_add_handler(9F)`, `ddi_intr_enable(9F)` and friends, and
//! interrupt resource management (IRM): `ddi_cb_register(9F)` with
//! `DDI_CB_FLAG_INTR`, the x86 IRM pool and its `DDI_CB_INTR_ADD` /
//! `DDI_CB_INTR_REMOVE` callbacks.
//!
//! MSI-X vectors are programmed in the device's MSI-X table (in its BAR)
//! with a message to the local APIC, as x86 programs them (address in the
//! MSI window, data an APIC vector per `inum`: [`crate::msi`], which
//! counts every message); MSI the same through the MSI capability; fixed
//! interrupts are the INTx line QEMU reports through the intercepted I/O
//! APIC. The machine's delivery thread turns either into handler calls,
//! one per MSI/MSI-X message.
//!
//! # What the kernel grants (illumos-gate 01d4d8e7)
//!
//! `ddi_intr_alloc` (`common/os/ddi_intr.c`) refuses a `count` above the
//! device's vectors (`DDI_EINVAL`, whatever the behaviour flag), an MSI
//! total that is not a power of two, a second type; the first allocation
//! inserts the device into its IRM pool (`i_ddi_irm_insert`), and the
//! grant is `i_ddi_intr_get_current_navail`: the pool's answer for a device
//! in one, else `i_ddi_intr_get_limit` (`common/os/ddi_intr_impl.c`):
//! `min(default, nintrs)`, for MSI-X also `min(.., ddi_msix_alloc_limit)`
//! on x86, for MSI `min(.., DDI_MAX_MSI_ALLOC = 2)`; no limit but the
//! device's for an MSI-X driver with an IRM callback in a pool.
//!
//! Which platform module (PSM) runs decides the rest ([`Psm`]):
//! - `apix` (`i86pc/io/apix`, chosen on QEMU/KVM and most current x86;
//!   `apix_probe`, `apic_ioapic_method_probe`): `apix_irm_init` creates one
//!   system-wide pool for MSI and MSI-X (`ndi_irm_create`, root node), of
//!   `ncpus * per-CPU vectors - preallocated` vectors (capped by the
//!   `apix_system_max_vectors` tunable), default grant `ipool_defsz =
//!   min(2048, max(8, total / 32))`, and raises `ddi_msix_alloc_limit` to
//!   `DDI_MIN_MSIX_ALLOC` (8). The PCI nexus hands that pool out for MSI
//!   and MSI-X (`pci_common_intr_ops`, `DDI_INTROP_GETPOOL`).
//! - `pcplusmp` (Xen HVM, `apix_enable=0`, I/O APICs without a usable EOI
//!   method): no pool, `ddi_msix_alloc_limit` stays `DDI_DEFAULT_MSIX_ALLOC`
//!   (2), IRM callback or not.
//!
//! The pool is balanced as `common/os/ddi_intr_irm.c` does (policy
//! `DDI_IRM_POLICY_LARGE`): only MSI-X requests of drivers with a callback
//! (and new requests) are reducible, never below the pool's default size;
//! a reduced or grown request is told by its callback, and a driver that
//! keeps more than it was left is warned about and left what it has
//! (`i_ddi_irm_notify`); here that is also a violation, because
//! ddi_cb_register(9F) requires the driver to release them.
//!
//! Not modelled: the balance thread's own schedule. Balancing that illumos
//! queues for its balance thread (`i_ddi_irm_enqueue(.., B_FALSE)`) runs
//! here only when a test asks ([`irm_balance`], and the other devices of
//! [`irm_add_device`]/[`irm_remove_device`]), on the test's thread, which
//! plays the balance thread (kernel context, may block). Pools are always
//! active (the driver attaches after `i_ddi_irm_poststartup`).

use super::devinfo::{Prop, node};
use super::violation;
use crate::machine::{IntrType, Machine, MachineConfig, VectorSlot, bump, lock};
use rvscsi::ffi::{
    self, ddi_cb_func_t, ddi_cb_handle_t, ddi_intr_handle_t, ddi_intr_handler_t, dev_info_t,
};
use rvscsi_qtest::Pci;
use std::collections::{BTreeSet, HashSet};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::{Arc, Mutex};

/// The priority of a mass-storage controller's MSI/MSI-X interrupts
/// without an `interrupt-priorities` property: `pci_default_pil`
/// (`common/io/pci_intr_lib.c`: class 0x01 -> 5), the same level
/// `impl_xlate_intrs` (`i86pc/os/ddi_impl.c`) gives INTx.
pub const INTR_PRI: c_uint = 5;
/// `LOCK_LEVEL` (`intel/sys/machlock.h`).
pub const LOCK_LEVEL: c_uint = 10;
/// `MAXIPL` (x86): the highest level `impl_xlate_intrs` accepts.
const MAXIPL: i32 = 15;

/// `DDI_DEFAULT_MSIX_ALLOC` (`sys/ddi_intr_impl.h`): `ddi_msix_alloc_limit`
/// as compiled (`common/os/ddi_intr_impl.c`).
pub const DDI_DEFAULT_MSIX_ALLOC: u32 = 2;
/// `DDI_MIN_MSIX_ALLOC`: apix raises `ddi_msix_alloc_limit` to it.
pub const DDI_MIN_MSIX_ALLOC: u32 = 8;
const DDI_MAX_MSIX_ALLOC: u32 = 2048;
const DDI_MSIX_ALLOC_DIVIDER: u32 = 32;
/// `DDI_MAX_MSI_ALLOC`.
const DDI_MAX_MSI_ALLOC: u32 = 2;
/// apix: vectors per CPU for devices, `APIX_NAVINTR -
/// APIX_SW_RESERVED_VECTORS` = (256 - 16 IPIs - 0x20) - 5 (`i86pc/sys/apix.h`,
/// `apix_softinit`).
const APIX_PER_CPU_VECTORS: u32 = 256 - 16 - 0x20 - 5;
/// apix: vectors allocated before the pool is made (SCI and HPET, which
/// QEMU's PC machines have).
const APIX_PREALLOCATED: u32 = 2;

/// The x86 platform module the emulated kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Psm {
    /// `apix`: an IRM pool for MSI and MSI-X, `ddi_msix_alloc_limit` 8.
    #[default]
    Apix,
    /// `pcplusmp`: no IRM pool, `ddi_msix_alloc_limit` 2.
    Pcplusmp,
}

/// `ipool_defsz` for a pool of `total` vectors (`ndi_irm_create`,
/// `ndi_irm_resize_pool`).
fn pool_default_size(total: u32) -> u32 {
    DDI_MAX_MSIX_ALLOC.min(DDI_MIN_MSIX_ALLOC.max(total / DDI_MSIX_ALLOC_DIVIDER))
}

/// One request in the pool (`ddi_irm_req_t`).
#[derive(Clone, Debug)]
struct Request {
    /// The device (a `dev_info_t` address, or a made-up one for the other
    /// devices of [`irm_add_device`]).
    dip: usize,
    typ: c_int,
    nreq: u32,
    navail: u32,
    /// `ireq_scratch`: navail before a balance.
    scratch: u32,
    /// `DDI_IRM_FLAG_CALLBACK`
    callback: bool,
    /// `DDI_IRM_FLAG_NEW`
    new: bool,
}

impl Request {
    /// `DDI_IRM_IS_REDUCIBLE`
    fn reducible(&self) -> bool {
        (self.callback && self.typ == ffi::DDI_INTR_TYPE_MSIX) || self.new
    }
    /// What it counts in `ipool_minno`.
    fn nmin(&self) -> u32 {
        if self.reducible() { 1 } else { self.nreq }
    }
}

/// The IRM pool (`ddi_irm_pool_t`): requests kept sorted by `nreq`,
/// largest first (`i_ddi_irm_insertion_sort`).
#[derive(Debug)]
struct Pool {
    total: u32,
    defsz: u32,
    reqs: Vec<Request>,
}

impl Pool {
    fn resno(&self) -> u32 {
        self.reqs.iter().map(|r| r.navail).sum()
    }
    fn reqno(&self) -> u32 {
        self.reqs.iter().map(|r| r.nreq).sum()
    }
    fn minno(&self) -> u32 {
        self.reqs.iter().map(Request::nmin).sum()
    }
    fn insert_sorted(&mut self, r: Request) {
        let at = self
            .reqs
            .iter()
            .position(|o| o.nreq <= r.nreq)
            .unwrap_or(self.reqs.len());
        self.reqs.insert(at, r);
    }
    fn find(&self, dip: usize) -> Option<usize> {
        self.reqs.iter().position(|r| r.dip == dip)
    }
}

/// A `ddi_cb_register(9F)` registration (`ddi_cb_t`).
#[derive(Clone, Copy)]
struct Callback {
    dip: usize,
    flags: c_int,
    func: ddi_cb_func_t,
    arg1: usize,
    arg2: usize,
    /// The handle given out (a boxed slot).
    handle: usize,
}

/// What a device has allocated (`devinfo_intr_t`).
#[derive(Debug, Default)]
struct DevIntr {
    typ: c_int,
    inums: BTreeSet<usize>,
}

/// A machine's interrupt resource management state.
pub struct Irm {
    psm: Psm,
    pool: Option<Pool>,
    /// `ddi_msix_alloc_limit`
    msix_alloc_limit: u32,
    callbacks: Vec<Callback>,
    devs: std::collections::HashMap<usize, DevIntr>,
    /// A balance illumos would have queued for its balance thread.
    queued: bool,
    /// The device whose callback is running, and the thread running it
    /// (the balance thread, which holds the pool lock meanwhile).
    in_callback: Option<(usize, std::thread::ThreadId)>,
    next_other: usize,
}

impl Irm {
    /// The platform `config` describes.
    pub fn new(config: &MachineConfig) -> Self {
        let (pool, limit) = match config.psm {
            Psm::Apix => {
                let mut total = super::cpu::NCPUS as u32 * APIX_PER_CPU_VECTORS - APIX_PREALLOCATED;
                if let Some(max) = config.apix_system_max_vectors
                    && max > 0
                    && max < total
                {
                    total = max;
                }
                let pool = Pool {
                    total,
                    defsz: pool_default_size(total),
                    reqs: Vec::new(),
                };
                (Some(pool), DDI_DEFAULT_MSIX_ALLOC.max(DDI_MIN_MSIX_ALLOC))
            }
            Psm::Pcplusmp => (None, DDI_DEFAULT_MSIX_ALLOC),
        };
        Irm {
            psm: config.psm,
            pool,
            msix_alloc_limit: limit,
            callbacks: Vec::new(),
            devs: Default::default(),
            queued: false,
            in_callback: None,
            next_other: 1,
        }
    }

    fn has_intr_cb(&self, dip: usize) -> bool {
        self.callbacks
            .iter()
            .any(|c| c.dip == dip && c.flags & ffi::DDI_CB_FLAG_INTR != 0)
    }

    /// `i_ddi_irm_supported`: MSI-X with an IRM callback.
    fn irm_supported(&self, dip: usize, typ: c_int) -> bool {
        typ == ffi::DDI_INTR_TYPE_MSIX && self.has_intr_cb(dip)
    }

    /// `i_ddi_intr_get_pool` (the PCI nexus: the apix pool, MSI and MSI-X).
    fn has_pool(&self, typ: c_int) -> bool {
        self.pool.is_some() && (typ == ffi::DDI_INTR_TYPE_MSI || typ == ffi::DDI_INTR_TYPE_MSIX)
    }

    /// `i_ddi_intr_get_limit`
    fn limit(&self, dip: usize, typ: c_int, nintrs: u32) -> u32 {
        let pooled = self.has_pool(typ);
        let mut limit = match &self.pool {
            Some(p) if pooled => p.defsz,
            // DDI_INTROP_NAVAIL of the PCI nexus: the device's count.
            _ => nintrs,
        };
        if pooled && self.irm_supported(dip, typ) {
            return nintrs;
        }
        limit = limit.min(nintrs);
        if typ == ffi::DDI_INTR_TYPE_MSIX {
            limit = limit.min(self.msix_alloc_limit);
        }
        if typ == ffi::DDI_INTR_TYPE_MSI {
            limit = limit.min(DDI_MAX_MSI_ALLOC);
        }
        limit
    }

    /// `i_ddi_intr_get_current_navail`
    fn current_navail(&self, dip: usize, typ: c_int, nintrs: u32) -> u32 {
        if let Some(p) = &self.pool
            && let Some(i) = p.find(dip)
            && p.reqs[i].typ == typ
        {
            return p.reqs[i].navail;
        }
        self.limit(dip, typ, nintrs)
    }

    fn nintrs_of(&self, dip: usize) -> u32 {
        self.devs.get(&dip).map_or(0, |d| d.inums.len() as u32)
    }
}

/// What `i_ddi_irm_insert` says.
enum Insert {
    Done,
    Again(String),
}

/// `i_ddi_irm_insert`: the device's first allocation.
fn irm_insert(
    irm: &mut Irm,
    dip: usize,
    typ: c_int,
    count: u32,
    nintrs: u32,
    name: &str,
) -> Insert {
    if !irm.has_pool(typ) {
        return Insert::Done; // DDI_ENOTSUP, which ddi_intr_alloc ignores
    }
    let irm_flag = irm.irm_supported(dip, typ);
    let nreq = if irm_flag {
        count
    } else {
        count.min(irm.limit(dip, typ, nintrs))
    };
    let Some(pool) = irm.pool.as_mut() else {
        return Insert::Done;
    };
    if pool.find(dip).is_some() {
        return Insert::Done;
    }
    let nmin = if irm_flag { 1 } else { nreq };
    let npartial = nreq.min(pool.defsz);
    if pool.minno() + nmin > pool.total {
        return Insert::Again(format!("{name}: interrupt pool too full."));
    }
    let resno = pool.resno();
    let mut r = Request {
        dip,
        typ,
        nreq,
        navail: 0,
        scratch: 0,
        callback: irm_flag,
        new: true,
    };
    let immediate = if resno + nreq <= pool.total {
        r.navail = nreq;
        r.new = false;
        false
    } else if irm_flag && resno + npartial <= pool.total {
        r.navail = npartial;
        r.new = false;
        irm.queued = true;
        false
    } else {
        true
    };
    pool.insert_sorted(r);
    if immediate {
        // i_ddi_irm_enqueue(pool, B_TRUE): the balance, then NEW is cleared.
        let _ = balance_locked(irm);
        if let Some(pool) = irm.pool.as_mut()
            && let Some(i) = pool.find(dip)
        {
            pool.reqs[i].new = false;
        }
    }
    let pool = irm.pool.as_mut().expect("pool");
    let i = pool.find(dip).expect("inserted");
    if pool.reqs[i].navail == 0 {
        pool.reqs.remove(i);
        return Insert::Again(format!("{name}: interrupt pool too full."));
    }
    Insert::Done
}

/// `i_ddi_irm_modify` for a driver without an IRM callback (the
/// synchronous adjustment `ddi_intr_alloc`/`ddi_intr_free` make).
fn irm_modify_static(irm: &mut Irm, dip: usize, nreq: u32, nintrs: u32) {
    let Some(pi) = irm.pool.as_ref().and_then(|p| p.find(dip)) else {
        return;
    };
    let typ = irm.pool.as_ref().map_or(0, |p| p.reqs[pi].typ);
    if typ == ffi::DDI_INTR_TYPE_MSI || nreq > irm.limit(dip, typ, nintrs) {
        return; // DDI_ENOTSUP / DDI_EINVAL, ignored by the callers
    }
    let Some(pool) = irm.pool.as_mut() else {
        return;
    };
    let cur_nreq = pool.reqs[pi].nreq;
    if nreq > cur_nreq {
        // i_ddi_irm_modify_increase: directly from the pool when it fits
        // (a rebalance could not take vectors from static requests).
        let count = nreq - cur_nreq;
        if pool.minno() + count > pool.total || pool.resno() + count > pool.total {
            return;
        }
        pool.reqs[pi].nreq += count;
        pool.reqs[pi].navail += count;
    } else {
        pool.reqs[pi].nreq = nreq;
        pool.reqs[pi].navail = nreq;
    }
    let r = pool.reqs.remove(pi);
    pool.insert_sorted(r);
}

/// `i_ddi_irm_reduce_by_policy` with `DDI_IRM_POLICY_LARGE` over the
/// scratch list (indices into the pool's requests, largest first).
fn reduce_by_policy(pool: &mut Pool, scratch: &[usize], mut imbalance: u32) -> bool {
    while imbalance > 0 {
        let defsz = pool.defsz;
        let Some(&head) = scratch.first() else {
            return false;
        };
        if pool.reqs[head].navail <= defsz {
            return false;
        }
        let stop_navail = pool.reqs[head].navail - 1;
        let nreduce = scratch
            .iter()
            .take_while(|&&i| pool.reqs[i].navail > stop_navail)
            .count();
        let next = scratch.get(nreduce).copied();
        let last = scratch[nreduce - 1];
        let mut reduction = match next {
            Some(n) if pool.reqs[n].navail > defsz => pool.reqs[last].navail - pool.reqs[n].navail,
            _ => pool.reqs[last].navail - defsz,
        };
        let mut nremain = 0;
        let max_redu = reduction * nreduce as u32;
        if max_redu > imbalance {
            reduction = imbalance / nreduce as u32;
            nremain = imbalance % nreduce as u32;
            imbalance = 0;
        } else {
            imbalance -= max_redu;
        }
        if reduction != 0 {
            for &i in &scratch[..nreduce] {
                pool.reqs[i].navail -= reduction;
            }
        }
        for &i in scratch[..nreduce].iter().rev().take(nremain as usize) {
            pool.reqs[i].navail -= 1;
        }
    }
    true
}

/// `i_ddi_irm_reduce`
fn reduce(pool: &mut Pool, scratch: &[usize]) {
    let (resno, total) = (pool.resno(), pool.total);
    if resno <= total {
        return;
    }
    if !reduce_by_policy(pool, scratch, resno - total) {
        // i_ddi_irm_reduce_new: the one new request takes the rest.
        let imbalance = pool.resno().saturating_sub(pool.total);
        if let Some(&i) = scratch.iter().find(|&&i| pool.reqs[i].new) {
            pool.reqs[i].navail = pool.reqs[i].navail.saturating_sub(imbalance);
        }
    }
}

/// The part of `i_ddi_irm_balance` done under the pool lock: requests
/// reset to their maximum, reduced; returns the notifications due
/// (`(dip, old navail, new navail)`), REMOVEs first.
fn balance_locked(irm: &mut Irm) -> Vec<(usize, u32, u32)> {
    irm.queued = false;
    let Some(pool) = irm.pool.as_mut() else {
        return Vec::new();
    };
    if pool.reqno() == pool.resno() {
        return Vec::new(); // "pool already balanced"
    }
    let scratch: Vec<usize> = (0..pool.reqs.len())
        .filter(|&i| pool.reqs[i].reducible())
        .collect();
    for &i in &scratch {
        let r = &mut pool.reqs[i];
        r.scratch = r.navail;
        r.navail = r.nreq;
    }
    reduce(pool, &scratch);
    let mut due: Vec<(usize, u32, u32)> = scratch
        .iter()
        .map(|&i| &pool.reqs[i])
        .filter(|r| !r.new && r.navail != r.scratch)
        .map(|r| (r.dip, r.scratch, r.navail))
        .collect();
    due.sort_by_key(|&(_, old, new)| new > old);
    due
}

/// Runs a balance of `m`'s pool as its balance thread would, delivering
/// the callbacks on the calling thread; the caller holds the pool lock.
/// Returns the notifications made.
fn balance(m: &Arc<Machine>) -> Vec<(usize, c_int, u32)> {
    let mut done = Vec::new();
    let mut due = balance_locked(&mut lock(&m.irm));
    // A driver that does not release what it lost keeps it; the others
    // are reduced again (the loop of i_ddi_irm_balance).
    let mut rounds = 0;
    while let Some((dip, old, new)) = due.first().copied() {
        due.remove(0);
        let action = if new > old {
            ffi::DDI_CB_INTR_ADD
        } else {
            ffi::DDI_CB_INTR_REMOVE
        };
        let count = old.abs_diff(new);
        let ok = notify(m, dip, action, count);
        done.push((dip, action, count));
        if !ok && action == ffi::DDI_CB_INTR_REMOVE && rounds < 4 {
            rounds += 1;
            let mut irm = lock(&m.irm);
            if let Some(pool) = irm.pool.as_mut() {
                let scratch: Vec<usize> = (0..pool.reqs.len())
                    .filter(|&i| pool.reqs[i].reducible() && pool.reqs[i].dip != dip)
                    .collect();
                reduce(pool, &scratch);
            }
        }
    }
    done
}

/// `i_ddi_irm_notify` for one request; false if the driver kept more than
/// it was left.
fn notify(m: &Arc<Machine>, dip: usize, action: c_int, count: u32) -> bool {
    let cb = {
        let mut irm = lock(&m.irm);
        let cb = irm
            .callbacks
            .iter()
            .find(|c| c.dip == dip && c.flags & ffi::DDI_CB_FLAG_INTR != 0)
            .copied();
        if cb.is_some() {
            irm.in_callback = Some((dip, std::thread::current().id()));
        }
        cb
    };
    let ret = match cb {
        Some(cb) => {
            let _g = crate::machine::set_current(m);
            let _frame = crate::meter::driver();
            // SAFETY: the driver registered this callback with these
            // arguments (ddi_cb_register) and has not unregistered it; the
            // calling thread is kernel context, as the balance thread is.
            unsafe {
                (cb.func)(
                    dip as *mut dev_info_t,
                    action,
                    count as usize as *mut c_void,
                    cb.arg1 as *mut c_void,
                    cb.arg2 as *mut c_void,
                )
            }
        }
        // Another (made-up) device: it does what it is told.
        None if dip < 0x1000 => {
            let mut irm = lock(&m.irm);
            if let Some(p) = irm.pool.as_mut()
                && let Some(i) = p.find(dip)
            {
                p.reqs[i].scratch = p.reqs[i].navail;
            }
            return true;
        }
        None => ffi::DDI_FAILURE,
    };
    let mut irm = lock(&m.irm);
    irm.in_callback = None;
    if ret != ffi::DDI_SUCCESS {
        m.log_line(
            ffi::CE_WARN,
            &format!("rvscsi: failed callback (action={action}, ret={ret})"),
        );
    }
    let nintrs = irm.nintrs_of(dip);
    let Some(pool) = irm.pool.as_mut() else {
        return true;
    };
    let Some(i) = pool.find(dip) else {
        return true;
    };
    let navail = pool.reqs[i].navail;
    if nintrs > navail {
        let text =
            format!("rvscsi: failed to release interrupts (nintrs={nintrs}, navail={navail}).");
        m.log_line(ffi::CE_WARN, &text);
        pool.reqs[i].navail = nintrs;
        drop(irm);
        m.violation(format!(
            "IRM: the driver kept {nintrs} interrupts after a DDI_CB_INTR_REMOVE left it {navail} \
             (ddi_cb_register(9F): it must release the excess)"
        ));
        return false;
    }
    pool.reqs[i].scratch = navail;
    true
}

/// Whether the calling thread runs `dip`'s IRM callback.
fn in_own_callback(irm: &Irm, dip: usize) -> bool {
    irm.in_callback == Some((dip, std::thread::current().id()))
}

/// Takes the pool lock, unless the calling thread is the balance thread
/// running `dip`'s callback (which holds it already).
fn pool_guard(m: &Machine, dip: usize) -> Option<std::sync::MutexGuard<'_, ()>> {
    if in_own_callback(&lock(&m.irm), dip) {
        None
    } else {
        Some(lock(&m.irm_pool_lock))
    }
}

/// `i_ddi_irm_set_cb`: a callback registered (`true`) or unregistered.
/// The caller holds the pool lock.
fn irm_set_cb(m: &Arc<Machine>, dip: usize, has_cb: bool) {
    let mut irm = lock(&m.irm);
    let limit = irm.msix_alloc_limit;
    let Some(pool) = irm.pool.as_mut() else {
        return;
    };
    let Some(i) = pool.find(dip) else {
        return;
    };
    if has_cb {
        if pool.reqs[i].typ == ffi::DDI_INTR_TYPE_MSIX {
            pool.reqs[i].callback = true;
        }
        irm.queued = true; // rebalance in the background
        return;
    }
    let r = &mut pool.reqs[i];
    let mut nreq = r.nreq.min(pool.defsz);
    if r.typ == ffi::DDI_INTR_TYPE_MSIX {
        nreq = nreq.min(limit);
    }
    r.nreq = nreq;
    let r = pool.reqs.remove(i);
    pool.insert_sorted(r);
    drop(irm);
    // "Rebalance synchronously, before losing callback".
    balance(m);
    let mut irm = lock(&m.irm);
    if let Some(pool) = irm.pool.as_mut()
        && let Some(i) = pool.find(dip)
    {
        pool.reqs[i].callback = false;
    }
}

/// The grant of the device's IRM request: `(requested, available)`.
pub fn irm_grant(m: &Machine, dip: *mut dev_info_t) -> Option<(u32, u32)> {
    let irm = lock(&m.irm);
    let p = irm.pool.as_ref()?;
    let r = &p.reqs[p.find(dip as usize)?];
    Some((r.nreq, r.navail))
}

/// The interrupt vectors the device has allocated.
pub fn allocated(m: &Machine, dip: *mut dev_info_t) -> usize {
    lock(&m.irm).nintrs_of(dip as usize) as usize
}

/// The platform module of the machine.
pub fn psm(m: &Machine) -> Psm {
    lock(&m.irm).psm
}

/// The pool's `(total, default size)`, apix only.
pub fn irm_pool(m: &Machine) -> Option<(u32, u32)> {
    lock(&m.irm).pool.as_ref().map(|p| (p.total, p.defsz))
}

/// Another device of the machine takes MSI-X vectors from the pool: as if
/// a driver without an IRM callback attached and called
/// `ddi_intr_alloc(.., DDI_INTR_TYPE_MSIX, 0, count, ..)` for a device of
/// `count` vectors. Its request is inserted as `i_ddi_irm_insert` does
/// (balancing at once when it does not fit, which may reduce IRM drivers,
/// whose callbacks run on this thread). Returns its handle and what it got.
pub fn irm_add_device(m: &Arc<Machine>, count: u32) -> Result<(usize, u32), String> {
    let _pool = lock(&m.irm_pool_lock);
    let id = {
        let mut irm = lock(&m.irm);
        if irm.pool.is_none() {
            return Err("no IRM pool on this platform (pcplusmp)".into());
        }
        let id = irm.next_other;
        irm.next_other += 1;
        let nreq = count.min(irm.limit(id, ffi::DDI_INTR_TYPE_MSIX, count));
        let pool = irm.pool.as_mut().expect("pool");
        if pool.minno() + nreq > pool.total {
            return Err("interrupt pool too full".into());
        }
        let resno = pool.resno();
        let fits = resno + nreq <= pool.total;
        pool.insert_sorted(Request {
            dip: id,
            typ: ffi::DDI_INTR_TYPE_MSIX,
            nreq,
            navail: if fits { nreq } else { 0 },
            scratch: 0,
            callback: false,
            new: !fits,
        });
        id
    };
    balance(m);
    let mut irm = lock(&m.irm);
    let pool = irm.pool.as_mut().expect("pool");
    let i = pool.find(id).expect("inserted");
    pool.reqs[i].new = false;
    let got = pool.reqs[i].navail;
    if got == 0 {
        pool.reqs.remove(i);
        return Err("interrupt pool too full".into());
    }
    Ok((id, got))
}

/// The other device of [`irm_add_device`] frees its vectors
/// (`i_ddi_irm_remove`); the balance illumos queues then runs here.
pub fn irm_remove_device(m: &Arc<Machine>, id: usize) {
    let _pool = lock(&m.irm_pool_lock);
    {
        let mut irm = lock(&m.irm);
        if let Some(pool) = irm.pool.as_mut()
            && let Some(i) = pool.find(id)
        {
            pool.reqs.remove(i);
        }
    }
    balance(m);
}

/// Runs the balance illumos's balance thread would (queued or periodic),
/// delivering callbacks on this thread; the notifications made
/// (`(action, count)`).
pub fn irm_balance(m: &Arc<Machine>) -> Vec<(c_int, u32)> {
    let _pool = lock(&m.irm_pool_lock);
    balance(m).into_iter().map(|(_, a, c)| (a, c)).collect()
}

/// What the PCI function offers.
struct Caps {
    msix: Option<(u8, usize)>,
    msi: Option<u8>,
    pin: u8,
}

fn caps(m: &Machine) -> Caps {
    let pci = Pci::new(&*m.qt);
    let list = pci.capabilities(m.bdf).unwrap_or_default();
    let msix = list
        .iter()
        .find(|(_, id)| *id == ffi::PCI_CAP_ID_MSI_X)
        .map(|&(at, _)| {
            let ctrl = pci.cfg_read16(m.bdf, at + 2).unwrap_or(0);
            (at, usize::from(ctrl & 0x7ff) + 1)
        });
    let msi = list
        .iter()
        .find(|(_, id)| *id == ffi::PCI_CAP_ID_MSI)
        .map(|&(at, _)| at);
    let pin = pci.cfg_read8(m.bdf, 0x3d).unwrap_or(0);
    Caps { msix, msi, pin }
}

/// An interrupt handle.
struct IntrHandle {
    machine: Arc<Machine>,
    dip: usize,
    inum: usize,
    pri: c_uint,
}

static HANDLES: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn get<'a>(h: ddi_intr_handle_t, func: &str) -> Option<&'a IntrHandle> {
    if h.is_null()
        || !lock(&HANDLES)
            .get_or_insert_with(HashSet::new)
            .contains(&(h as usize))
    {
        violation(format!("{func}: invalid interrupt handle {h:p}"));
        return None;
    }
    // SAFETY: registered handles are live boxes.
    Some(unsafe { &*h.cast::<IntrHandle>() })
}

/// `ddi_intr_get_supported_types(9F)`
///
/// # Safety
/// `typesp` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_get_supported_types(
    dip: *mut dev_info_t,
    typesp: *mut c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_intr_get_supported_types") else {
        return ffi::DDI_EINVAL;
    };
    let c = caps(&n.machine);
    let mut t = 0;
    if c.msix.is_some() {
        t |= ffi::DDI_INTR_TYPE_MSIX;
    }
    if c.msi.is_some() {
        t |= ffi::DDI_INTR_TYPE_MSI;
    }
    if c.pin != 0 {
        t |= ffi::DDI_INTR_TYPE_FIXED;
    }
    if typesp.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: checked non-null.
    unsafe { *typesp = t };
    if t == 0 {
        return ffi::DDI_INTR_NOTFOUND;
    }
    ffi::DDI_SUCCESS
}

fn count_of(m: &Machine, typ: c_int) -> Option<usize> {
    let c = caps(m);
    match typ {
        ffi::DDI_INTR_TYPE_MSIX => c.msix.map(|(_, n)| n),
        ffi::DDI_INTR_TYPE_MSI => c.msi.map(|_| 1),
        ffi::DDI_INTR_TYPE_FIXED => (c.pin != 0).then_some(1),
        _ => None,
    }
}

/// `ddi_intr_get_nintrs(9F)`: `DDI_EINVAL` for a type the device does
/// not support (`ddi_intr.c`).
///
/// # Safety
/// `np` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_get_nintrs(
    dip: *mut dev_info_t,
    typ: c_int,
    np: *mut c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_intr_get_nintrs") else {
        return ffi::DDI_EINVAL;
    };
    match (count_of(&n.machine, typ), np.is_null()) {
        (Some(c), false) => {
            // SAFETY: checked non-null.
            unsafe { *np = c as c_int };
            ffi::DDI_SUCCESS
        }
        _ => ffi::DDI_EINVAL,
    }
}

/// `ddi_intr_get_navail(9F)`: what the device may allocate now, the IRM
/// pool's grant or the platform's limit (`i_ddi_intr_get_current_navail`);
/// `DDI_INTR_NOTFOUND` when that is 0.
///
/// # Safety
/// `np` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_get_navail(
    dip: *mut dev_info_t,
    typ: c_int,
    np: *mut c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_intr_get_navail") else {
        return ffi::DDI_EINVAL;
    };
    let Some(nintrs) = count_of(&n.machine, typ) else {
        return ffi::DDI_EINVAL;
    };
    if np.is_null() {
        return ffi::DDI_EINVAL;
    }
    let navail = lock(&n.machine.irm).current_navail(dip as usize, typ, nintrs as u32);
    // SAFETY: checked non-null.
    unsafe { *np = navail as c_int };
    if navail == 0 {
        return ffi::DDI_INTR_NOTFOUND;
    }
    ffi::DDI_SUCCESS
}

/// The priority the x86 PCI nexus gives the device's MSI/MSI-X interrupts
/// (`pci_get_priority` -> `pci_intx_get_ispec`): the first element of an
/// `interrupt-priorities` property (driver.conf or hardware), which
/// `impl_xlate_intrs` refuses outside 1..=MAXIPL, else [`INTR_PRI`].
fn interrupt_priority(dip: *mut dev_info_t) -> Result<c_uint, String> {
    let Some(n) = node(dip, "ddi_intr_alloc") else {
        return Err("no node".into());
    };
    let p = lock(&n.props).get("interrupt-priorities").cloned();
    let level = match p {
        None => return Ok(INTR_PRI),
        Some(Prop::Int(v)) => v,
        Some(Prop::Ints(v)) if v.len() == 1 => v[0],
        Some(Prop::Ints(v)) => {
            return Err(format!(
                "bad interrupt-priorities length from rvscsi{}: expected 1, got {}",
                n.instance,
                v.len()
            ));
        }
        Some(Prop::Str(_)) => return Err("interrupt-priorities is not an integer".into()),
        // An int64 property is not read by the nexus's int lookup.
        Some(Prop::Int64(_)) => {
            return Err("interrupt-priorities is an int64 property, not an int array".into());
        }
    };
    if !(1..=MAXIPL).contains(&level) {
        return Err(format!(
            "bad interrupt spec from rvscsi{} - ipl {level}",
            n.instance
        ));
    }
    Ok(level as c_uint)
}

/// `ddi_intr_alloc(9F)`, as `ddi_intr.c` does it (see the module
/// documentation for the grant).
///
/// # Safety
/// `h_array` must have room for `inum + count` handles; `actualp` valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_alloc(
    dip: *mut dev_info_t,
    h_array: *mut ddi_intr_handle_t,
    typ: c_int,
    inum: c_int,
    count: c_int,
    actualp: *mut c_int,
    behavior: c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_intr_alloc") else {
        return ffi::DDI_EINVAL;
    };
    let m = &n.machine;
    if h_array.is_null()
        || actualp.is_null()
        || count < 1
        || inum < 0
        || (behavior != ffi::DDI_INTR_ALLOC_NORMAL && behavior != ffi::DDI_INTR_ALLOC_STRICT)
    {
        violation("ddi_intr_alloc: bad arguments");
        return ffi::DDI_EINVAL;
    }
    // SAFETY: checked non-null.
    unsafe { *actualp = 0 };
    let Some(nintrs) = count_of(m, typ) else {
        return ffi::DDI_EINVAL; // type not supported
    };
    let nintrs = nintrs as u32;
    let (count, inum) = (count as u32, inum as usize);
    let key = dip as usize;
    let name = format!("rvscsi{}", n.instance);
    let pri = match interrupt_priority(dip) {
        Ok(p) => p,
        Err(e) => {
            m.log_line(ffi::CE_WARN, &e);
            return ffi::DDI_FAILURE;
        }
    };
    let _pool = pool_guard(m, key);
    let mut irm = lock(&m.irm);
    let (curr_type, curr) = irm
        .devs
        .get(&key)
        .map_or((0, 0), |d| (d.typ, d.inums.len() as u32));
    if curr_type != 0 && typ != curr_type {
        return ffi::DDI_EINVAL;
    }
    if count > nintrs || count + curr > nintrs {
        return ffi::DDI_EINVAL;
    }
    if typ == ffi::DDI_INTR_TYPE_MSI && !(curr + count).is_power_of_two() {
        return ffi::DDI_EINVAL;
    }
    if in_own_callback(&irm, key) && curr == 0 {
        violation(
            "ddi_intr_alloc of a first vector from the IRM callback: i_ddi_irm_insert takes the \
             pool lock the balance thread holds (deadlock)",
        );
        return ffi::DDI_FAILURE;
    }
    if curr == 0 {
        irm.devs.insert(
            key,
            DevIntr {
                typ,
                inums: BTreeSet::new(),
            },
        );
        if let Insert::Again(text) = irm_insert(&mut irm, key, typ, count, nintrs, &name) {
            irm.devs.remove(&key);
            drop(irm);
            m.log_line(ffi::CE_WARN, &text);
            m.log_line(
                ffi::CE_WARN,
                "ddi_intr_alloc: cannot fit into interrupt pool",
            );
            return ffi::DDI_EAGAIN;
        }
    }
    if curr > 0 && !irm.irm_supported(key, typ) {
        irm_modify_static(&mut irm, key, count + curr, nintrs);
    }
    let navail = irm.current_navail(key, typ, nintrs);
    let fini = |irm: &mut Irm| {
        if curr == 0 {
            irm.devs.remove(&key);
            if let Some(p) = irm.pool.as_mut()
                && let Some(i) = p.find(key)
            {
                p.reqs.remove(i);
            }
        } else if !irm.irm_supported(key, typ) {
            irm_modify_static(irm, key, curr, nintrs);
        }
    };
    if curr >= navail {
        fini(&mut irm);
        return ffi::DDI_EAGAIN;
    }
    let mut count = count;
    if count + curr > navail {
        if behavior == ffi::DDI_INTR_ALLOC_STRICT {
            fini(&mut irm);
            return ffi::DDI_EAGAIN;
        }
        count = navail - curr;
    }
    let dev = irm.devs.get_mut(&key).expect("inserted above");
    let wanted: Vec<usize> = (inum..inum + count as usize).collect();
    if wanted.iter().any(|i| dev.inums.contains(i)) || inum + count as usize > nintrs as usize {
        drop(irm);
        violation(format!(
            "ddi_intr_alloc: inum {inum}..{} overlaps vectors already allocated or exceeds the \
             device's {nintrs}",
            inum + count as usize
        ));
        return ffi::DDI_EINVAL;
    }
    dev.inums.extend(wanted.iter().copied());
    drop(irm);
    let kind = match typ {
        ffi::DDI_INTR_TYPE_MSIX => IntrType::MsiX,
        ffi::DDI_INTR_TYPE_MSI => IntrType::Msi,
        _ => IntrType::Fixed,
    };
    {
        let mut st = lock(&m.intr);
        st.kind = kind;
        let need = inum + count as usize;
        if st.vectors.len() < need {
            st.vectors.resize(
                need,
                VectorSlot {
                    handler: None,
                    enabled: false,
                },
            );
        }
    }
    for i in wanted {
        let h = Box::into_raw(Box::new(IntrHandle {
            machine: m.clone(),
            dip: key,
            inum: i,
            pri,
        }));
        lock(&HANDLES)
            .get_or_insert_with(HashSet::new)
            .insert(h as usize);
        bump(&m.live.intr_handles, 1);
        // SAFETY: the caller's array has room for inum + count handles;
        // ddi_intr_alloc fills h_array[inum..inum + actual].
        unsafe { *h_array.add(i) = h.cast() };
    }
    // SAFETY: checked non-null.
    unsafe { *actualp = count as c_int };
    ffi::DDI_SUCCESS
}

/// `ddi_intr_free(9F)`: `DDI_EINVAL` (and nothing freed) for a vector that
/// still has a handler or is enabled.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_intr_free(h: ddi_intr_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(ih) = get(h, "ddi_intr_free") else {
        return ffi::DDI_EINVAL;
    };
    let m = ih.machine.clone();
    let (key, inum) = (ih.dip, ih.inum);
    {
        let st = lock(&m.intr);
        if let Some(v) = st.vectors.get(inum)
            && (v.handler.is_some() || v.enabled)
        {
            drop(st);
            violation("ddi_intr_free of a vector still enabled or with a handler");
            return ffi::DDI_EINVAL;
        }
    }
    let _pool = pool_guard(&m, key);
    let mut irm = lock(&m.irm);
    let left = {
        let Some(dev) = irm.devs.get_mut(&key) else {
            return ffi::DDI_EINVAL;
        };
        dev.inums.remove(&inum);
        dev.inums.len() as u32
    };
    if left == 0 && in_own_callback(&irm, key) {
        if let Some(dev) = irm.devs.get_mut(&key) {
            dev.inums.insert(inum);
        }
        drop(irm);
        violation(
            "ddi_intr_free of the last vector from the IRM callback: i_ddi_irm_remove takes the \
             pool lock the balance thread holds (deadlock)",
        );
        return ffi::DDI_FAILURE;
    }
    let typ = irm.devs.get(&key).map_or(0, |d| d.typ);
    if left > 0 && !irm.irm_supported(key, typ) {
        let nintrs = count_of(&m, typ).unwrap_or(0) as u32;
        irm_modify_static(&mut irm, key, left, nintrs);
    }
    if left == 0 {
        // i_ddi_intr_devi_fini -> i_ddi_irm_remove
        irm.devs.remove(&key);
        if let Some(p) = irm.pool.as_mut()
            && let Some(i) = p.find(key)
        {
            p.reqs.remove(i);
            irm.queued = true;
        }
    }
    drop(irm);
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .remove(&(h as usize));
    // SAFETY: registered, made by Box::into_raw.
    drop(unsafe { Box::from_raw(h.cast::<IntrHandle>()) });
    bump(&m.live.intr_handles, -1);
    if left == 0 {
        let mut st = lock(&m.intr);
        st.kind = IntrType::None;
        st.vectors.clear();
    }
    ffi::DDI_SUCCESS
}

/// `ddi_intr_get_pri(9F)`: the level the nexus gave at allocation.
///
/// # Safety
/// `prip` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_get_pri(h: ddi_intr_handle_t, prip: *mut c_uint) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(ih) = get(h, "ddi_intr_get_pri") else {
        return ffi::DDI_EINVAL;
    };
    if prip.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: checked non-null.
    unsafe { *prip = ih.pri };
    ffi::DDI_SUCCESS
}

/// `ddi_intr_get_hilevel_pri(9F)`: `LOCK_LEVEL + 1` (`ddi_intr.c`).
#[unsafe(no_mangle)]
pub extern "C" fn ddi_intr_get_hilevel_pri() -> c_uint {
    let _kernel = crate::meter::kernel();
    LOCK_LEVEL + 1
}

/// Registered callback handles (`ddi_cb_handle_t` values given out).
static CB_HANDLES: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

/// `ddi_cb_register(9F)` (`common/os/sunddi.c`): one registration per
/// node (`DDI_EALREADY`), not from interrupt context; an IRM callback
/// (`DDI_CB_FLAG_INTR`) makes the node's MSI-X request reducible
/// (`i_ddi_irm_set_cb`).
///
/// # Safety
/// `ret_hdlp` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_cb_register(
    dip: *mut dev_info_t,
    flags: c_int,
    cbfunc: Option<ddi_cb_func_t>,
    arg1: *mut c_void,
    arg2: *mut c_void,
    ret_hdlp: *mut ddi_cb_handle_t,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_cb_register") else {
        return ffi::DDI_EINVAL;
    };
    let m = n.machine.clone();
    if crate::ddi::sync::in_interrupt() {
        violation("ddi_cb_register from interrupt context");
        return ffi::DDI_FAILURE;
    }
    let Some(func) = cbfunc else {
        violation("ddi_cb_register: null callback");
        return ffi::DDI_EINVAL;
    };
    if flags & ffi::DDI_CB_FLAG_INTR == 0 || ret_hdlp.is_null() {
        violation("ddi_cb_register: invalid flags or null handle pointer");
        return ffi::DDI_EINVAL;
    }
    let handle = {
        let mut irm = lock(&m.irm);
        if irm.callbacks.iter().any(|c| c.dip == dip as usize) {
            return ffi::DDI_EALREADY;
        }
        let handle = Box::into_raw(Box::new(0usize)) as usize;
        irm.callbacks.push(Callback {
            dip: dip as usize,
            flags,
            func,
            arg1: arg1 as usize,
            arg2: arg2 as usize,
            handle,
        });
        handle
    };
    lock(&CB_HANDLES)
        .get_or_insert_with(HashSet::new)
        .insert(handle);
    bump(&m.live.callbacks, 1);
    {
        let _pool = lock(&m.irm_pool_lock);
        irm_set_cb(&m, dip as usize, true);
    }
    // SAFETY: checked non-null.
    unsafe { *ret_hdlp = handle as ddi_cb_handle_t };
    ffi::DDI_SUCCESS
}

/// `ddi_cb_unregister(9F)`: with interrupts still allocated, the request
/// shrinks to the static limit first, and the balance that does it
/// notifies the callback still registered (`i_ddi_irm_set_cb`).
#[unsafe(no_mangle)]
pub extern "C" fn ddi_cb_unregister(hdl: ddi_cb_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    if crate::ddi::sync::in_interrupt() {
        violation("ddi_cb_unregister from interrupt context");
        return ffi::DDI_FAILURE;
    }
    let known = lock(&CB_HANDLES)
        .get_or_insert_with(HashSet::new)
        .contains(&(hdl as usize));
    let Some(m) = crate::machine::current() else {
        violation("ddi_cb_unregister: no machine");
        return ffi::DDI_EINVAL;
    };
    if !known {
        violation(format!("ddi_cb_unregister: invalid handle {hdl:p}"));
        return ffi::DDI_EINVAL;
    }
    let cb = {
        let irm = lock(&m.irm);
        irm.callbacks
            .iter()
            .find(|c| c.handle == hdl as usize)
            .copied()
    };
    let Some(cb) = cb else {
        violation("ddi_cb_unregister: handle of another machine");
        return ffi::DDI_EINVAL;
    };
    if in_own_callback(&lock(&m.irm), cb.dip) {
        violation(
            "ddi_cb_unregister from the IRM callback: i_ddi_irm_set_cb takes the pool lock the \
             balance thread holds (deadlock)",
        );
        return ffi::DDI_FAILURE;
    }
    if cb.flags & ffi::DDI_CB_FLAG_INTR != 0 {
        let _pool = lock(&m.irm_pool_lock);
        irm_set_cb(&m, cb.dip, false);
    }
    lock(&m.irm).callbacks.retain(|c| c.handle != cb.handle);
    lock(&CB_HANDLES)
        .get_or_insert_with(HashSet::new)
        .remove(&cb.handle);
    // SAFETY: made by Box::into_raw in ddi_cb_register, removed above.
    drop(unsafe { Box::from_raw(cb.handle as *mut usize) });
    bump(&m.live.callbacks, -1);
    ffi::DDI_SUCCESS
}

/// `ddi_intr_get_cap(9F)`: MSI must be block-enabled; MSI-X and fixed may
/// be enabled one by one.
///
/// # Safety
/// `flagsp` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_get_cap(h: ddi_intr_handle_t, flagsp: *mut c_int) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(ih) = get(h, "ddi_intr_get_cap") else {
        return ffi::DDI_FAILURE;
    };
    if flagsp.is_null() {
        return ffi::DDI_FAILURE;
    }
    let kind = lock(&ih.machine.intr).kind;
    let f = match kind {
        IntrType::Msi => 0x2 | ffi::DDI_INTR_FLAG_BLOCK,
        IntrType::MsiX => 0x2 | 0x10,
        _ => 0x1,
    };
    // SAFETY: checked non-null.
    unsafe { *flagsp = f };
    ffi::DDI_SUCCESS
}

/// `ddi_intr_add_handler(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_intr_add_handler(
    h: ddi_intr_handle_t,
    f: ddi_intr_handler_t,
    a1: *mut c_void,
    a2: *mut c_void,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(ih) = get(h, "ddi_intr_add_handler") else {
        return ffi::DDI_FAILURE;
    };
    let mut st = lock(&ih.machine.intr);
    let Some(v) = st.vectors.get_mut(ih.inum) else {
        return ffi::DDI_FAILURE;
    };
    if v.handler.is_some() {
        violation("ddi_intr_add_handler on a vector that has one");
        return ffi::DDI_FAILURE;
    }
    v.handler = Some((f, a1 as usize, a2 as usize));
    bump(&ih.machine.live.intr_handlers, 1);
    ffi::DDI_SUCCESS
}

/// `ddi_intr_remove_handler(9F)`: the vector must be disabled.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_intr_remove_handler(h: ddi_intr_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(ih) = get(h, "ddi_intr_remove_handler") else {
        return ffi::DDI_FAILURE;
    };
    let _d = lock(&ih.machine.dispatch);
    let mut st = lock(&ih.machine.intr);
    let Some(v) = st.vectors.get_mut(ih.inum) else {
        return ffi::DDI_FAILURE;
    };
    if v.enabled {
        violation("ddi_intr_remove_handler on an enabled vector");
    }
    if v.handler.take().is_some() {
        bump(&ih.machine.live.intr_handlers, -1);
    }
    ffi::DDI_SUCCESS
}

/// Programs the device for vector `inum` (or masks it).
fn program(m: &Machine, kind: IntrType, inum: usize, on: bool) {
    let c = caps(m);
    let pci = Pci::new(&*m.qt);
    let Some((msg_addr, data)) = crate::msi::message_for(inum) else {
        violation(format!("no APIC vector for interrupt {inum}"));
        return;
    };
    let r: Result<(), rvscsi_qtest::Error> = (|| {
        match kind {
            IntrType::MsiX => {
                let (at, _) = c
                    .msix
                    .ok_or_else(|| rvscsi_qtest::Error::Protocol("no MSI-X capability".into()))?;
                let table = pci.cfg_read32(m.bdf, at + 4)?;
                let bar = m
                    .bar((table & 7) as u8)
                    .ok_or_else(|| rvscsi_qtest::Error::Protocol("MSI-X table BAR".into()))?;
                let entry = bar.addr + u64::from(table & !7) + 16 * inum as u64;
                if on {
                    m.qt.writel(entry, msg_addr as u32)?;
                    m.qt.writel(entry + 4, (msg_addr >> 32) as u32)?;
                    m.qt.writel(entry + 8, data)?;
                    m.qt.writel(entry + 12, 0)?;
                    let ctrl = pci.cfg_read16(m.bdf, at + 2)?;
                    pci.cfg_write16(m.bdf, at + 2, (ctrl | 0x8000) & !0x4000)?;
                } else {
                    m.qt.writel(entry + 12, 1)?;
                }
            }
            IntrType::Msi => {
                let at = c
                    .msi
                    .ok_or_else(|| rvscsi_qtest::Error::Protocol("no MSI capability".into()))?;
                let ctrl = pci.cfg_read16(m.bdf, at + 2)?;
                if on {
                    let is64 = ctrl & 0x80 != 0;
                    pci.cfg_write32(m.bdf, at + 4, msg_addr as u32)?;
                    if is64 {
                        pci.cfg_write32(m.bdf, at + 8, (msg_addr >> 32) as u32)?;
                        pci.cfg_write16(m.bdf, at + 12, data as u16)?;
                    } else {
                        pci.cfg_write16(m.bdf, at + 8, data as u16)?;
                    }
                    pci.cfg_write16(m.bdf, at + 2, (ctrl & !0x70) | 1)?;
                } else {
                    pci.cfg_write16(m.bdf, at + 2, ctrl & !1)?;
                }
            }
            IntrType::Fixed | IntrType::None => {}
        }
        Ok(())
    })();
    if let Err(e) = r {
        m.device_failed("interrupt programming", &e);
    }
}

fn set_enabled(h: ddi_intr_handle_t, on: bool, func: &str) -> c_int {
    let Some(ih) = get(h, func) else {
        return ffi::DDI_FAILURE;
    };
    let m = &ih.machine;
    if !on && m.on_interrupt_thread() {
        violation(format!("{func} from an interrupt handler"));
        return ffi::DDI_FAILURE;
    }
    // Disabling waits for a handler running on this vector to return.
    let _d = lock(&m.dispatch);
    let kind = {
        let mut st = lock(&m.intr);
        let kind = st.kind;
        let Some(v) = st.vectors.get_mut(ih.inum) else {
            return ffi::DDI_FAILURE;
        };
        if on && v.handler.is_none() {
            violation(format!("{func} of a vector without a handler"));
        }
        if v.enabled == on {
            violation(format!(
                "{func} of a vector already {}",
                if on { "enabled" } else { "disabled" }
            ));
        }
        v.enabled = on;
        kind
    };
    program(m, kind, ih.inum, on);
    if !on && kind == IntrType::MsiX && lock(&m.intr).vectors.iter().all(|v| !v.enabled) {
        // Last vector off: MSI-X off in the device too.
        if let Some((at, _)) = caps(m).msix {
            let pci = Pci::new(&*m.qt);
            if let Ok(ctrl) = pci.cfg_read16(m.bdf, at + 2) {
                let _ = pci.cfg_write16(m.bdf, at + 2, ctrl & !0x8000);
            }
        }
    }
    m.kick();
    ffi::DDI_SUCCESS
}

/// `ddi_intr_enable(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_intr_enable(h: ddi_intr_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    set_enabled(h, true, "ddi_intr_enable")
}

/// `ddi_intr_disable(9F)`: on return no handler of the vector runs.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_intr_disable(h: ddi_intr_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    set_enabled(h, false, "ddi_intr_disable")
}

/// `ddi_intr_block_enable(9F)`
///
/// # Safety
/// `h_array` must hold `count` handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_block_enable(
    h_array: *mut ddi_intr_handle_t,
    count: c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    for i in 0..count.max(0) as usize {
        // SAFETY: count handles (caller).
        if set_enabled(unsafe { *h_array.add(i) }, true, "ddi_intr_block_enable")
            != ffi::DDI_SUCCESS
        {
            return ffi::DDI_FAILURE;
        }
    }
    ffi::DDI_SUCCESS
}

/// `ddi_intr_block_disable(9F)`
///
/// # Safety
/// `h_array` must hold `count` handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_block_disable(
    h_array: *mut ddi_intr_handle_t,
    count: c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    for i in 0..count.max(0) as usize {
        // SAFETY: count handles (caller).
        set_enabled(unsafe { *h_array.add(i) }, false, "ddi_intr_block_disable");
    }
    ffi::DDI_SUCCESS
}
