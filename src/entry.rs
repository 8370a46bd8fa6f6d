//! The `extern "C"` entry points: what the C shim installs in
//! `scsi_hba_tran(9S)` and calls from `dev_ops(9S)`, plus the callbacks the
//! driver registers with the kernel (interrupts, task queue, watchdog).
//!
//! Each is a thin trampoline: it turns the raw pointers the framework
//! passes into safe references (the framework's guarantees, stated in each
//! SAFETY comment, are what makes that sound), then calls the safe core.
//! Nothing here panics; bad pointers get the entry point's error value.
//!
//! Contexts: `tran_start`, `tran_setup_pkt`, `tran_teardown_pkt`,
//! `tran_abort`, `tran_reset` and the interrupt handler may run in
//! interrupt context; the others run in kernel thread context.

use crate::ddi::{Dip, Sleep};
use crate::dev_warn;
use crate::ffi::{
    self, caddr_t, dev_info_t, scsi_address, scsi_device, scsi_hba_tran, scsi_pkt, uint_t,
};
use crate::hba::cmd::Cmd;
use crate::hba::family::{Claim, Family, FamilyId, IrmAnswer};
use crate::hba::io::StartError;
use crate::hba::recovery::ResetLevel;
use crate::hba::{Callbacks, Hba, Lun, OwnedHba};
use crate::pvscsi::Pvscsi;
use crate::scsa::addr::{ReportedUnitAddresses, SingleLevelLun, child_of_unit_address};
use crate::scsa::cap::{self, Cap};
use crate::scsa::pkt::Pkt;
use crate::vioscsi::VioScsi;
use alloc::boxed::Box;
use core::ffi::{CStr, c_char, c_int, c_uint, c_void};

/// The kernel callbacks of family `F`'s HBAs.
fn callbacks<F: Family>() -> Callbacks {
    Callbacks {
        intr: rvscsi_intr::<F>,
        irm: rvscsi_irm::<F>,
        work: rvscsi_work::<F>,
        watchdog: rvscsi_watchdog::<F>,
    }
}

