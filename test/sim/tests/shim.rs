//! The driver reached through its own C shim (`c-shim/rvscsi_shim.c`, built
//! for the host with the project's minimal illumos declarations): `_init`
//! installs the linkage, the bed attaches through the shim's `dev_ops`, the
//! shim sets up the `scsi_hba_tran` and registers the iport, and `_fini`
//! refuses to unload while an instance is attached.
//!
//! One process loads the shim once, like a kernel: the tests here take
//! turns (the module's install state is process-wide).

use rvscsi::entry;
use rvscsi::ffi;
use rvscsi_emu::bed::hosted;
use rvscsi_emu::ddi::modctl::EBUSY;
use rvscsi_emu::scsa::hba::hba_state;
use rvscsi_sim::testkit::{Binding, Rig, RigConfig, random_bytes};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn shim_rig(transport: &str, images: Vec<(u64, u8, u16)>) -> Rig {
    Rig::start(RigConfig {
        images,
        transport: transport.into(),
        binding: Binding::Shim,
        ..RigConfig::default()
    })
}

#[test]
fn the_shim_registers_the_hba_with_every_vector_pointing_at_the_library() {
    let _turn = take_turn();
    let rig = shim_rig("modern", vec![(8192, 0, 0)]);
    let st = hba_state(rig.bed().hba).expect("scsi_hba_attach_setup was called");
    // SAFETY: the attached HBA's tran, read while attached.
    let t = unsafe { &*st.tran };
    // Function addresses: the vectors are the library's entry points.
    let at = |f: Option<*const ()>| f.map_or(0, |p| p as usize);
    let vectors = [
        (
            "tran_start",
            at(t.tran_start.map(|f| f as *const ())),
            entry::rvscsi_tran_start as *const (),
        ),
        (
            "tran_abort",
            at(t.tran_abort.map(|f| f as *const ())),
            entry::rvscsi_tran_abort as *const (),
        ),
        (
            "tran_reset",
            at(t.tran_reset.map(|f| f as *const ())),
            entry::rvscsi_tran_reset as *const (),
        ),
        (
            "tran_getcap",
            at(t.tran_getcap.map(|f| f as *const ())),
            entry::rvscsi_tran_getcap as *const (),
        ),
        (
            "tran_setcap",
            at(t.tran_setcap.map(|f| f as *const ())),
            entry::rvscsi_tran_setcap as *const (),
        ),
        (
            "tran_tgt_init",
            at(t.tran_tgt_init.map(|f| f as *const ())),
            entry::rvscsi_tran_tgt_init as *const (),
        ),
        (
            "tran_tgt_free",
            at(t.tran_tgt_free.map(|f| f as *const ())),
            entry::rvscsi_tran_tgt_free as *const (),
        ),
        (
            "tran_setup_pkt",
            at(t.tran_setup_pkt.map(|f| f as *const ())),
            entry::rvscsi_tran_setup_pkt as *const (),
        ),
        (
            "tran_teardown_pkt",
            at(t.tran_teardown_pkt.map(|f| f as *const ())),
            entry::rvscsi_tran_teardown_pkt as *const (),
        ),
        (
            "tran_pkt_constructor",
            at(t.tran_pkt_constructor.map(|f| f as *const ())),
            entry::rvscsi_tran_pkt_constructor as *const (),
        ),
        (
            "tran_pkt_destructor",
            at(t.tran_pkt_destructor.map(|f| f as *const ())),
            entry::rvscsi_tran_pkt_destructor as *const (),
        ),
    ];
    for (name, got, want) in vectors {
        assert_eq!(
            got, want as usize,
            "{name} points at the library's entry point"
        );
    }
    assert!(t.tran_init_pkt.is_none() && t.tran_destroy_pkt.is_none());
    assert_eq!(t.tran_hba_len, entry::rvscsi_pkt_private_len());
    assert_eq!(t.tran_interconnect_type, ffi::INTERCONNECT_PARALLEL);
    assert_eq!(
        t.tran_hba_flags,
        ffi::SCSI_HBA_HBA
            | ffi::SCSI_HBA_ADDR_COMPLEX
            | ffi::SCSI_HBA_TRAN_CDB
            | ffi::SCSI_HBA_TRAN_SCB
    );
    assert_eq!(
        t.tran_dma_attr.dma_attr_maxxfer,
        65535 * 512,
        "the library's DMA attributes"
    );
    // The shim's dev_ops as scsi_hba_init left it.
    let ops = hosted::installed_dev_ops().expect("installed");
    // SAFETY: the installed module's static dev_ops.
    let ops = unsafe { &*ops };
    assert_eq!(ops.devo_rev, ffi::DEVO_REV);
    assert!(
        !ops.devo_bus_ops.is_null(),
        "scsi_hba_init supplied bus_ops"
    );
    assert!(ops.devo_quiesce.is_some());
    assert_eq!(rig.bed().quiesce(), ffi::DDI_SUCCESS);
    rig.finish_clean();
}

#[test]
fn through_the_shim_both_transports_discover_every_lun_and_move_data_byte_exact() {
    let _turn = take_turn();
    for transport in ["legacy", "modern"] {
        let rig = shim_rig(transport, vec![(8192, 0, 0), (4096, 1, 0), (4096, 1, 3)]);
        let disks = rig.sd.disks();
        assert_eq!(disks.len(), 3, "{transport}: every LUN through the shim");
        for (i, d) in disks.iter().enumerate() {
            let data = random_bytes(i as u64 + 1, 64 * 1024);
            d.write(100, &data).expect("write");
            assert_eq!(
                d.read(100, data.len()).expect("read"),
                data,
                "{transport} disk {i}"
            );
        }
        rig.finish_clean();
    }
}

#[test]
fn fini_refuses_while_attached_and_the_module_loads_again_after_unloading() {
    let _turn = take_turn();
    let rig = shim_rig("modern", vec![(8192, 0, 0)]);
    assert_ne!(hosted::info(), 0, "_info answers");
    assert_eq!(hosted::fini(), EBUSY, "_fini while an HBA is attached");
    assert!(hosted::installed_dev_ops().is_some(), "still installed");
    // Still working after the refused unload.
    let disk = rig.disk0();
    let data = random_bytes(9, 4096);
    disk.write(8, &data).expect("write");
    assert_eq!(disk.read(8, 4096).expect("read"), data);
    rig.finish_clean();

    assert_eq!(hosted::fini(), 0, "_fini once detached");
    assert!(hosted::installed_dev_ops().is_none(), "removed");
    // Loading the same module again works, and so does the driver.
    assert_eq!(hosted::init(), 0, "_init after _fini");
    let rig = shim_rig("legacy", vec![(8192, 0, 0)]);
    let disk = rig.disk0();
    disk.write(16, &data).expect("write after reload");
    assert_eq!(disk.read(16, 4096).expect("read"), data);
    rig.finish_clean();
}
