//! A packet torn down while the device still has its command, from a
//! completion routine: interrupt context.
//!
//! sd destroys packets from its completion routine (sdintr ->
//! sd_return_command / sd_destroypkt_for_buf), which runs where the HBA
//! calls scsi_hba_pkt_comp(9F): its interrupt handler (scsi_hba.c
//! `scsi_hba_pkt_comp` calls `pkt_comp` directly). scsi_destroy_pkt(9F)
//! calls tran_teardown_pkt(9E) and then unbinds the packet's DMA and frees
//! it to the packet cache (scsi_resource.c `scsi_free_cache_pkt`:
//! `tran_teardown_pkt`, `scsi_dmafree_attr` -> `ddi_dma_unbind_handle`,
//! `kmem_cache_free`), so when tran_teardown_pkt returns the device must
//! no longer be able to touch the command's buffers, and the HBA must not
//! touch the command again. The HBA may not wait for the device there
//! (no delay, cv_wait, or more than a millisecond of drv_usecwait in one
//! interrupt: the emulation reports each, and `finish_clean` fails).
//!
//! Here a TEST UNIT READY's completion callback destroys a READ the device
//! holds (its completion withheld, test/emu/src/faults.rs), while another
//! READ is also held: the driver resets the device without waiting,
//! takes every command back, and the work task brings the device back and
//! completes the other READ `CMD_RESET` + `STAT_BUS_RESET`; I/O goes on.
//! Under DEBUG kmem too (the torn-down packet's destructor runs at once
//! and its memory is poisoned: a late write into it is reported).

use rvscsi::ffi;
use rvscsi::scsa::PktStatistics;
use rvscsi_emu::ddi::kmem::{self, KmemMode};
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_emu::{DataBuf, Device, InitArgs, Packet};
use rvscsi_sim::testkit::{
    Driver, Rig, RigConfig, clear_unit_attention, packet_cache, reset_firings, test_unit_ready,
    wait_until,
};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The kmem mode is process-wide and a cache takes it at creation: the
/// tests of this file run one at a time, each setting it.
static MODE: Mutex<()> = Mutex::new(());

fn kmem_mode(mode: Option<KmemMode>) -> MutexGuard<'static, ()> {
    let g = MODE.lock().unwrap_or_else(|p| p.into_inner());
    kmem::force_debug(mode);
    g
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

fn read_pkt(dev: &Arc<Device>, lba: u32) -> Packet {
    let mut p = dev
        .init_pkt(
            Some(Arc::new(DataBuf::new(4096, 0, true))),
            InitArgs::default(),
        )
        .expect("a READ packet");
    p.cdb_mut().copy_from_slice(&read10(lba, 8));
    p
}