/// An HBA of some family, as the entry points shared by every family
/// find it behind a `tran_hba_private`.
#[derive(Clone, Copy)]
enum AnyHba<'a> {
    VirtioScsi(&'a Hba<VioScsi>),
    Pvscsi(&'a Hba<Pvscsi>),
}

/// Runs `$body` with `$h` bound to the HBA of whatever family `$any` is.
macro_rules! on_hba {
    ($any:expr, $h:ident => $body:expr) => {
        match $any {
            AnyHba::VirtioScsi($h) => $body,
            AnyHba::Pvscsi($h) => $body,
        }
    };
}

/// The HBA at `p` (an HBA's address as attach gave it out), of its family.
///
/// # Safety
/// `p` must be null or the address of a live HBA made by
/// [`rvscsi_hba_attach`] and not yet detached, valid for `'a`.
unsafe fn any_hba<'a>(p: *const c_void) -> Option<AnyHba<'a>> {
    if p.is_null() || !p.cast::<u32>().is_aligned() {
        return None;
    }
    // SAFETY: a live HBA (caller), non-null and aligned (checked).
    let family = unsafe { crate::hba::family_at(p) }?;
    Some(match family {
        // SAFETY: the word says the HBA at `p` is a virtio-scsi one
        // (`Hba::attach` wrote it; only `Hba<VioScsi>` carries it), live
        // for 'a (caller); only shared references are made from it.
        FamilyId::VirtioScsi => AnyHba::VirtioScsi(unsafe { &*p.cast::<Hba<VioScsi>>() }),
        // SAFETY: the word says the HBA at `p` is a pvscsi one (only
        // `Hba<Pvscsi>` carries it), live for 'a (caller); only shared
        // references are made from it.
        FamilyId::Pvscsi => AnyHba::Pvscsi(unsafe { &*p.cast::<Hba<Pvscsi>>() }),
    })
}

/// The HBA behind a `scsi_hba_tran`.
///
/// # Safety
/// `tran` must be null or a valid `scsi_hba_tran` whose `tran_hba_private`
/// is null or an HBA made by [`rvscsi_hba_attach`] and not yet detached.
unsafe fn hba_of_tran<'a>(tran: *const scsi_hba_tran) -> Option<AnyHba<'a>> {
    if tran.is_null() {
        return None;
    }
    // SAFETY: a valid tran (caller).
    let p = unsafe { (*tran).tran_hba_private } as *const c_void;
    // SAFETY: the caller guarantees tran_hba_private is null or an HBA made
    // by rvscsi_hba_attach and not yet detached, so `p` is null or points
    // at a live HBA for as long as the framework uses this tran.
    unsafe { any_hba(p) }
}

/// The HBA behind a `scsi_address`.
///
/// # Safety
/// `ap` must be null or a valid address whose `a_hba_tran` satisfies
/// [`hba_of_tran`].
unsafe fn hba_of_addr<'a>(ap: *const scsi_address) -> Option<AnyHba<'a>> {
    if ap.is_null() {
        return None;
    }
    // SAFETY: a valid address (caller), whose tran satisfies hba_of_tran.
    unsafe { hba_of_tran((*ap).a_hba_tran) }
}

/// The LUN state `tran_tgt_init` attached to the device at `ap`.
///
/// # Safety
/// `ap` must be a valid address of a device initialized by
/// [`rvscsi_tran_tgt_init`] (or null).
unsafe fn lun_of_addr(ap: *mut scsi_address) -> Option<Lun> {
    if ap.is_null() {
        return None;
    }
    // SAFETY: valid address (caller); the DDI returns its scsi_device.
    let sd = unsafe { ffi::scsi_address_device(ap) };
    if sd.is_null() {
        return None;
    }
    // SAFETY: valid scsi_device; its HBA private is our Box<Lun> or null.
    let p = unsafe { ffi::scsi_device_hba_private_get(sd) } as *const Lun;
    // SAFETY: null or a Lun we allocated in tran_tgt_init.
    unsafe { p.as_ref().copied() }
}

/// The command state in a packet's HBA private area, for family `F`.
///
/// # Safety
/// `pkt` must be null or a valid packet of the packet cache of an HBA of
/// family `F` (one the framework made with that HBA's `tran_hba_len`),
/// alive for `'a`, whose `pkt_ha_private` (set by the framework) points at
/// those bytes.
unsafe fn cmd_of_pkt<'a, F: Family>(pkt: *const scsi_pkt) -> Option<&'a Cmd<F::CmdExt>> {
    if pkt.is_null() {
        return None;
    }
    // SAFETY: valid packet (caller).
    let p = unsafe { (*pkt).pkt_ha_private } as *const Cmd<F::CmdExt>;
    // SAFETY: a packet of an F HBA's cache (caller): pkt_ha_private is its
    // tran_hba_len bytes, which our constructor initialized as a
    // Cmd<F::CmdExt> and which stay allocated with the packet, so
    // from_raw's contract holds. Soundness rests on that promise; the
    // magic word from_raw checks only catches a corrupted or destroyed
    // command, it does not validate arbitrary memory.
    unsafe { Cmd::from_raw(p) }
}

/// [`cmd_of_pkt`] for the family of `_hba`.
///
/// # Safety
/// As [`cmd_of_pkt`], for a packet of `_hba`'s cache.
unsafe fn cmd_of_pkt_on<'a, F: Family>(
    _hba: &Hba<F>,
    pkt: *const scsi_pkt,
) -> Option<&'a Cmd<F::CmdExt>> {
    // SAFETY: a packet of this F HBA's cache (caller).
    unsafe { cmd_of_pkt::<F>(pkt) }
}

/// `tran_start(9E)`'s answer.
fn tran_code(r: Result<(), StartError>) -> c_int {
    match r {
        Ok(()) => ffi::TRAN_ACCEPT,
        Err(StartError::Busy) => ffi::TRAN_BUSY,
        Err(StartError::Fatal) => ffi::TRAN_FATAL_ERROR,
        Err(StartError::Invalid) => ffi::TRAN_BADPKT,
    }
}

// ---- attach / detach (called by the shim's dev_ops) ----------------------

/// attach(9E) of the HBA node: brings the device up; returns the HBA (to
/// be stored in `tran_hba_private`) or null.
///
/// # Safety
/// `dip` must be the node being attached, in attach(9E) context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_hba_attach(dip: *mut dev_info_t) -> *mut c_void {
    let Some(dip) = Dip::new(dip) else {
        return core::ptr::null_mut();
    };
    // The family is chosen by the PCI IDs (the virtio attach checks the
    // virtio ones and refuses anything else).
    let attached = if is_pvscsi(dip) {
        Hba::<Pvscsi>::attach(dip, callbacks::<Pvscsi>()).map(|h| h.into_raw().cast())
    } else {
        Hba::<VioScsi>::attach(dip, callbacks::<VioScsi>()).map(|h| h.into_raw().cast())
    };
    match attached {
        // The shim keeps the address (tran_hba_private) until
        // rvscsi_hba_detach takes ownership back.
        Ok(hba) => hba,
        Err(e) => {
            dev_warn!(dip, "attach failed: {e}");
            core::ptr::null_mut()
        }
    }
}

/// Whether the node is a VMware PVSCSI function (15ad:07c0).
fn is_pvscsi(dip: Dip) -> bool {
    crate::ddi::pci::PciConfig::open(dip).is_ok_and(|pci| {
        pci.ids()
            == (
                crate::pvscsi::PCI_VENDOR_VMWARE,
                crate::pvscsi::PCI_DEVICE_PVSCSI,
            )
    })
}

