//! Register and configuration access: `ddi_regs_map_setup(9F)`,
//! `ddi_get8(9F)`/`ddi_put8(9F)` and friends, `pci_config_setup(9F)`.
//!
//! A register mapping hands the driver an address in a range no memory
//! backs (a stray dereference crashes the test instead of reading
//! something plausible); the access functions translate it into a qtest
//! port or MMIO access of the BAR, each one counted as a would-be VM exit.

use super::devinfo::{DevInfo, Prop, node};
use super::violation;
use crate::machine::{BarInfo, Machine, bump, lock};
use rvscsi::ffi::{
    self, caddr_t, ddi_acc_handle_t, ddi_device_acc_attr_t, dev_info_t, off_t, offset_t,
};
use rvscsi_qtest::Pci;
use std::collections::HashSet;
use std::ffi::{c_int, c_uint};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Base of the fake kernel addresses of register mappings.
const FAKE_VA_BASE: u64 = 0x0000_6000_0000_0000;
/// Spacing between mappings.
const FAKE_VA_STRIDE: u64 = 1 << 24;
static NEXT_VA: AtomicU64 = AtomicU64::new(FAKE_VA_BASE);

#[derive(Clone, Copy, Debug)]
enum AccKind {
    Io(u16),
    Mem(u64),
    Config,
}

/// An access handle (`ddi_acc_handle_t` points at one).
pub struct AccHandle {
    machine: Arc<Machine>,
    kind: AccKind,
    base: usize,
    len: usize,
    /// Mapped with `DDI_FLAGERR_ACC` (version 1) by an ACCCHK-capable
    /// driver: the nexus ties access faults to it.
    flagerr: bool,
}

static HANDLES: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn register(h: AccHandle) -> ddi_acc_handle_t {
    bump(&h.machine.live.acc_handles, 1);
    let p = Box::into_raw(Box::new(h));
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .insert(p as usize);
    p.cast()
}

fn get<'a>(h: ddi_acc_handle_t, func: &str) -> Option<&'a AccHandle> {
    if h.is_null()
        || !lock(&HANDLES)
            .get_or_insert_with(HashSet::new)
            .contains(&(h as usize))
    {
        violation(format!("{func}: invalid access handle {h:p}"));
        return None;
    }
    // SAFETY: registered handles are live boxes.
    Some(unsafe { &*h.cast::<AccHandle>() })
}

/// Whether live access handle `h` reports faults to `ddi_fm_acc_err_get`:
/// mapped with `DDI_FLAGERR_ACC` in a version-1 attribute by a driver
/// granted the access check (impl_acc_err_init, uts/i86pc/os/ddi_impl.c;
/// otherwise the access is DDI_DEFAULT_ACC and the nexus ties no fault to
/// the handle).
pub fn flags_errors(h: ddi_acc_handle_t) -> bool {
    is_live(h) && {
        // SAFETY: `h` is in HANDLES, so it is a box made by register() and
        // not yet freed; the caller (the FM emulation, on behalf of the
        // driver's ddi_fm_acc_err_get) uses a handle the driver still
        // holds, and the DDI forbids freeing a handle while it is in use,
        // so the box outlives this read. Only a shared reference is made.
        unsafe { &*h.cast::<AccHandle>() }.flagerr
    }
}

/// Every live register mapping of machine `m` (not configuration space).
pub fn register_handles(m: &Machine) -> Vec<ddi_acc_handle_t> {
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .iter()
        .map(|&h| h as ddi_acc_handle_t)
        .filter(|&h| {
            // SAFETY: HANDLES is locked while we iterate it, and
            // unregister() takes a handle out of HANDLES (under this lock)
            // before it frees the box: every handle here is a live box
            // made by register(). Only a shared reference is made.
            let a = unsafe { &*h.cast::<AccHandle>() };
            std::ptr::eq(Arc::as_ptr(&a.machine), m) && !matches!(a.kind, AccKind::Config)
        })
        .collect()
}

/// Whether `h` is a live access handle (no violation when it is not).
pub fn is_live(h: ddi_acc_handle_t) -> bool {
    !h.is_null()
        && lock(&HANDLES)
            .get_or_insert_with(HashSet::new)
            .contains(&(h as usize))
}

