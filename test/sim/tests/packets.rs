//! The SCSA packet life cycle through the driver, packet by packet (a
//! target driver that sends nothing at attach, so each LUN is found as
//! the device left it): constructor and destructor, setup and teardown,
//! cookies, partial DMA with residual accounting, auto request sense,
//! sync ordering, FLAG_NOINTR, TRAN_BUSY, and bad packets.

use rvscsi::ffi;
use rvscsi::scsa::{PktFlags, PktState, PktStatistics};
use rvscsi_emu::{DataBuf, Device, InitArgs};
use rvscsi_qtest::json;
use rvscsi_sim::testkit::{Driver, Rig, RigConfig};
use std::sync::Arc;
use std::time::Duration;

fn raw_rig(extra: impl FnOnce(&mut RigConfig)) -> Rig {
    let mut cfg = RigConfig {
        images: vec![(16_384, 0, 0)],
        driver: Driver::Recorder,
        ..RigConfig::default()
    };
    extra(&mut cfg);
    Rig::start(cfg)
}

fn lun0(rig: &Rig) -> Arc<Device> {
    let dev = rig
        .recorder
        .devices()
        .into_iter()
        .next()
        .expect("LUN 0 configured");
    clear_unit_attention(&dev);
    dev
}

/// TEST UNIT READY until GOOD: the power-on unit attention is consumed.
fn clear_unit_attention(dev: &Arc<Device>) {
    for _ in 0..4 {
        if run(dev, &[0u8; 6], None, 32).status() == ffi::STATUS_GOOD {
            return;
        }
    }
    panic!("the LUN never became ready");
}