/// Fills `attr` with the DMA attributes of data buffers (for
/// `scsi_hba_attach_setup(9F)`).
///
/// # Safety
/// `hba` from [`rvscsi_hba_attach`]; `attr` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_hba_dma_attr(
    hba: *const c_void,
    attr: *mut ffi::ddi_dma_attr_t,
) -> c_int {
    // SAFETY: `hba` from rvscsi_hba_attach (caller): a live HBA; `attr`
    // valid for writing (caller).
    let (Some(hba), Some(attr)) = (unsafe { any_hba(hba) }, unsafe { attr.as_mut() }) else {
        return ffi::DDI_FAILURE;
    };
    *attr = on_hba!(hba, h => h.dev.data_dma_attr());
    ffi::DDI_SUCCESS
}

/// `tran_hba_len` (a `uint_t`): the HBA private bytes each packet needs.
#[unsafe(no_mangle)]
pub extern "C" fn rvscsi_pkt_private_len() -> c_uint {
    // The largest of every family's: one packet cache serves whichever
    // family the instance is.
    const VIO: usize = Hba::<VioScsi>::pkt_private_len();
    const PV: usize = Hba::<Pvscsi>::pkt_private_len();
    const LEN: usize = if VIO > PV { VIO } else { PV };
    const _: () = assert!(LEN <= u32::MAX as usize);
    LEN as c_uint
}

/// `tran_interconnect_type`.
#[unsafe(no_mangle)]
pub extern "C" fn rvscsi_interconnect_type() -> c_int {
    ffi::INTERCONNECT_PARALLEL
}

/// Whether the HBA can be detached now: `DDI_SUCCESS` when no command is
/// in flight. The shim asks before `scsi_hba_detach(9F)`, which cannot be
/// undone.
///
/// # Safety
/// `hba` from [`rvscsi_hba_attach`] (or null).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_hba_detach_ready(hba: *const c_void) -> c_int {
    // SAFETY: from rvscsi_hba_attach (caller), or null.
    match unsafe { any_hba(hba) } {
        Some(hba) if on_hba!(hba, h => h.detach_ready()) => ffi::DDI_SUCCESS,
        _ => ffi::DDI_FAILURE,
    }
}

/// detach(9E) of the HBA node (after `scsi_hba_detach(9F)`): stops and
/// frees the HBA. `DDI_FAILURE` (nothing changed) while commands are in
/// flight.
///
/// # Safety
/// `hba` from [`rvscsi_hba_attach`] and not detached yet (on success it
/// is freed: the caller must not use it again); no entry point of the
/// framework uses it any more (it detached every child and the iport).
/// The driver's own callbacks (interrupts, IRM, watchdog, work task) may
/// still be running: the teardown stops them before it frees anything.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_hba_detach(hba: *mut c_void) -> c_int {
    if hba.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: made by OwnedHba::into_raw in rvscsi_hba_attach and not
    // taken back since (caller): this is its one owner. No Box or `&mut`
    // to the HBA is made here: the owner stops it through a shared
    // reference (interrupt handlers, the IRM callback, the watchdog and the
    // work task may still be using it) and frees it only after.
    // Which family it is is read first, through the raw pointer.
    match unsafe { crate::hba::family_at(hba) } {
        Some(FamilyId::VirtioScsi) => {
            // SAFETY: the word says it is an Hba<VioScsi>, made by
            // OwnedHba::into_raw in rvscsi_hba_attach and not taken back
            // since (caller): this is its one owner.
            detach_owned(unsafe { OwnedHba::<VioScsi>::from_raw(hba.cast()) })
        }
        Some(FamilyId::Pvscsi) => {
            // SAFETY: the word says it is an Hba<Pvscsi>, made by
            // OwnedHba::into_raw in rvscsi_hba_attach and not taken back
            // since (caller): this is its one owner.
            detach_owned(unsafe { OwnedHba::<Pvscsi>::from_raw(hba.cast()) })
        }
        None => ffi::DDI_FAILURE,
    }
}

/// [`rvscsi_hba_detach`] for the owner of an HBA of family `F`.
fn detach_owned<F: Family>(hba: Option<OwnedHba<F>>) -> c_int {
    let Some(hba) = hba else {
        return ffi::DDI_FAILURE;
    };
    match hba.detach() {
        Ok(()) => ffi::DDI_SUCCESS,
        Err(hba) => {
            // Still attached: the shim's tran keeps the address.
            let _ = hba.into_raw();
            ffi::DDI_FAILURE
        }
    }
}