fn unregister(hp: *mut ddi_acc_handle_t, func: &str) {
    if hp.is_null() {
        violation(format!("{func}(NULL)"));
        return;
    }
    // SAFETY: the driver passes a pointer to its handle variable.
    let h = unsafe { *hp };
    if get(h, func).is_none() {
        return;
    }
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .remove(&(h as usize));
    // SAFETY: registered, so made by Box::into_raw in register().
    let b = unsafe { Box::from_raw(h.cast::<AccHandle>()) };
    bump(&b.machine.live.acc_handles, -1);
    // SAFETY: as above; the DDI clears the caller's handle.
    unsafe { *hp = std::ptr::null_mut() };
}

/// The `reg` property of the HBA node (pci(5)): the configuration space,
/// then one register set per BAR, five cells each.
pub fn reg_property(m: &Machine) -> Vec<i32> {
    let bdf =
        (u32::from(m.bdf.bus) << 16) | (u32::from(m.bdf.dev) << 11) | (u32::from(m.bdf.func) << 8);
    let mut cells = vec![bdf as i32, 0, 0, 0, 0];
    for b in &m.bars {
        let space = if b.io {
            ffi::PCI_ADDR_IO
        } else if b.mem64 {
            ffi::PCI_ADDR_MEM64
        } else {
            ffi::PCI_ADDR_MEM32
        };
        let hi = space | bdf | (ffi::PCI_CONF_BASE0 as u32 + 4 * u32::from(b.index));
        cells.extend([hi as i32, 0, 0, (b.size >> 32) as i32, b.size as i32]);
    }
    cells
}

/// The BAR of register set `rnumber` of `n`.
fn bar_of(n: &DevInfo, rnumber: c_uint, func: &str) -> Option<BarInfo> {
    let reg = match lock(&n.props).get("reg") {
        Some(Prop::Ints(v)) => v.clone(),
        _ => {
            violation(format!("{func}: the node has no reg property"));
            return None;
        }
    };
    let Some(set) = reg.chunks_exact(5).nth(rnumber as usize) else {
        violation(format!("{func}: register set {rnumber} does not exist"));
        return None;
    };
    let hi = set[0] as u32;
    if hi & ffi::PCI_ADDR_MASK == ffi::PCI_ADDR_CONFIG {
        violation(format!(
            "{func}: register set {rnumber} is configuration space (use pci_config_setup)"
        ));
        return None;
    }
    let reg_off = hi & ffi::PCI_REG_REG_M;
    let index = ((reg_off - ffi::PCI_CONF_BASE0 as u32) / 4) as u8;
    n.machine.bar(index)
}

/// `ddi_dev_regsize(9F)`
///
/// # Safety
/// `resultp` must be valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dev_regsize(
    dip: *mut dev_info_t,
    rnumber: c_uint,
    resultp: *mut off_t,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_dev_regsize") else {
        return ffi::DDI_FAILURE;
    };
    let Some(b) = bar_of(n, rnumber, "ddi_dev_regsize") else {
        return ffi::DDI_FAILURE;
    };
    if resultp.is_null() {
        violation("ddi_dev_regsize: null result pointer");
        return ffi::DDI_FAILURE;
    }
    // SAFETY: checked non-null; the driver's variable.
    unsafe { *resultp = b.size as off_t };
    ffi::DDI_SUCCESS
}