/// Equality of two byte strings without printing them (they are large).
#[track_caller]
fn same(a: &[u8], b: &[u8], what: &str) {
    if a != b {
        let at = a
            .iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        panic!(
            "{what}: {} vs {} bytes, first difference at byte {at}",
            a.len(),
            b.len()
        );
    }
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

const WAIT: Duration = Duration::from_secs(30);

/// Sends `cdb` interrupt-driven and returns the packet's result.
fn run(
    dev: &Arc<Device>,
    cdb: &[u8],
    data: Option<Arc<DataBuf>>,
    statuslen: usize,
) -> rvscsi_emu::PktResult {
    let mut p = dev
        .init_pkt(
            data,
            InitArgs {
                cmdlen: cdb.len(),
                statuslen,
                ..InitArgs::default()
            },
        )
        .expect("packet");
    p.cdb_mut().copy_from_slice(cdb);
    assert_eq!(p.transport(), ffi::TRAN_ACCEPT);
    assert!(p.wait(WAIT), "completion");
    assert_eq!(p.comp_calls(), 1, "scsi_hba_pkt_comp exactly once");
    let r = p.result();
    p.destroy();
    r
}

#[test]
fn constructor_runs_once_per_cached_packet_and_destructor_for_each_at_detach() {
    let rig = raw_rig(|_| {});
    let dev = lun0(&rig);
    // A DEBUG kernel's kmem (RVSCSI_KMEM_DEBUG=1) constructs at every
    // allocation and destroys at every free instead (kmem.c,
    // kmem_cache_alloc_debug / kmem_cache_free_debug).
    let mode = rvscsi_emu::ddi::kmem::mode();
    let debug = mode.debug;
    // Random reaps of a non-DEBUG kernel (RVSCSI_KMEM_REAP) destroy cached
    // objects at any time: then only the balance at detach is certain.
    let reaped = !debug && mode.reap_one_in != 0;
    let (c0, d0, _) = rig.bed().cache_counts().expect("a packet cache");
    if debug {
        assert_eq!(c0, d0, "DEBUG: every free object destroyed");
    } else if !reaped {
        assert_eq!(d0, 0);
    }
    // Eight packets at once: eight constructed (or reused) objects.
    let pkts: Vec<_> = (0..8)
        .map(|_| dev.init_pkt(None, InitArgs::default()).expect("packet"))
        .collect();
    let (c1, _, in_use) = rig.bed().cache_counts().expect("cache");
    assert_eq!(in_use, 8);
    if debug {
        assert_eq!(c1, c0 + 8, "DEBUG: a constructor per allocation");
    } else if !reaped {
        assert!(c1 >= 8 && c1 <= c0 + 8, "constructed {c1}");
    }
    for p in pkts {
        p.destroy();
    }
    // Reallocation reuses constructed packets: no new constructor calls.
    for _ in 0..20 {
        dev.init_pkt(None, InitArgs::default())
            .expect("packet")
            .destroy();
    }
    let (c2, d2, in_use) = rig.bed().cache_counts().expect("cache");
    if debug {
        assert_eq!(
            (c2, d2, in_use),
            (c1 + 20, d0 + 28, 0),
            "DEBUG: constructor and destructor around every use"
        );
    } else if reaped {
        assert_eq!(in_use, 0);
    } else {
        assert_eq!(
            (c2, in_use),
            (c1, 0),
            "the constructor preallocates once; setup/teardown per use"
        );
    }
    // Detach runs the destructor of every one (the leak check sees any
    // DMA memory a destructor forgot).
    rig.finish_clean();
}

/// tran_setup_pkt refuses a packet made with `args` (`what` says why).
fn assert_refused(dev: &Arc<Device>, args: InitArgs, what: &str) {
    let r = dev.init_pkt(None, args);
    assert!(
        matches!(r, Err(rvscsi_emu::scsa::packet::InitError::SetupRefused)),
        "{what}"
    );
}

#[test]
fn setup_refuses_what_the_device_cannot_carry() {
    let rig = raw_rig(|_| {});
    let dev = lun0(&rig);
    // cdb_size is 32 on QEMU: a 33-byte CDB can never be sent.
    assert_refused(
        &dev,
        InitArgs {
            cmdlen: 33,
            ..InitArgs::default()
        },
        "33-byte CDB",
    );
    assert_refused(
        &dev,
        InitArgs {
            cmdlen: 0,
            ..InitArgs::default()
        },
        "no CDB",
    );
    assert_refused(
        &dev,
        InitArgs {
            statuslen: 0,
            ..InitArgs::default()
        },
        "no status byte",
    );
    // 32 bytes (an extended CDB area) is fine, and so is a large status area.
    dev.init_pkt(
        None,
        InitArgs {
            cmdlen: 32,
            statuslen: 300,
            tgtlen: 64,
            ..InitArgs::default()
        },
    )
    .expect("max CDB")
    .destroy();
    rig.finish_clean();
}

#[test]
fn cookies_from_one_to_seg_max_and_page_crossing_buffers_read_exactly() {
    let rig = raw_rig(|_| {});
    let dev = lun0(&rig);
    let img = &rig.images[0];
    // (bytes, offset into the first page) -> cookies on scattered pages.
    for (len, off, cookies) in [
        (512usize, 0usize, 1usize),
        (512, 3584, 1),
        (1024, 3584, 2),
        (8192, 512, 3),
        (253 * 4096, 0, 253),
        (253 * 4096, 2048, 254),
    ] {
        let data = Arc::new(DataBuf::new(len, off, true));
        let mut p = dev
            .init_pkt(Some(data.clone()), InitArgs::default())
            .expect("packet");
        assert_eq!(
            p.cookies().len(),
            cookies,
            "{len} bytes at page offset {off}"
        );
        assert_eq!(p.resid(), 0, "one window");
        p.cdb_mut().copy_from_slice(&read10(8, (len / 512) as u16));
        assert_eq!(p.transport(), ffi::TRAN_ACCEPT);
        assert!(p.wait(WAIT));
        let r = p.result();
        assert_eq!((r.reason, r.status(), r.resid), (ffi::CMD_CMPLT, 0, 0));
        assert!(
            r.state
                .contains(PktState::XFERRED_DATA | PktState::GOT_STATUS)
        );
        p.destroy();
        same(
            data.bytes(),
            &img.expected(8, len as u64 / 512),
            &format!("{len} bytes at offset {off}"),
        );
    }
    rig.finish_clean();
}

#[test]
fn partial_dma_windows_account_the_residual() {
    let rig = raw_rig(|_| {});
    let dev = lun0(&rig);
    let img = &rig.images[0];
    // 600 pages + an offset: more cookies than sgllen (254).
    let len = 600 * 4096;
    let data = Arc::new(DataBuf::new(len, 1024, true));
    let mut p = dev
        .init_pkt(
            Some(data.clone()),
            InitArgs {
                flags: ffi::PKT_DMA_PARTIAL,
                ..InitArgs::default()
            },
        )
        .expect("packet");
    let (_, nwin) = p.windows();
    assert!(nwin >= 3, "{nwin} windows");
    let mut lba = 32u64;
    let mut covered = 0usize;
    loop {
        let (wlen, woff) = p.window_extent();
        assert_eq!(woff as usize, covered, "windows are consecutive");
        assert!(p.cookies().len() <= 254, "a window within sgllen");
        assert_eq!(wlen % 512, 0, "windows end on the granularity (512)");
        covered += wlen;
        assert_eq!(
            p.resid() as usize,
            len - covered,
            "pkt_resid: bytes not yet covered by a window"
        );
        p.cdb_mut()
            .copy_from_slice(&read10(lba as u32, (wlen / 512) as u16));
        assert_eq!(p.transport(), ffi::TRAN_ACCEPT);
        assert!(p.wait(WAIT));
        assert_eq!(p.result().resid, 0, "the transfer's own residual");
        lba += (wlen / 512) as u64;
        if p.next_window().is_err() {
            break;
        }
    }
    assert_eq!(covered, len);
    p.destroy();
    same(
        data.bytes(),
        &img.expected(32, (len / 512) as u64),
        "all windows",
    );
    // Without PKT_DMA_PARTIAL such a buffer cannot be bound at all.
    let r = dev.init_pkt(
        Some(Arc::new(DataBuf::new(len, 1024, true))),
        InitArgs::default(),
    );
    assert!(matches!(
        r,
        Err(rvscsi_emu::scsa::packet::InitError::Dma(
            ffi::DDI_DMA_TOOBIG
        ))
    ));
    rig.finish_clean();
}

#[test]
fn auto_request_sense_fills_the_status_area_20_byte_and_extended() {
    let rig = raw_rig(|c| c.images = vec![(2048, 0, 0), (2048, 1, 0), (2048, 2, 0)]);
    let devs = rig.recorder.devices();
    let tur = [0u8; 6];
    // 32-byte status area: ARQ with up to 20 sense bytes.
    let r = run(&devs[0], &tur, None, 32);
    assert_eq!(r.status(), ffi::STATUS_CHECK);
    assert!(r.state.contains(PktState::ARQ_DONE) && !r.state.contains(PktState::XARQ_DONE));
    assert_eq!(r.sense_key(), Some((6, 0x29, 0)), "power-on unit attention");
    assert_eq!(
        r.sense().map(|s| s.len()),
        Some(18),
        "sts_rqpkt_resid = 20 - 18"
    );
    assert_eq!(r.scb[1], 0, "request sense status GOOD");
    // Extended status area (PKT_XARQ's 32 + more): the whole sense.
    let r = run(&devs[1], &tur, None, 32 + 96);
    assert!(r.state.contains(PktState::ARQ_DONE | PktState::XARQ_DONE));
    let rq_state = u32::from_ne_bytes(r.scb[4..8].try_into().unwrap());
    assert!(
        rq_state & PktState::XARQ_DONE.bits() != 0,
        "XARQ in sts_rqpkt_state too"
    );
    assert_eq!(r.sense().map(|s| s.len()), Some(18));
    assert_eq!(r.sense_key(), Some((6, 0x29, 0)));
    // A 1-byte status area: the status only, no ARQ, nothing overrun.
    let r = run(&devs[2], &tur, None, 1);
    assert_eq!(r.scb, vec![ffi::STATUS_CHECK]);
    assert!(!r.state.contains(PktState::ARQ_DONE));
    // Afterwards a good command: status GOOD, no ARQ state.
    let r = run(&devs[0], &tur, None, 32);
    assert_eq!(
        (r.status(), r.state.contains(PktState::ARQ_DONE)),
        (0, false)
    );
    rig.finish_clean();
}

#[test]
fn consistent_reads_are_visible_at_completion_others_after_teardown() {
    let rig = raw_rig(|_| {});
    let dev = lun0(&rig);
    let img = &rig.images[0];
    for consistent in [true, false] {
        let data = Arc::new(DataBuf::new(4096, 0, true));
        let flags = if consistent { ffi::PKT_CONSISTENT } else { 0 };
        let mut p = dev
            .init_pkt(
                Some(data.clone()),
                InitArgs {
                    flags,
                    ..InitArgs::default()
                },
            )
            .expect("packet");
        p.cdb_mut().copy_from_slice(&read10(40, 8));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s2, d2) = (seen.clone(), data.clone());
        p.set_callback(Some(Arc::new(move |_| {
            *s2.lock().unwrap() = d2.bytes().to_vec()
        })));
        assert_eq!(p.transport(), ffi::TRAN_ACCEPT);
        assert!(p.wait(WAIT));
        assert_eq!(p.result().status(), ffi::STATUS_GOOD);
        let at_completion = seen.lock().unwrap().clone();
        p.destroy();
        let expected = img.expected(40, 8);
        if consistent {
            same(
                &at_completion,
                &expected,
                "PKT_CONSISTENT: synced before pkt_comp",
            );
        } else {
            assert!(
                at_completion != expected,
                "not synced for the CPU until the unbind"
            );
        }
        same(data.bytes(), &expected, "after scsi_destroy_pkt");
    }
    rig.finish_clean();
}