/// The HBA of the HBA node `dip` (through its `scsi_hba_tran`).
///
/// # Safety
/// `dip` must be an attached HBA node of this driver.
unsafe fn hba_of_node<'a>(dip: *mut dev_info_t) -> Option<AnyHba<'a>> {
    if dip.is_null() {
        return None;
    }
    // SAFETY: the driver private of an HBA node set up by
    // scsi_hba_attach_setup(9F) is its scsi_hba_tran.
    let tran = unsafe { ffi::ddi_get_driver_private(dip) } as *const scsi_hba_tran;
    // SAFETY: our tran, whose private is our HBA.
    unsafe { hba_of_tran(tran) }
}

/// attach(9E) of the iport node "iport0": target map and discovery.
///
/// # Safety
/// `dip` must be the iport node being attached.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_iport_attach(dip: *mut dev_info_t) -> c_int {
    let Some(idip) = Dip::new(dip) else {
        return ffi::DDI_FAILURE;
    };
    // SAFETY: valid iport node; the framework returns its unit address.
    let ua = unsafe { ffi::scsi_hba_iport_unit_address(dip) };
    // SAFETY: a NUL-terminated string owned by the framework, or null.
    if ua.is_null() || unsafe { CStr::from_ptr(ua) } != c"iport0" {
        return ffi::DDI_FAILURE;
    }
    let Some(parent) = idip.parent() else {
        return ffi::DDI_FAILURE;
    };
    // SAFETY: the parent of our iport is our HBA node.
    let Some(hba) = (unsafe { hba_of_node(parent.as_ptr()) }) else {
        return ffi::DDI_FAILURE;
    };
    // The framework gives the iport a copy of the HBA's tran with
    // tran_hba_private cleared: point it at the HBA again.
    // SAFETY: the driver private of an iport node is its scsi_hba_tran.
    let tran = unsafe { ffi::ddi_get_driver_private(dip) } as *mut scsi_hba_tran;
    if tran.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: valid tran of the iport being attached; nothing else uses it yet.
    let hba_addr = on_hba!(hba, h => h.callback_arg());
    // SAFETY: valid tran of the iport being attached; nothing else uses it yet.
    unsafe { (*tran).tran_hba_private = hba_addr };
    if on_hba!(hba, h => h.iport_attach(idip)) {
        ffi::DDI_SUCCESS
    } else {
        ffi::DDI_FAILURE
    }
}

/// detach(9E) of the iport node.
///
/// # Safety
/// `dip` must be our iport node being detached.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_iport_detach(dip: *mut dev_info_t) -> c_int {
    if dip.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: the driver private of an iport node is its scsi_hba_tran.
    let tran = unsafe { ffi::ddi_get_driver_private(dip) } as *const scsi_hba_tran;
    // SAFETY: our iport's tran, private set in rvscsi_iport_attach.
    let Some(hba) = (unsafe { hba_of_tran(tran) }) else {
        return ffi::DDI_FAILURE;
    };
    on_hba!(hba, h => iport_detach(h))
}

/// [`rvscsi_iport_detach`] on an HBA of family `F`.
fn iport_detach<F: Family>(hba: &Hba<F>) -> c_int {
    // The driver's own discovery commands end with the discovery; its
    // targets' commands would complete to devices that are gone.
    hba.stop_discovery();
    if !hba.detach_ready() {
        hba.resume_discovery();
        return ffi::DDI_FAILURE;
    }
    hba.iport_detach();
    // The iport's dip (the table's key) may be reused by the next attach.
    TGT_INIT_WARNED.forget_all();
    ffi::DDI_SUCCESS
}

/// quiesce(9E) of the HBA node: stop the device, without blocking.
///
/// # Safety
/// `dip` must be our attached HBA node.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_quiesce(dip: *mut dev_info_t) -> c_int {
    // SAFETY: guaranteed by the caller.
    match unsafe { hba_of_node(dip) } {
        Some(hba) => {
            on_hba!(hba, h => h.quiesce());
            ffi::DDI_SUCCESS
        }
        None => ffi::DDI_FAILURE,
    }
}

// ---- scsi_hba_tran(9S) vectors -------------------------------------------

/// Unit addresses `tran_tgt_init` has warned about (each message once
/// per unit address and HBA: the framework asks again at every
/// BUS_CONFIG_ONE of a `/devices` path and every rescan). A fixed table:
/// no memory grows however often a child is asked for.
static TGT_INIT_WARNED: ReportedUnitAddresses<64> = ReportedUnitAddresses::new();
/// [`TGT_INIT_WARNED`] kinds.
const WARNED_REFUSED: u8 = 0;
const WARNED_DEVFSADM_NAME: u8 = 1;