/// `ddi_regs_map_setup(9F)`
///
/// # Safety
/// Out-pointers must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_regs_map_setup(
    dip: *mut dev_info_t,
    rnumber: c_uint,
    addrp: *mut caddr_t,
    offset: offset_t,
    len: offset_t,
    accattrp: *const ddi_device_acc_attr_t,
    handlep: *mut ddi_acc_handle_t,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_regs_map_setup") else {
        return ffi::DDI_FAILURE;
    };
    if addrp.is_null() || handlep.is_null() || accattrp.is_null() {
        violation("ddi_regs_map_setup: null pointer argument");
        return ffi::DDI_FAILURE;
    }
    // SAFETY: checked non-null: the driver's attribute structure.
    let attr = unsafe { *accattrp };
    if attr.devacc_attr_version != ffi::DDI_DEVICE_ATTR_V0
        && attr.devacc_attr_version != ffi::DDI_DEVICE_ATTR_V1
    {
        violation("ddi_regs_map_setup: bad devacc_attr_version");
        return ffi::DDI_FAILURE;
    }
    let Some(b) = bar_of(n, rnumber, "ddi_regs_map_setup") else {
        return ffi::DDI_FAILURE;
    };
    let len = if len == 0 {
        b.size as i64 - offset
    } else {
        len
    };
    if offset < 0 || len <= 0 || (offset + len) as u64 > b.size {
        violation(format!(
            "ddi_regs_map_setup: [{offset:#x}, +{len:#x}) outside BAR{} of {:#x} bytes",
            b.index, b.size
        ));
        return ffi::DDI_FAILURE;
    }
    let kind = if b.io {
        AccKind::Io((b.addr + offset as u64) as u16)
    } else {
        AccKind::Mem(b.addr + offset as u64)
    };
    // impl_acc_err_init (uts/i86pc/os/ddi_impl.c): below version 1, or
    // without the access check granted, the access is DDI_DEFAULT_ACC; an
    // ACCCHK-capable driver mapping with DDI_DEFAULT_ACC is a driver
    // defect (ddi.fmcap).
    let accchk = super::fm::capabilities(dip) & ffi::DDI_FM_ACCCHK_CAPABLE != 0;
    let v1 = attr.devacc_attr_version == ffi::DDI_DEVICE_ATTR_V1;
    if v1 && accchk && attr.devacc_attr_access == ffi::DDI_DEFAULT_ACC {
        violation(
            "ddi_regs_map_setup: DDI_DEFAULT_ACC by a driver granted DDI_FM_ACCCHK_CAPABLE \
             (illumos posts the driver defect ereport.io.ddi.fmcap)",
        );
    }
    let flagerr = v1 && accchk && attr.devacc_attr_access == ffi::DDI_FLAGERR_ACC;
    let base = NEXT_VA.fetch_add(FAKE_VA_STRIDE, Ordering::Relaxed) as usize;
    let h = register(AccHandle {
        machine: n.machine.clone(),
        kind,
        base,
        len: len as usize,
        flagerr,
    });
    // SAFETY: checked non-null.
    unsafe {
        *addrp = base as caddr_t;
        *handlep = h;
    }
    ffi::DDI_SUCCESS
}

/// `ddi_regs_map_free(9F)`
///
/// # Safety
/// `handlep` must point at the caller's handle variable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_regs_map_free(handlep: *mut ddi_acc_handle_t) {
    let _kernel = crate::meter::kernel();
    unregister(handlep, "ddi_regs_map_free");
}

/// `pci_config_setup(9F)`
///
/// # Safety
/// `handlep` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pci_config_setup(
    dip: *mut dev_info_t,
    handlep: *mut ddi_acc_handle_t,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "pci_config_setup") else {
        return ffi::DDI_FAILURE;
    };
    if handlep.is_null() {
        violation("pci_config_setup: null handle pointer");
        return ffi::DDI_FAILURE;
    }
    let h = register(AccHandle {
        machine: n.machine.clone(),
        kind: AccKind::Config,
        base: 0,
        len: 256,
        // pci_config_setup(9F) takes no attribute: DDI_DEFAULT_ACC.
        flagerr: false,
    });
    // SAFETY: checked non-null.
    unsafe { *handlep = h };
    ffi::DDI_SUCCESS
}

/// `pci_config_teardown(9F)`
///
/// # Safety
/// `handlep` must point at the caller's handle variable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pci_config_teardown(handlep: *mut ddi_acc_handle_t) {
    let _kernel = crate::meter::kernel();
    unregister(handlep, "pci_config_teardown");
}

