//! Bad input from target drivers, table-driven: each malformed packet or
//! call gets its defined answer, nothing panics, and the next ordinary
//! packet on the same LUN still works.

use rvscsi::ffi;
use rvscsi::scsa::PktState;
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_emu::scsa::packet::InitError;
use rvscsi_emu::{DataBuf, Device, InitArgs, Packet};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig, wait_until};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

fn read_pkt(dev: &Arc<Device>, lba: u32, args: InitArgs) -> Packet {
    let mut p = dev
        .init_pkt(Some(Arc::new(DataBuf::new(4096, 0, true))), args)
        .expect("packet");
    p.cdb_mut()[..10].copy_from_slice(&read10(lba, 8));
    p
}

/// An ordinary READ on `dev` works and returns the image's data.
fn still_works(rig: &Rig, dev: &Arc<Device>, case: &str) {
    let buf = Arc::new(DataBuf::new(4096, 0, true));
    let mut p = dev
        .init_pkt(Some(buf.clone()), InitArgs::default())
        .unwrap_or_else(|e| panic!("{case}: the next packet: {e:?}"));
    p.cdb_mut().copy_from_slice(&read10(40, 8));
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT, "{case}: the next packet");
    assert!(p.wait(WAIT), "{case}: the next packet completes");
    let r = p.result();
    assert_eq!(
        (r.reason, r.status(), r.resid),
        (ffi::CMD_CMPLT, 0, 0),
        "{case}: {r:?}"
    );
    assert_eq!(p.comp_calls(), 1, "{case}");
    p.destroy();
    assert_eq!(
        buf.bytes(),
        &rig.images[0].expected(40, 8)[..],
        "{case}: the data"
    );
}

/// What a case does, and checks about its answer.
struct Case {
    name: &'static str,
    run: fn(&Rig, &Arc<Device>),
}

fn setup_refused(dev: &Arc<Device>, args: InitArgs, what: &str) {
    match dev.init_pkt(None, args) {
        Err(InitError::SetupRefused) => {}
        Err(e) => panic!("{what}: refused for another reason: {e:?}"),
        Ok(p) => {
            p.destroy();
            panic!("{what}: tran_setup_pkt accepted it");
        }
    }
}