/// tran_tgt_init(9E): accepts a child of the iport whose unit address
/// "target,lun64" names a target and a LUN within the device's limits.
///
/// The LUN part is the framework's `lun64` (`scsi_lun_to_lun64`): LUNs
/// below 256 as QEMU reports them (peripheral method) are their number,
/// LUNs 256 to 16383 (flat space) the whole SAM LUN, `0x4100000000000000`
/// for 256 (see `scsa::addr`). A child the driver cannot address is
/// refused with a warning saying why (once per unit address), never
/// mapped onto another LUN.
///
/// A flat-space LUN attaches, but on an HBA of the parallel interconnect
/// type devfsadm cannot give its disk a `/dev/dsk` name of its own: sd
/// makes `DDI_NT_BLOCK_CHAN` minor nodes there, which devfsadm names
/// `c#t<target>d<low 32 bits of the lun64>` (`disk_link.c`,
/// `disk_callback_chan`), `d0` for every flat LUN, and the last link made
/// wins (`devfsadm.c`, `create_link_common`). The driver says so once per
/// unit address, so that whoever misses the disk in format(8) knows to
/// use its `/devices` path.
///
/// # Safety
/// Called by the framework with valid nodes, tran and device.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_tgt_init(
    hba_dip: *mut dev_info_t,
    _tgt_dip: *mut dev_info_t,
    tran: *mut scsi_hba_tran,
    sd: *mut scsi_device,
) -> c_int {
    if hba_dip.is_null() || sd.is_null() {
        return ffi::DDI_FAILURE;
    }
    // Only the iport has targets.
    // SAFETY: a valid node from the framework.
    let iport_ua = unsafe { ffi::scsi_hba_iport_unit_address(hba_dip) };
    if iport_ua.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: NUL-terminated string owned by the framework, as long as
    // the iport node (which outlives this call).
    let iport_ua = unsafe { CStr::from_ptr(iport_ua) }.to_bytes();
    // SAFETY: the iport's tran.
    let Some(hba) = (unsafe { hba_of_tran(tran) }) else {
        return ffi::DDI_FAILURE;
    };
    // SAFETY: valid device; the framework returns its unit address.
    let ua = unsafe { ffi::scsi_device_unit_address(sd) };
    if ua.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: NUL-terminated string owned by the framework.
    let ua = unsafe { CStr::from_ptr(ua) }.to_bytes();
    let shown = core::str::from_utf8(ua).unwrap_or("?");
    let (dip, limits, caps) = on_hba!(hba, h => (h.dip(), *h.limits(), h.caps()));
    let (target, lun) = match child_of_unit_address(ua, limits.max_target, limits.max_lun) {
        Ok(child) => child,
        Err(e) => {
            if TGT_INIT_WARNED.first(hba_dip as usize, WARNED_REFUSED, ua) {
                dev_warn!(dip, "not configuring @{shown}: {e}");
            }
            return ffi::DDI_FAILURE;
        }
    };
    if let SingleLevelLun::Flat(n) = lun
        && caps.interconnect == ffi::INTERCONNECT_PARALLEL
        && TGT_INIT_WARNED.first(hba_dip as usize, WARNED_DEVFSADM_NAME, ua)
    {
        // At most 200 bytes are logged (`ddi::log::MAX_MESSAGE`): this
        // fits with the longest unit addresses (255,7fff000000000000).
        dev_warn!(
            dip,
            "@{shown}: LUN {n} (flat space) gets LUN 0's /dev/dsk name c#t{target}d{} \
             from devfsadm on a parallel SCSI HBA; use /devices/.../iport@{}/disk@{shown}",
            lun.devfsadm_chan_lun(),
            core::str::from_utf8(iport_ua).unwrap_or("?"),
        );
    }
    let state = Box::new(Lun {
        target,
        lun: lun.number(),
    });
    // SAFETY: valid device; the pointer is ours until tran_tgt_free.
    unsafe { ffi::scsi_device_hba_private_set(sd, Box::into_raw(state).cast()) };
    ffi::DDI_SUCCESS
}