fn teardown_from_a_completion_callback(mode: Option<KmemMode>, transport: &str) {
    let _mode = kmem_mode(mode);
    let rig = Rig::start(RigConfig {
        images: vec![(4096, 0, 0)],
        driver: Driver::Recorder,
        transport: transport.into(),
        ..RigConfig::default()
    });
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    let done_before = m.probes.firings("rvscsi-cmd-done").len();
    let resets_before = reset_firings(&rig).len();

    // Two READs the device holds: one to be torn down, one that only the
    // device reset can end.
    m.faults.arm(Fault::Withhold(Match::Lba(200)));
    m.faults.arm(Fault::Withhold(Match::Lba(208)));
    let doomed = read_pkt(&dev, 200);
    let doomed_addr = doomed.pkt() as u64;
    let other = read_pkt(&dev, 208);
    assert_eq!(doomed.start_async(), ffi::TRAN_ACCEPT);
    assert_eq!(other.start_async(), ffi::TRAN_ACCEPT);
    wait_until("both READs to be withheld", WAIT, || {
        m.faults.withheld() == 2
    });

    // A TEST UNIT READY whose completion callback, in interrupt context,
    // destroys the held READ, as sd's completion routine may. (A
    // completion the watchdog's safety net reaps runs in thread context:
    // the callback then leaves the READ alone and another TEST UNIT READY
    // is sent, a bounded number of times.)
    let doomed = Arc::new(Mutex::new(Some(doomed)));
    let in_interrupt = Arc::new(AtomicI32::new(-1));
    for _ in 0..20 {
        let tur = test_unit_ready(&dev);
        {
            let (doomed, in_interrupt) = (doomed.clone(), in_interrupt.clone());
            tur.set_callback(Some(Arc::new(move |_: &Packet| {
                let ctx = rvscsi_emu::ddi::cpu::servicing_interrupt();
                in_interrupt.store(ctx, Ordering::Relaxed);
                if ctx != 1 {
                    return;
                }
                let p = doomed.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(p) = p {
                    p.destroy_outstanding();
                }
            })));
        }
        assert_eq!(tur.start_async(), ffi::TRAN_ACCEPT);
        assert!(tur.wait(WAIT), "the TEST UNIT READY completes");
        tur.set_callback(None);
        tur.destroy();
        if in_interrupt.load(Ordering::Relaxed) == 1 {
            break;
        }
    }
    assert_eq!(in_interrupt.load(Ordering::Relaxed), 1, "interrupt context");
    assert!(
        doomed.lock().unwrap().is_none(),
        "the callback destroyed the held READ"
    );

    // The device was reset and comes back; the other READ ends with the
    // reset, once, through scsi_hba_pkt_comp.
    assert!(other.wait(WAIT), "the reset ended the other READ");
    let r = other.result();
    assert_eq!(r.reason, ffi::CMD_RESET, "{r:?}");
    assert!(r.statistics.contains(PktStatistics::BUS_RESET), "{r:?}");
    assert_eq!(other.comp_calls(), 1);
    other.destroy();
    wait_until("the device to come back", WAIT, || {
        reset_firings(&rig)[resets_before..]
            .iter()
            .any(|f| f[0] == ffi::RESET_ALL as u64 && f[3] == 1)
    });
    assert_eq!(
        reset_firings(&rig)[resets_before..]
            .iter()
            .filter(|f| f[0] == ffi::RESET_ALL as u64)
            .count(),
        1,
        "one device reset: {:?}",
        reset_firings(&rig)
    );
    assert!(
        m.probes.firings("rvscsi-cmd-done")[done_before..]
            .iter()
            .all(|f| f.args[0] != doomed_addr),
        "the torn-down packet is never completed"
    );

    // I/O goes on, with the right data.
    clear_unit_attention(&dev);
    for lba in [64u32, 200, 208] {
        let p = read_pkt(&dev, lba);
        assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
        assert!(p.wait(WAIT), "READ at {lba} completes");
        let r = p.result();
        assert_eq!((r.reason, r.status()), (ffi::CMD_CMPLT, 0), "{r:?}");
        p.destroy();
    }
    if mode.is_some_and(|m| m.debug) {
        assert_eq!(
            packet_cache(&dev).modified.load(Ordering::Acquire),
            0,
            "nothing wrote into a freed packet"
        );
    }
    // No sleeping, waiting or long spinning in the interrupt, no lock
    // without the interrupt priority taken there, nothing freed that the
    // device still had.
    rig.finish_clean();
}

#[test]
fn a_packet_torn_down_in_flight_from_a_completion_callback_resets_without_waiting() {
    teardown_from_a_completion_callback(
        Some(KmemMode {
            debug: false,
            reap_one_in: 0,
            seed: kmem::DEFAULT_SEED,
        }),
        "modern",
    );
}

/// The legacy interface: the status write resets the device at once
/// (QEMU's virtio_ioport_write), the read-back finds 0.
#[test]
fn legacy_transport_a_packet_torn_down_in_flight_from_a_completion_callback() {
    teardown_from_a_completion_callback(None, "legacy");
}

#[test]
fn debug_kmem_a_packet_torn_down_in_flight_from_a_completion_callback() {
    teardown_from_a_completion_callback(
        Some(KmemMode {
            reap_one_in: 0,
            ..KmemMode::debug(kmem::DEFAULT_SEED)
        }),
        "modern",
    );
}
