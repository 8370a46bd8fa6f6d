//! Interrupts: `ddi_intr_get_supported_types(9F)`, `ddi_intr_alloc(9F)`,
//! `ddi_intr_add_handler(9F)`, `ddi_intr_enable(9F)` and friends.
//!
//! MSI-X vectors are programmed in the device's MSI-X table (in its BAR)
//! to write `MSG_MAGIC | vector` into a mailbox page of guest RAM; MSI the
//! same through the MSI capability; fixed interrupts are the INTx line
//! QEMU reports through the intercepted I/O APIC. The machine's delivery
//! thread turns either into handler calls.

use super::devinfo::node;
use super::violation;
use crate::machine::{IntrType, MSG_MAGIC, Machine, VectorSlot, bump, lock};
use rvscsi::ffi::{self, ddi_intr_handle_t, ddi_intr_handler_t, dev_info_t};
use rvscsi_qtest::Pci;
use std::collections::HashSet;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::{Arc, Mutex};

/// The interrupt priority the emulation reports (a typical device level).
pub const INTR_PRI: c_uint = 5;

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
    inum: usize,
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
        return ffi::DDI_FAILURE;
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

/// `ddi_intr_get_nintrs(9F)`
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
        return ffi::DDI_FAILURE;
    };
    match (count_of(&n.machine, typ), np.is_null()) {
        (Some(c), false) => {
            // SAFETY: checked non-null.
            unsafe { *np = c as c_int };
            ffi::DDI_SUCCESS
        }
        _ => ffi::DDI_FAILURE,
    }
}

/// `ddi_intr_get_navail(9F)`: as many as the device has.
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
    // SAFETY: same contract.
    unsafe { ddi_intr_get_nintrs(dip, typ, np) }
}

/// `ddi_intr_alloc(9F)`
///
/// # Safety
/// `h_array` must have room for `count` handles; `actualp` valid.
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
        return ffi::DDI_FAILURE;
    };
    let m = &n.machine;
    if h_array.is_null() || actualp.is_null() || count < 1 || inum != 0 {
        violation("ddi_intr_alloc: bad arguments");
        return ffi::DDI_EINVAL;
    }
    let Some(avail) = count_of(m, typ) else {
        return ffi::DDI_FAILURE;
    };
    let kind = match typ {
        ffi::DDI_INTR_TYPE_MSIX => IntrType::MsiX,
        ffi::DDI_INTR_TYPE_MSI => IntrType::Msi,
        _ => IntrType::Fixed,
    };
    let mut st = lock(&m.intr);
    if st.kind != IntrType::None {
        violation("ddi_intr_alloc while interrupts of the device are allocated");
        return ffi::DDI_FAILURE;
    }
    let n_alloc = (count as usize).min(avail);
    if behavior == ffi::DDI_INTR_ALLOC_STRICT && n_alloc < count as usize {
        return ffi::DDI_EAGAIN;
    }
    st.kind = kind;
    st.vectors = vec![
        VectorSlot {
            handler: None,
            enabled: false
        };
        n_alloc
    ];
    drop(st);
    for i in 0..n_alloc {
        let h = Box::into_raw(Box::new(IntrHandle {
            machine: m.clone(),
            inum: i,
        }));
        lock(&HANDLES)
            .get_or_insert_with(HashSet::new)
            .insert(h as usize);
        bump(&m.live.intr_handles, 1);
        // SAFETY: room for count >= n_alloc handles (caller).
        unsafe { *h_array.add(i) = h.cast() };
    }
    // SAFETY: checked non-null.
    unsafe { *actualp = n_alloc as c_int };
    ffi::DDI_SUCCESS
}

/// `ddi_intr_free(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_intr_free(h: ddi_intr_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(ih) = get(h, "ddi_intr_free") else {
        return ffi::DDI_FAILURE;
    };
    let m = ih.machine.clone();
    {
        let mut st = lock(&m.intr);
        if let Some(v) = st.vectors.get(ih.inum)
            && (v.handler.is_some() || v.enabled)
        {
            violation("ddi_intr_free of a vector still enabled or with a handler");
        }
        if let Some(v) = st.vectors.get_mut(ih.inum) {
            v.handler = None;
            v.enabled = false;
        }
    }
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .remove(&(h as usize));
    // SAFETY: registered, made by Box::into_raw.
    drop(unsafe { Box::from_raw(h.cast::<IntrHandle>()) });
    bump(&m.live.intr_handles, -1);
    let last = m
        .live
        .intr_handles
        .load(std::sync::atomic::Ordering::Acquire)
        == 0;
    if last {
        let mut st = lock(&m.intr);
        st.kind = IntrType::None;
        st.vectors.clear();
    }
    ffi::DDI_SUCCESS
}

/// `ddi_intr_get_pri(9F)`
///
/// # Safety
/// `prip` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_intr_get_pri(h: ddi_intr_handle_t, prip: *mut c_uint) -> c_int {
    let _kernel = crate::meter::kernel();
    if get(h, "ddi_intr_get_pri").is_none() || prip.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: checked non-null.
    unsafe { *prip = INTR_PRI };
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
    let mailbox = lock(&m.intr).mailbox;
    let msg_addr = mailbox + 4 * inum as u64;
    let data = MSG_MAGIC | inum as u32;
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