/// tran_tgt_free(9E)
///
/// # Safety
/// Called by the framework for a device `rvscsi_tran_tgt_init` accepted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_tgt_free(
    _hba_dip: *mut dev_info_t,
    _tgt_dip: *mut dev_info_t,
    _tran: *mut scsi_hba_tran,
    sd: *mut scsi_device,
) {
    if sd.is_null() {
        return;
    }
    // SAFETY: valid device.
    let p = unsafe { ffi::scsi_device_hba_private_get(sd) } as *mut Lun;
    if !p.is_null() {
        // SAFETY: valid device; clear before freeing.
        unsafe { ffi::scsi_device_hba_private_set(sd, core::ptr::null_mut()) };
        // SAFETY: allocated by Box in tran_tgt_init, freed once.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// tran_pkt_constructor(9E): preallocates the command state and its DMA
/// memory in the packet's HBA private area.
///
/// # Safety
/// Called by the packet cache constructor with a zeroed packet whose
/// `pkt_ha_private` points at `tran_hba_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_pkt_constructor(
    pkt: *mut scsi_pkt,
    tran: *mut scsi_hba_tran,
    kmflag: c_int,
) -> c_int {
    // SAFETY: the HBA's tran (the cache's argument).
    let (Some(hba), false) = (unsafe { hba_of_tran(tran) }, pkt.is_null()) else {
        return -1;
    };
    // SAFETY: a valid, zeroed packet of this HBA's cache (caller).
    on_hba!(hba, h => unsafe { construct(h, pkt, Sleep::from_kmflag(kmflag)) })
}

/// [`rvscsi_tran_pkt_constructor`] for an HBA of family `F`.
///
/// # Safety
/// `pkt` is a valid packet of `hba`'s cache being constructed, whose
/// `pkt_ha_private` points at `tran_hba_len` (`Hba::<F>::pkt_private_len`)
/// bytes holding no live value.
unsafe fn construct<F: Family>(hba: &Hba<F>, pkt: *mut scsi_pkt, sleep: Sleep) -> c_int {
    // SAFETY: valid packet (caller).
    let area = unsafe { (*pkt).pkt_ha_private } as *mut Cmd<F::CmdExt>;
    if area.is_null() || !area.is_aligned() {
        return -1;
    }
    match hba.construct_cmd(sleep) {
        Ok(cmd) => {
            // SAFETY: the area is tran_hba_len >= size_of::<Cmd<F::CmdExt>>()
            // bytes, aligned (checked), and holds no live value (a fresh
            // object: caller).
            unsafe { area.write(cmd) };
            0
        }
        Err(_) => -1,
    }
}

/// tran_pkt_destructor(9E): frees what the constructor took.
///
/// # Safety
/// Called by the packet cache destructor for a packet whose constructor
/// succeeded.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_pkt_destructor(pkt: *mut scsi_pkt, tran: *mut scsi_hba_tran) {
    // SAFETY: the HBA's tran (the cache's argument).
    if let Some(hba) = unsafe { hba_of_tran(tran) } {
        // SAFETY: a packet of this HBA's cache whose constructor succeeded
        // (caller).
        on_hba!(hba, h => unsafe { destruct(h, pkt) });
    }
}

/// [`rvscsi_tran_pkt_destructor`] for an HBA of family `F`.
///
/// # Safety
/// `pkt` is a packet of `_hba`'s cache whose constructor succeeded, being
/// destroyed (once).
unsafe fn destruct<F: Family>(_hba: &Hba<F>, pkt: *mut scsi_pkt) {
    // SAFETY: a packet of an F HBA's cache (caller).
    if unsafe { cmd_of_pkt::<F>(pkt) }.is_some() {
        // SAFETY: the area holds the Cmd our constructor wrote (its magic
        // checked just now); the cache destroys each object once.
        unsafe { core::ptr::drop_in_place((*pkt).pkt_ha_private.cast::<Cmd<F::CmdExt>>()) };
    }
}

/// tran_setup_pkt(9E): 0 if the device can carry this packet, else -1.
///
/// # Safety
/// Called by the framework for a packet of our cache.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_setup_pkt(
    pkt: *mut scsi_pkt,
    _callback: ffi::ddi_waitfp_t,
    _arg: caddr_t,
) -> c_int {
    if pkt.is_null() {
        return -1;
    }
    // SAFETY: valid packet (caller); its address names our (iport's) tran.
    let Some(hba) = (unsafe { hba_of_addr(&(*pkt).pkt_address) }) else {
        return -1;
    };
    // SAFETY: a packet of this HBA's cache (caller), handed to us for this
    // call.
    let ok = on_hba!(hba, h => unsafe { setup(h, pkt) });
    if ok { 0 } else { -1 }
}

/// [`rvscsi_tran_setup_pkt`] on an HBA of family `F`.
///
/// # Safety
/// `pkt` is a valid packet of `hba`'s cache, handed to the HBA for the call.
unsafe fn setup<F: Family>(hba: &Hba<F>, pkt: *mut scsi_pkt) -> bool {
    // SAFETY: a packet of an F HBA's cache (caller).
    let Some(cmd) = (unsafe { cmd_of_pkt::<F>(pkt) }) else {
        return false;
    };
    // SAFETY: the framework hands us the packet for this call (caller).
    let Some(p) = (unsafe { Pkt::from_raw(pkt) }) else {
        return false;
    };
    hba.setup_pkt(&p, cmd)
}

/// tran_teardown_pkt(9E)
///
/// # Safety
/// Called by the framework for a packet of our cache.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_teardown_pkt(pkt: *mut scsi_pkt) {
    if pkt.is_null() {
        return;
    }
    // SAFETY: valid packet (caller); its address names our (iport's) tran.
    if let Some(hba) = unsafe { hba_of_addr(&(*pkt).pkt_address) } {
        // SAFETY: a packet of this HBA's cache (caller).
        on_hba!(hba, h => if let Some(cmd) = unsafe { cmd_of_pkt_on(h, pkt) } {
            h.teardown_pkt(cmd)
        });
    }
}