fn config_read(h: ddi_acc_handle_t, off: off_t, size: usize, func: &str) -> u32 {
    let Some(a) = get(h, func) else {
        return u32::MAX;
    };
    if !matches!(a.kind, AccKind::Config) {
        violation(format!("{func} on a register handle"));
        return u32::MAX;
    }
    if off < 0 || off as usize + size > 256 || !(off as usize).is_multiple_of(size) {
        // Extended configuration space is not modelled; misaligned
        // accesses are a driver bug.
        if !(off as usize).is_multiple_of(size) {
            violation(format!("{func} at misaligned offset {off:#x}"));
        }
        return u32::MAX >> (32 - 8 * size);
    }
    let m = &a.machine;
    m.stats.cfg_reads.fetch_add(1, Ordering::Relaxed);
    let pci = Pci::new(&*m.qt);
    let r = match size {
        1 => pci.cfg_read8(m.bdf, off as u8).map(u32::from),
        2 => pci.cfg_read16(m.bdf, off as u8).map(u32::from),
        _ => pci.cfg_read32(m.bdf, off as u8),
    };
    r.unwrap_or_else(|e| {
        m.device_failed(func, &e);
        u32::MAX
    })
}

fn config_write(h: ddi_acc_handle_t, off: off_t, size: usize, v: u32, func: &str) {
    let Some(a) = get(h, func) else { return };
    if !matches!(a.kind, AccKind::Config)
        || off < 0
        || off as usize + size > 256
        || !(off as usize).is_multiple_of(size)
    {
        violation(format!(
            "{func} at {off:#x}: not a configuration handle or offset"
        ));
        return;
    }
    let m = &a.machine;
    let pci = Pci::new(&*m.qt);
    let r = match size {
        1 => pci.cfg_write8(m.bdf, off as u8, v as u8),
        2 => pci.cfg_write16(m.bdf, off as u8, v as u16),
        _ => pci.cfg_write32(m.bdf, off as u8, v),
    };
    if let Err(e) = r {
        m.device_failed(func, &e);
    }
}

/// `pci_config_get8(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn pci_config_get8(h: ddi_acc_handle_t, off: off_t) -> u8 {
    let _kernel = crate::meter::kernel();
    config_read(h, off, 1, "pci_config_get8") as u8
}

/// `pci_config_get16(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn pci_config_get16(h: ddi_acc_handle_t, off: off_t) -> u16 {
    let _kernel = crate::meter::kernel();
    config_read(h, off, 2, "pci_config_get16") as u16
}

/// `pci_config_get32(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn pci_config_get32(h: ddi_acc_handle_t, off: off_t) -> u32 {
    let _kernel = crate::meter::kernel();
    config_read(h, off, 4, "pci_config_get32")
}

/// `pci_config_put8(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn pci_config_put8(h: ddi_acc_handle_t, off: off_t, v: u8) {
    let _kernel = crate::meter::kernel();
    config_write(h, off, 1, u32::from(v), "pci_config_put8")
}

/// `pci_config_put16(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn pci_config_put16(h: ddi_acc_handle_t, off: off_t, v: u16) {
    let _kernel = crate::meter::kernel();
    config_write(h, off, 2, u32::from(v), "pci_config_put16")
}

/// `pci_config_put32(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn pci_config_put32(h: ddi_acc_handle_t, off: off_t, v: u32) {
    let _kernel = crate::meter::kernel();
    config_write(h, off, 4, v, "pci_config_put32")
}

/// The device offset an access at `addr` of `size` bytes names, checked.
fn reg_target(
    h: ddi_acc_handle_t,
    addr: usize,
    size: usize,
    func: &str,
) -> Option<(Arc<Machine>, AccKind, usize)> {
    let a = get(h, func)?;
    if matches!(a.kind, AccKind::Config) {
        violation(format!("{func} on a configuration handle"));
        return None;
    }
    let off = addr.wrapping_sub(a.base);
    if addr < a.base || off + size > a.len {
        violation(format!(
            "{func}: address {addr:#x} outside the mapping [{:#x}, +{:#x})",
            a.base, a.len
        ));
        return None;
    }
    if !off.is_multiple_of(size) {
        violation(format!(
            "{func}: misaligned register access at offset {off:#x}"
        ));
    }
    Some((a.machine.clone(), a.kind, off))
}