#[test]
fn flag_nointr_polls_to_completion_without_pkt_comp() {
    let rig = raw_rig(|_| {});
    let dev = lun0(&rig);
    let data = Arc::new(DataBuf::new(8192, 0, true));
    let mut p = dev
        .init_pkt(Some(data.clone()), InitArgs::default())
        .expect("packet");
    p.cdb_mut().copy_from_slice(&read10(64, 16));
    p.set_time(10);
    assert_eq!(p.start_polled(), ffi::TRAN_ACCEPT);
    assert!(!p.in_flight());
    assert_eq!(p.comp_calls(), 0, "no scsi_hba_pkt_comp for FLAG_NOINTR");
    assert!(!p.flags().contains(PktFlags::PKT_COMP_CALLED));
    let r = p.result();
    assert_eq!((r.reason, r.status(), r.resid), (ffi::CMD_CMPLT, 0, 0));
    p.destroy();
    same(data.bytes(), &rig.images[0].expected(64, 16), "polled read");
    rig.finish_clean();
}

fn throttle(rig: &Rig, iops: u64) {
    rig.bed()
        .machine
        .with_qemu(|q| {
            q.qmp(
                "block_set_io_throttle",
                json!({"id": "hd0", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": iops, "iops_rd": 0, "iops_wr": 0}),
            )
        })
        .expect("QEMU")
        .expect("block_set_io_throttle");
}

#[test]
fn tran_busy_only_when_the_ring_is_full_then_success_after_completions() {
    // One request per second: commands pile up in the device.
    let rig = raw_rig(|c| c.drive_opts = vec!["throttling.iops-total=1".into()]);
    let dev = lun0(&rig);
    let mut accepted = Vec::new();
    let mut busy = None;
    for i in 0..300u32 {
        let mut p = dev
            .init_pkt(
                Some(Arc::new(DataBuf::new(512, 0, true))),
                InitArgs::default(),
            )
            .expect("packet");
        p.cdb_mut().copy_from_slice(&read10(i, 1));
        match p.start_async() {
            ffi::TRAN_ACCEPT => accepted.push(p),
            ffi::TRAN_BUSY => {
                busy = Some((i, p));
                break;
            }
            rc => panic!("tran_start returned {rc}"),
        }
    }
    let (at, p) = busy.expect("TRAN_BUSY once the ring is full");
    // Indirect descriptors: one ring slot per command; 256 slots.
    assert!((250..=258).contains(&at), "busy after {at} commands");
    // kstat(8) shows it: one TRAN_BUSY, for a full ring.
    assert_eq!(rig.hba_stat("tran_busy"), 1);
    assert_eq!(rig.queue_stat(0, "ring_full"), 1);
    assert_eq!(rig.hba_stat("tran_badpkt"), 0);
    // A started-but-unfinished packet cannot be started again (the last
    // one accepted waits behind the throttle for minutes).
    let last = accepted.last().expect("accepted packets");
    assert!(last.in_flight());
    assert_eq!(
        last.start_async(),
        ffi::TRAN_BADPKT,
        "a packet started twice"
    );
    assert!(last.in_flight(), "and it is still in flight");
    assert_eq!(rig.hba_stat("tran_badpkt"), 1, "counted");
    throttle(&rig, 0);
    for a in &accepted {
        assert!(a.wait(WAIT), "every accepted command completes");
    }
    assert_eq!(
        p.start_async(),
        ffi::TRAN_ACCEPT,
        "room again after completions"
    );
    assert!(p.wait(WAIT));
    for a in accepted {
        assert_eq!(a.comp_calls(), 1);
        assert_eq!(a.result().reason, ffi::CMD_CMPLT);
        a.destroy();
    }
    p.destroy();
    rig.finish_clean();
}

#[test]
fn bad_packets_get_tran_badpkt_and_leave_nothing_broken() {
    let rig = raw_rig(|_| {});
    let dev = lun0(&rig);
    // More cookies than sgllen (as a broken framework or driver would
    // hand in): refused.
    let data = Arc::new(DataBuf::new(8192, 0, true));
    let mut p = dev
        .init_pkt(Some(data.clone()), InitArgs::default())
        .expect("packet");
    p.cdb_mut().copy_from_slice(&read10(0, 16));
    // SAFETY: the test owns the packet; it lies about the cookie count
    // only for the call and restores it before teardown.
    let saved = unsafe { (*p.pkt()).pkt_numcookies };
    // SAFETY: as above.
    unsafe { (*p.pkt()).pkt_numcookies = 255 };
    assert_eq!(
        p.start_async(),
        ffi::TRAN_BADPKT,
        "255 cookies > sgllen 254"
    );
    // SAFETY: as above.
    unsafe { (*p.pkt()).pkt_numcookies = saved };
    // Both data directions at once: refused.
    // SAFETY: as above, for pkt_dma_flags.
    let saved = unsafe { (*p.pkt()).pkt_dma_flags };
    // SAFETY: as above.
    unsafe { (*p.pkt()).pkt_dma_flags = saved | ffi::DDI_DMA_RDWR };
    assert_eq!(p.start_async(), ffi::TRAN_BADPKT, "read and write at once");
    // SAFETY: as above.
    unsafe { (*p.pkt()).pkt_dma_flags = saved };
    // The same packet, fixed, works.
    assert_eq!(p.transport(), ffi::TRAN_ACCEPT);
    assert!(p.wait(WAIT));
    assert_eq!(p.result().reason, ffi::CMD_CMPLT);
    p.destroy();
    // Capabilities: unknown names and bad values.
    assert_eq!(dev.getcap("no-such-capability", 1), -1);
    assert_eq!(dev.setcap("no-such-capability", 1, 1), -1);
    assert_eq!(
        dev.setcap("tagged-qing", 7, 1),
        0,
        "a boolean capability set to 7"
    );
    assert_eq!(dev.setcap("dma-max", 4096, 1), 0, "a read-only capability");
    assert_eq!(dev.getcap("tagged-qing", 1), 1, "tagged queueing stays on");
    assert_eq!(dev.getcap("max-cdb-length", 1), 32);
    // And a normal write still works.
    let w = Arc::new(DataBuf::new(512, 0, false));
    w.bytes_mut().fill(0x5a);
    let r = run(&dev, &write10(3, 1), Some(w), 32);
    assert_eq!(
        (r.reason, r.status(), r.statistics),
        (ffi::CMD_CMPLT, 0, PktStatistics::empty())
    );
    assert_eq!(rig.images[0].read(3 * 512, 512), vec![0x5a; 512]);
    rig.finish_clean();
}