/// tran_start(9E)
///
/// # Safety
/// Called by the framework with a valid address and a packet of our cache
/// that the target driver hands to the HBA.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_start(ap: *mut scsi_address, pkt: *mut scsi_pkt) -> c_int {
    // SAFETY: valid address (caller).
    let (Some(hba), Some(lun)) = (unsafe { hba_of_addr(ap) }, unsafe { lun_of_addr(ap) }) else {
        return ffi::TRAN_FATAL_ERROR;
    };
    // SAFETY: a packet of this HBA's cache that the target driver hands
    // to the HBA (caller).
    on_hba!(hba, h => unsafe { start(h, lun, pkt) })
}

/// [`rvscsi_tran_start`] on an HBA of family `F`.
///
/// # Safety
/// `pkt` is null or a packet of `hba`'s cache, handed to the HBA until it
/// completes it or returns an error.
unsafe fn start<F: Family>(hba: &Hba<F>, lun: Lun, pkt: *mut scsi_pkt) -> c_int {
    // SAFETY: a packet of an F HBA's cache (caller).
    let Some(cmd) = (unsafe { cmd_of_pkt::<F>(pkt) }) else {
        return ffi::TRAN_BADPKT;
    };
    // SAFETY: the target driver hands us the packet until we complete it
    // or return an error (caller).
    let Some(p) = (unsafe { Pkt::from_raw(pkt) }) else {
        return ffi::TRAN_BADPKT;
    };
    tran_code(hba.tran_start(lun, cmd, p))
}

/// tran_abort(9E): 1 if the command (or, without one, every command of the
/// LUN) was aborted, or, called where it may not wait (interrupt context,
/// as scsi_abort(9F) allows, or a completion routine the driver runs from
/// its own task or watchdog), if the abort was accepted for the work task:
/// the command then completes `CMD_ABORTED` (or `CMD_RESET`) later (see
/// `hba::recovery`). 0 on failure.
///
/// # Safety
/// Called by the framework with a valid address and, optionally, a packet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_abort(ap: *mut scsi_address, pkt: *mut scsi_pkt) -> c_int {
    // SAFETY: valid address (caller).
    let (Some(hba), Some(lun)) = (unsafe { hba_of_addr(ap) }, unsafe { lun_of_addr(ap) }) else {
        return 0;
    };
    let ok = if pkt.is_null() {
        on_hba!(hba, h => h.abort_lun(lun))
    } else {
        // SAFETY: a packet of this HBA's cache (caller).
        on_hba!(hba, h => match unsafe { cmd_of_pkt_on(h, pkt) } {
            Some(cmd) => h.abort_cmd(cmd),
            None => false,
        })
    };
    c_int::from(ok)
}

/// tran_reset(9E): 1 on success, or, called where it may not wait (sd
/// resets from its completion routine: interrupt context, or the driver's
/// own task or watchdog), if the reset was accepted for the work task (see
/// `hba::recovery`); during a panic it is done at once, polled. 0 on
/// failure or an unknown level.
///
/// # Safety
/// Called by the framework with a valid address.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_reset(ap: *mut scsi_address, level: c_int) -> c_int {
    // SAFETY: valid address (caller).
    let (Some(hba), Some(lun)) = (unsafe { hba_of_addr(ap) }, unsafe { lun_of_addr(ap) }) else {
        return 0;
    };
    let level = match level {
        ffi::RESET_LUN => ResetLevel::Lun,
        ffi::RESET_TARGET => ResetLevel::Target,
        ffi::RESET_ALL | ffi::RESET_BUS => ResetLevel::All,
        _ => return 0,
    };
    c_int::from(on_hba!(hba, h => h.reset(lun, level)))
}

/// Looks a capability name up (`scsi_hba_lookup_capstr(9F)`).
///
/// # Safety
/// `cap` must be null or a NUL-terminated string.
unsafe fn lookup_cap(cap: *mut c_char) -> Option<Cap> {
    if cap.is_null() {
        return None;
    }
    // SAFETY: NUL-terminated (caller).
    Cap::from_index(unsafe { ffi::scsi_hba_lookup_capstr(cap) })
}

/// tran_getcap(9E): the value, or -1 for unknown capabilities.
///
/// # Safety
/// Called by the framework with a valid address and capability string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_getcap(
    ap: *mut scsi_address,
    cap: *mut c_char,
    _whom: c_int,
) -> c_int {
    // SAFETY: valid address (caller).
    let Some(hba) = (unsafe { hba_of_addr(ap) }) else {
        return -1;
    };
    // SAFETY: the framework passes a NUL-terminated capability name
    // (tran_getcap(9E)), which is all lookup_cap reads.
    cap::getcap(&on_hba!(hba, h => h.caps()), unsafe { lookup_cap(cap) })
}