macro_rules! reg_rw {
    ($get:ident, $put:ident, $t:ty, $inp:ident, $outp:ident, $rd:ident, $wr:ident) => {
        #[doc = concat!("`", stringify!($get), "(9F)`")]
        #[unsafe(no_mangle)]
        pub extern "C" fn $get(h: ddi_acc_handle_t, addr: *mut $t) -> $t {
    let _kernel = crate::meter::kernel();
            let size = std::mem::size_of::<$t>();
            let Some((m, kind, off)) = reg_target(h, addr as usize, size, stringify!($get)) else {
                return <$t>::MAX;
            };
            m.stats.reg_reads.fetch_add(1, Ordering::Relaxed);
            let r = match kind {
                AccKind::Io(port) => reg_rw!(@io_in m, $inp, port, off, $t),
                AccKind::Mem(base) => m.qt.$rd(base + off as u64).map(|v| v as $t),
                AccKind::Config => unreachable_config(),
            };
            let v = r.unwrap_or_else(|e| {
                m.device_failed(stringify!($get), &e);
                <$t>::MAX
            });
            let reg = reg_of(kind, off);
            if m.faults.layout().is_isr(reg) {
                m.stats.isr_reads.fetch_add(1, Ordering::Relaxed);
            }
            m.faults.on_reg_read(reg, size, v as u64) as $t
        }

        #[doc = concat!("`", stringify!($put), "(9F)`")]
        #[unsafe(no_mangle)]
        pub extern "C" fn $put(h: ddi_acc_handle_t, addr: *mut $t, v: $t) {
    let _kernel = crate::meter::kernel();
            let size = std::mem::size_of::<$t>();
            let Some((m, kind, off)) = reg_target(h, addr as usize, size, stringify!($put)) else {
                return;
            };
            m.stats.reg_writes.fetch_add(1, Ordering::Relaxed);
            m.faults.on_reg_write(reg_of(kind, off), size, v as u64);
            let r = match kind {
                AccKind::Io(port) => reg_rw!(@io_out m, $outp, port, off, v),
                AccKind::Mem(base) => m.qt.$wr(base + off as u64, v as _),
                AccKind::Config => unreachable_config().map(|_: u8| ()),
            };
            if let Err(e) = r {
                m.device_failed(stringify!($put), &e);
            }
            // A doorbell may have been rung: look for completions soon.
            m.kick();
        }
    };
    (@io_in $m:ident, none, $port:ident, $off:ident, $t:ty) => {{
        let _ = ($port, $off);
        violation("64-bit access to an I/O port register");
        Ok(<$t>::MAX)
    }};
    (@io_in $m:ident, $inp:ident, $port:ident, $off:ident, $t:ty) => {
        $m.qt.$inp($port + $off as u16).map(|v| v as $t)
    };
    (@io_out $m:ident, none, $port:ident, $off:ident, $v:ident) => {{
        let _ = ($port, $off, $v);
        violation("64-bit access to an I/O port register");
        Ok(())
    }};
    (@io_out $m:ident, $outp:ident, $port:ident, $off:ident, $v:ident) => {
        $m.qt.$outp($port + $off as u16, $v as _)
    };
}

/// The device register an access names, for the hostile-device layer.
fn reg_of(kind: AccKind, off: usize) -> crate::faults::Reg {
    match kind {
        AccKind::Io(port) => crate::faults::Reg::Io(port.wrapping_add(off as u16)),
        AccKind::Mem(base) => crate::faults::Reg::Mem(base + off as u64),
        AccKind::Config => crate::faults::Reg::Mem(u64::MAX),
    }
}

fn unreachable_config<T>() -> Result<T, rvscsi_qtest::Error> {
    Err(rvscsi_qtest::Error::Protocol(
        "configuration handle used for a register access".into(),
    ))
}

reg_rw!(ddi_get8, ddi_put8, u8, inb, outb, readb, writeb);
reg_rw!(ddi_get16, ddi_put16, u16, inw, outw, readw, writew);
reg_rw!(ddi_get32, ddi_put32, u32, inl, outl, readl, writel);
reg_rw!(ddi_get64, ddi_put64, u64, none, none, readq, writeq);

/// `ddi_check_acc_handle(9F)`: no access faults are modelled.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_check_acc_handle(h: ddi_acc_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    if get(h, "ddi_check_acc_handle").is_some() {
        ffi::DDI_SUCCESS
    } else {
        ffi::DDI_FAILURE
    }
}