const CASES: &[Case] = &[
    Case {
        name: "CDB longer than the device allows",
        run: |_, dev| {
            setup_refused(
                dev,
                InitArgs {
                    cmdlen: 33,
                    ..InitArgs::default()
                },
                "33-byte CDB",
            )
        },
    },
    Case {
        name: "no CDB",
        run: |_, dev| {
            setup_refused(
                dev,
                InitArgs {
                    cmdlen: 0,
                    ..InitArgs::default()
                },
                "0-byte CDB",
            )
        },
    },
    Case {
        name: "no status byte",
        run: |_, dev| {
            setup_refused(
                dev,
                InitArgs {
                    statuslen: 0,
                    ..InitArgs::default()
                },
                "0-byte status",
            )
        },
    },
    Case {
        name: "status area too small for sense",
        run: |_, dev| {
            // A TEST UNIT READY after a LUN reset gets CHECK CONDITION (unit
            // attention): with a 1-byte status area only the status byte.
            assert_eq!(dev.reset(ffi::RESET_LUN), 1);
            let p = dev
                .init_pkt(
                    None,
                    InitArgs {
                        statuslen: 1,
                        ..InitArgs::default()
                    },
                )
                .expect("packet");
            assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
            assert!(p.wait(WAIT));
            let r = p.result();
            assert_eq!(r.scb, vec![ffi::STATUS_CHECK], "{r:?}");
            assert!(!r.state.contains(PktState::ARQ_DONE), "{r:?}");
            p.destroy(); // checks the guard bytes after the status area
        },
    },
    Case {
        name: "more cookies than sgllen",
        run: |_, dev| {
            let p = read_pkt(dev, 0, InitArgs::default());
            // SAFETY: the test owns the packet; it lies about the count for
            // the call only and restores it before teardown.
            let saved = unsafe { (*p.pkt()).pkt_numcookies };
            // SAFETY: as above.
            unsafe { (*p.pkt()).pkt_numcookies = 255 };
            assert_eq!(p.start_async(), ffi::TRAN_BADPKT);
            // SAFETY: as above.
            unsafe { (*p.pkt()).pkt_numcookies = saved };
            p.destroy();
        },
    },
    Case {
        name: "both read and write",
        run: |_, dev| {
            let p = read_pkt(dev, 0, InitArgs::default());
            // SAFETY: as above, for pkt_dma_flags.
            let saved = unsafe { (*p.pkt()).pkt_dma_flags };
            // SAFETY: as above.
            unsafe { (*p.pkt()).pkt_dma_flags = saved | ffi::DDI_DMA_RDWR };
            assert_eq!(p.start_async(), ffi::TRAN_BADPKT);
            // SAFETY: as above.
            unsafe { (*p.pkt()).pkt_dma_flags = saved };
            p.destroy();
        },
    },
    Case {
        name: "zero-length transfer with a data direction",
        run: |_, dev| {
            // READ(10) of 0 blocks, marked as a read, no buffer: a command
            // without data, accepted and completed.
            let mut p = dev.init_pkt(None, InitArgs::default()).expect("packet");
            p.cdb_mut().copy_from_slice(&read10(0, 0));
            // SAFETY: the test owns the packet; it sets the direction a
            // framework would only set with a buffer.
            unsafe { (*p.pkt()).pkt_dma_flags |= ffi::DDI_DMA_READ };
            assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
            assert!(p.wait(WAIT));
            let r = p.result();
            assert_eq!(
                (r.reason, r.status(), r.resid),
                (ffi::CMD_CMPLT, 0, 0),
                "{r:?}"
            );
            // SAFETY: as above.
            unsafe { (*p.pkt()).pkt_dma_flags &= !ffi::DDI_DMA_READ };
            p.destroy();
        },
    },
    Case {
        name: "a packet started twice",
        run: |rig, dev| {
            let m = rig.bed().machine.clone();
            // Keep it out while it is started again.
            m.faults.arm(Fault::Withhold(Match::Lba(11)));
            let p = read_pkt(dev, 11, InitArgs::default());
            assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
            assert_eq!(p.start_async(), ffi::TRAN_BADPKT, "already in flight");
            wait_until("the command to be withheld", WAIT, || {
                m.faults.withheld() > 0
            });
            assert_eq!(p.start_async(), ffi::TRAN_BADPKT, "still in flight");
            m.faults.release_withheld();
            still_works(rig, dev, "during a started-twice packet");
            assert!(p.wait(WAIT));
            assert_eq!(p.comp_calls(), 1, "completed once");
            assert_eq!(p.result().reason, ffi::CMD_CMPLT);
            p.destroy();
        },
    },
    Case {
        name: "a packet torn down while outstanding",
        run: |rig, dev| {
            let m = rig.bed().machine.clone();
            m.faults.arm(Fault::Withhold(Match::Lba(12)));
            let p = read_pkt(dev, 12, InitArgs::default());
            let pkt = p.pkt() as u64;
            let seen = m.probes.firings("rvscsi-cmd-done").len();
            assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
            wait_until("the command to be withheld", WAIT, || {
                m.faults.withheld() > 0
            });
            // The target driver's bug: destroy without waiting. The driver
            // cuts the command loose and gets it out of the device (here the
            // whole ladder, to a device reset) before the buffers go.
            p.destroy_outstanding();
            assert!(
                rig.log()
                    .iter()
                    .any(|l| l.contains("torn down while in flight"))
            );
            let done = m.probes.firings("rvscsi-cmd-done");
            assert!(
                done[seen..].iter().all(|f| f.args[0] != pkt),
                "never completed to anyone"
            );
        },
    },
    Case {
        name: "unknown capabilities",
        run: |_, dev| {
            assert_eq!(dev.getcap("no-such-capability", 1), -1);
            assert_eq!(dev.setcap("no-such-capability", 1, 1), -1);
            assert_eq!(dev.getcap("", 1), -1);
        },
    },
    Case {
        name: "setcap with bad values",
        run: |_, dev| {
            assert_eq!(dev.setcap("tagged-qing", 7, 1), 0, "not a boolean");
            assert_eq!(dev.setcap("tagged-qing", -1, 1), 0, "negative");
            assert_eq!(dev.setcap("dma-max", 4096, 1), 0, "read-only");
            assert_eq!(dev.setcap("auto-rqsense", 0, 1), 0, "cannot be turned off");
            assert_eq!(dev.getcap("tagged-qing", 1), 1, "tagged queueing stays on");
            assert_eq!(dev.getcap("auto-rqsense", 1), 1, "ARQ stays on");
        },
    },
    Case {
        name: "tran_abort of a packet that is not outstanding",
        run: |_, dev| {
            let p = read_pkt(dev, 0, InitArgs::default());
            assert_eq!(dev.abort(Some(&p)), 0);
            p.destroy();
        },
    },
    Case {
        name: "tran_reset at an unknown level",
        run: |_, dev| assert_eq!(dev.reset(99), 0),
    },
];

#[test]
fn every_malformed_packet_or_call_gets_its_defined_answer_and_breaks_nothing() {
    let rig = Rig::start(RigConfig {
        images: vec![(2048, 0, 0)],
        driver: Driver::Recorder,
        ..RigConfig::default()
    });
    let dev = rig.load_luns().remove(0).dev.clone();
    for case in CASES {
        (case.run)(&rig, &dev);
        rvscsi_sim::testkit::clear_unit_attention(&dev);
        still_works(&rig, &dev, case.name);
    }
    rig.finish_clean();
}