/// tran_setcap(9E): 1 set, 0 not settable (to that value), -1 unknown.
///
/// # Safety
/// Called by the framework with a valid address and capability string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_tran_setcap(
    ap: *mut scsi_address,
    cap: *mut c_char,
    value: c_int,
    _whom: c_int,
) -> c_int {
    // SAFETY: valid address (caller).
    if unsafe { hba_of_addr(ap) }.is_none() {
        return -1;
    }
    // SAFETY: the framework passes a NUL-terminated capability name
    // (tran_setcap(9E)), which is all lookup_cap reads.
    cap::setcap(unsafe { lookup_cap(cap) }, value)
}

// ---- callbacks the driver registers --------------------------------------
//
// One instance per family: each is given only to the kernel for HBAs of
// its family, so its argument is known to be an `Hba<F>`.

/// The interrupt handler (`ddi_intr_handler_t`): arg1 the HBA, arg2 the
/// family's vector argument.
unsafe extern "C" fn rvscsi_intr<F: Family>(arg1: caddr_t, arg2: caddr_t) -> uint_t {
    // SAFETY: arg1 is the HBA (an Hba<F>: this instance is registered only
    // for HBAs of family F) registered by F::start (its OwnedHba address);
    // the teardown removes the handlers (waiting for a running one) before
    // the HBA is freed. Only a shared reference is made: other handlers and
    // the teardown use the HBA at the same time.
    match unsafe { arg1.cast::<Hba<F>>().as_ref() } {
        Some(hba) => match F::interrupt(hba, arg2 as usize) {
            Claim::Claimed => ffi::DDI_INTR_CLAIMED,
            Claim::Unclaimed => ffi::DDI_INTR_UNCLAIMED,
        },
        None => ffi::DDI_INTR_UNCLAIMED,
    }
}

/// The IRM callback (`ddi_cb_func_t`, ddi_cb_register(9F)): arg1 the
/// `IrmLink` of the HBA's interrupts, whose owner is the HBA once it exists.
unsafe extern "C" fn rvscsi_irm<F: Family>(
    _dip: *mut ffi::dev_info_t,
    action: c_int,
    cbarg: *mut c_void,
    arg1: *mut c_void,
    _arg2: *mut c_void,
) -> c_int {
    let Some(change) = crate::ddi::intr::IrmChange::decode(action, cbarg) else {
        return ffi::DDI_ENOTSUP;
    };
    // SAFETY: arg1 is the IrmLink registered with the callback; it lives
    // until ddi_cb_unregister, which detach calls after freeing every
    // vector (no callback runs after the last free returns).
    let Some(link) = (unsafe { arg1.cast::<crate::ddi::intr::IrmLink>().as_ref() }) else {
        return ffi::DDI_FAILURE;
    };
    // SAFETY: the owner is the HBA (an Hba<F>, its OwnedHba address), set
    // by F::start after it was built and valid until the teardown has
    // unregistered the callback, before it is freed; only a shared
    // reference is made.
    match unsafe { link.owner().cast::<Hba<F>>().as_ref() } {
        Some(hba) => match F::irm_changed(hba, change) {
            IrmAnswer::Followed => ffi::DDI_SUCCESS,
            IrmAnswer::Failed => ffi::DDI_FAILURE,
            IrmAnswer::NotSupported => ffi::DDI_ENOTSUP,
        },
        // Still attaching: an ADD need not be taken; a REMOVE cannot be
        // followed yet (the kernel then leaves the vectors, with a warning).
        None => match change {
            crate::ddi::intr::IrmChange::Add(_) => ffi::DDI_SUCCESS,
            crate::ddi::intr::IrmChange::Remove(_) => ffi::DDI_FAILURE,
        },
    }
}

/// The work task (ddi_taskq_dispatch(9F)): arg the HBA.
unsafe extern "C" fn rvscsi_work<F: Family>(arg: *mut c_void) {
    // SAFETY: the HBA (an Hba<F>) dispatched it; the teardown waits for
    // the task queue before the HBA is freed.
    if let Some(hba) = unsafe { arg.cast::<Hba<F>>().as_ref() } {
        hba.run_work();
    }
}

/// The watchdog (ddi_periodic_add(9F)): arg the HBA.
unsafe extern "C" fn rvscsi_watchdog<F: Family>(arg: *mut c_void) {
    // SAFETY: the HBA (an Hba<F>) started it; the teardown deletes it
    // (waiting for a running tick) before freeing the HBA.
    if let Some(hba) = unsafe { arg.cast::<Hba<F>>().as_ref() } {
        hba.watchdog();
    }
}
