//! src/pvscsi's wire formats against QEMU's pvscsi model: the test plays
//! the driver through the bed's own device access (qtest MMIO and guest
//! memory, as shared/reference/qtest-probes/pvscsi.py does), but every
//! command payload, descriptor and ring index comes from rvscsi::pvscsi's
//! encoders and every answer goes through its decoders. If an offset in
//! those were wrong, QEMU would not answer as asserted here.

use rvscsi::pvscsi::msg::{self, Message};
use rvscsi::pvscsi::probe::{self, TargetSource, ThresholdMode};
use rvscsi::pvscsi::regs::{
    self, BAR_SIZE, Command, CommandNumber, CommandStatus, Reg32, Regs, doorbell_for,
};
use rvscsi::pvscsi::ring::{Geometry, MsgWindow, Reap, Reaped, Rings};
use rvscsi::pvscsi::status::{self, CmdFacts, btstat};
use rvscsi::pvscsi::wire::{self, Request, Segment, SenseBuffer, SgArea, rs};
use rvscsi::scsa::addr::LunNumber;
use rvscsi::scsa::flags::{DataDir, PktStatistics};
use rvscsi::shmem::SharedMem;
use rvscsi_emu::machine::PAGE;
use rvscsi_emu::{Disk, Machine, MachineConfig};
use rvscsi_qtest::Bus;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// BAR 0 through qtest MMIO.
struct QtestRegs {
    bus: Arc<dyn Bus>,
    base: u64,
}

impl Reg32 for QtestRegs {
    fn read32(&self, off: usize) -> u32 {
        self.bus.readl(self.base + off as u64).expect("MMIO read")
    }
    fn write32(&self, off: usize, v: u32) {
        self.bus
            .writel(self.base + off as u64, v)
            .expect("MMIO write")
    }
}

/// Guest pages as SharedMem (qtest accesses are coherent: syncs are no-ops).
#[derive(Clone)]
struct GuestMem {
    bus: Arc<dyn Bus>,
    gpa: u64,
    len: usize,
}

impl GuestMem {
    fn alloc(m: &Machine, pages: usize) -> GuestMem {
        let gpa = m.alloc_contig(pages, 1).expect("guest pages");
        m.qt.memset(gpa, pages as u64 * PAGE, 0).expect("memset");
        GuestMem {
            bus: m.qt.clone(),
            gpa,
            len: pages * PAGE as usize,
        }
    }
    fn bytes(&self, off: usize, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.read_bytes(off, &mut b);
        b
    }
}

impl SharedMem for GuestMem {
    fn len(&self) -> usize {
        self.len
    }
    fn device_addr(&self) -> u64 {
        self.gpa
    }
    fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        assert!(off + dst.len() <= self.len, "read outside the buffer");
        self.bus
            .read_mem(self.gpa + off as u64, dst)
            .expect("guest read")
    }
    fn write_bytes(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len, "write outside the buffer");
        self.bus
            .write_mem(self.gpa + off as u64, src)
            .expect("guest write")
    }
    fn sync_for_device(&self, _: usize, _: usize) {}
    fn sync_for_cpu(&self, _: usize, _: usize) {}
}

struct Hba {
    regs: Regs<QtestRegs>,
    rings: Rings<GuestMem, &'static str>,
    sg: GuestMem,
    sense: GuestMem,
}

struct Done {
    reaped: Reaped<&'static str>,
    mapped: status::Mapped,
    sense: Vec<u8>,
}

impl Hba {
    /// Submits one command, rings the doorbell its CDB calls for, and
    /// waits for its completion.
    fn run(
        &mut self,
        tag: &'static str,
        target: u8,
        cdb: &[u8],
        dir: DataDir,
        segments: &[Segment],
    ) -> Done {
        self.sense.write_bytes(0, &[0xEE; 96]);
        let sense = SenseBuffer {
            addr: self.sense.device_addr(),
            len: status::sense_len_to_offer(32),
        };
        let sg = SgArea {
            mem: &self.sg,
            off: 0,
        };
        let ctx = self
            .rings
            .submit(tag, |context| {
                wire::encode_request(
                    &Request {
                        context,
                        cdb,
                        target,
                        lun: LunNumber::ZERO,
                        tag: wire::TAG_SIMPLE,
                        dir,
                        segments,
                        sense,
                        vcpu_hint: 0,
                    },
                    &sg,
                )
            })
            .expect("submit");
        assert_eq!(self.rings.publish(), 1);
        self.regs.kick(doorbell_for(cdb));
        let deadline = Instant::now() + Duration::from_secs(10);
        let reaped = loop {
            match self.rings.reap() {
                Reap::Empty => {
                    assert!(Instant::now() < deadline, "{tag}: no completion");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Reap::Done(d) => break d,
                other => panic!("{tag}: {other:?}"),
            }
        };
        assert_eq!(
            reaped.context, ctx,
            "{tag}: the completion names our context"
        );
        assert_eq!(reaped.token, tag);
        let facts = CmdFacts {
            xfer: segments.iter().map(|s| s.len as usize).sum(),
            dir,
            opcode: cdb[0],
            sense_offered: sense.len,
            timed_out: false,
            recovery: PktStatistics::empty(),
        };
        let mapped = status::map_completion(&reaped.completion, &facts);
        let sense = self.sense.bytes(0, mapped.sense_len);
        Done {
            reaped,
            mapped,
            sense,
        }
    }
}

fn seg(m: &GuestMem, off: usize, len: u32) -> Segment {
    Segment {
        addr: m.device_addr() + off as u64,
        len,
    }
}

#[test]
fn pvscsi_wire_formats_match_qemu() {
    let dir = std::env::temp_dir().join(format!("rvscsi-pvscsi-wire-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disks: Vec<Disk> = [0u8, 64]
        .iter()
        .map(|&t| {
            let img = dir.join(format!("t{t}.img"));
            std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
            Disk {
                file: img.display().to_string(),
                target: t,
                lun: 0,
            }
        })
        .collect();
    let m = Machine::launch(MachineConfig::pvscsi(disks)).expect("launch QEMU with pvscsi");
    assert_eq!(m.ids, (0x15ad, 0x07c0));
    let bar = m.bar(0).expect("BAR 0");
    assert!(!bar.io && bar.size == BAR_SIZE, "{bar:?}");
    let regs = Regs::new(QtestRegs {
        bus: m.qt.clone(),
        base: bar.addr,
    });

    // Attach order of notes §5.1: reset, mask.
    assert_eq!(
        regs.issue(&Command::AdapterReset),
        Ok(CommandStatus::Done(0))
    );
    regs.set_intr_mask(0);
    assert_eq!(regs.intr_mask(), 0);

    // Probing: GET_MAX_TARGETS and CONFIG fail on QEMU; the fallback must
    // still reach scsi-id 64.
    let gmt = probe::from_get_max_targets(regs.issue(&Command::GetMaxTargets).unwrap());
    let cfg_page = GuestMem::alloc(&m, 1);
    let mut page = [0u8; wire::CONFIG_PAGE_CONTROLLER_SIZE];
    probe::premark_config_page(&mut page);
    cfg_page.write_bytes(0, &page);
    let st = regs
        .issue(&Command::Config {
            cmp_addr: cfg_page.device_addr(),
            page_addr: regs::CONFIG_CONTROLLER_ADDRESS,
            page_num: regs::CONFIG_PAGE_CONTROLLER,
        })
        .unwrap();
    assert_eq!(st, CommandStatus::Failed, "QEMU 10: CONFIG is -1");
    cfg_page.read_bytes(0, &mut page);
    let max = probe::max_targets(gmt, probe::from_config_page(st, &page));
    assert_eq!(max.source, TargetSource::Fallback);
    assert!(max.count > 64);

    // The threshold command is unknown to QEMU: -1 right after the number.
    let th = regs.probe(CommandNumber::SetupReqCallThreshold);
    assert_eq!(probe::threshold_mode(th, None), ThresholdMode::Unsupported);

    // Rings: 65 targets -> 32 + 32 pages, one message page.
    let g = Geometry::choose(max.count, 0, true);
    assert_eq!((g.req_pages.get(), g.cmp_pages.get()), (32, 32));
    let state = GuestMem::alloc(&m, 1);
    // Pre-mark the device-written log2 fields: SETUP_RINGS must overwrite
    // exactly these offsets.
    for off in [rs::REQ_LOG2, rs::CMP_LOG2, rs::MSG_LOG2] {
        state.write_u32(off, 0xdead);
    }
    let rings = Rings::new(
        g,
        state.clone(),
        GuestMem::alloc(&m, 32),
        GuestMem::alloc(&m, 32),
        Some(GuestMem::alloc(&m, 1)),
    )
    .expect("rings");
    let (rs_ppn, req, cmp) = rings.setup_rings_ppns();
    let setup = Rings::<GuestMem, ()>::setup_rings_command(rs_ppn, &req, &cmp);
    assert_eq!(regs.issue(&setup), Ok(CommandStatus::Done(0)));
    assert_eq!(state.read_u32(rs::REQ_LOG2), 10, "1024 requests");
    assert_eq!(state.read_u32(rs::CMP_LOG2), 12, "4096 completions");
    rings
        .check_device_geometry()
        .expect_err("message ring not set up yet");

    // Message ring: supported (waiting for data), then 34 after 136 bytes.
    let msg_ppns = rings.setup_msg_ring_ppns().unwrap();
    let first = regs.probe(CommandNumber::SetupMsgRing);
    assert!(probe::msg_ring_supported(first), "{first:?}");
    let st = regs
        .send_payload(&Command::SetupMsgRing {
            ppns: msg_ppns.as_slice(),
        })
        .unwrap();
    assert_eq!(st, CommandStatus::Done(34));
    assert!(probe::msg_ring_set_up(st));
    assert_eq!(rings.check_device_geometry(), Ok(()));
    assert_eq!(state.read_u32(rs::MSG_LOG2), 5);

    let mut hba = Hba {
        regs,
        rings,
        sg: GuestMem::alloc(&m, 1),
        sense: GuestMem::alloc(&m, 1),
    };
    let data = GuestMem::alloc(&m, 4);

    // INQUIRY to target 0, single buffer.
    let inq = hba.run(
        "inquiry",
        0,
        &[0x12, 0, 0, 0, 36, 0],
        DataDir::In,
        &[seg(&data, 0, 36)],
    );
    let c = inq.reaped.completion;
    assert_eq!((c.host_status, c.scsi_status), (btstat::SUCCESS, 0));
    assert_eq!(c.data_len, 0, "QEMU never writes dataLen");
    assert_eq!(inq.mapped.outcome.reason, rvscsi::ffi::CMD_CMPLT);
    assert_eq!(inq.mapped.outcome.resid, 0);
    let d = data.bytes(0, 36);
    assert_eq!(d[0] & 0x1f, 0, "a disk");
    assert_eq!(d[7] & 0x02, 0x02, "CmdQue: QEMU's pvscsi is tcq");
    assert_eq!(&d[8..16], b"QEMU    ");
    assert_eq!(
        hba.regs.intr_status() & regs::INTR_CMPL_0,
        regs::INTR_CMPL_0
    );
    hba.regs.ack_intr(regs::INTR_ALL_SUPPORTED);
    assert_eq!(hba.regs.intr_status(), 0, "write-1-to-clear");

    // TEST UNIT READY to target 64 (the target byte at offset 67): the
    // power-on unit attention, with sense at senseAddr/senseLen.
    let tur = hba.run("tur64", 64, &[0; 6], DataDir::None, &[]);
    assert_eq!(
        tur.reaped.completion.host_status,
        btstat::SUCCESS,
        "target 64 exists"
    );
    assert!(tur.mapped.outcome.is_check_condition(), "{:?}", tur.mapped);
    assert!(
        (18..=96).contains(&tur.mapped.sense_len),
        "{}",
        tur.mapped.sense_len
    );
    assert_eq!(
        (tur.sense[0] & 0x7f, tur.sense[2] & 0xf, tur.sense[12]),
        (0x70, 6, 0x29)
    );
    let tur = hba.run("tur64-again", 64, &[0; 6], DataDir::None, &[]);
    assert_eq!(tur.mapped.outcome.status, 0);
    assert_eq!(tur.mapped.sense_len, 0);

    // An absent target: SELTIMEO -> CMD_DEV_GONE.
    let gone = hba.run(
        "absent",
        5,
        &[0x12, 0, 0, 0, 36, 0],
        DataDir::In,
        &[seg(&data, 0, 36)],
    );
    assert_eq!(gone.reaped.completion.host_status, btstat::SELTIMEO);
    assert_eq!(gone.mapped.outcome.reason, rvscsi::ffi::CMD_DEV_GONE);

    // REPORT LUNS with 256 bytes: QEMU says DATARUN; that is residue.
    let rl = hba.run(
        "report-luns",
        0,
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        DataDir::In,
        &[seg(&data, 0, 256)],
    );
    assert_eq!(rl.reaped.completion.host_status, btstat::DATARUN);
    assert_eq!(rl.mapped.outcome.reason, rvscsi::ffi::CMD_CMPLT);
    let list = data.bytes(0, 16);
    assert_eq!(&list[0..4], &8u32.to_be_bytes(), "one LUN");
    assert_eq!(&list[8..16], &[0; 8], "LUN 0");

    // WRITE(10) of 2 blocks from a 2-element SG list (two non-adjacent
    // pages), then READ(10) into one buffer: the SG element layout and the
    // WITH_SG_LIST flag are right if the pattern comes back.
    let a: Vec<u8> = (0..512).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..512).map(|i| (i % 13) as u8 ^ 0x5a).collect();
    data.write_bytes(PAGE as usize, &a);
    data.write_bytes(3 * PAGE as usize, &b);
    let wr = hba.run(
        "write-sg",
        64,
        &[0x2A, 0, 0, 0, 0, 8, 0, 0, 2, 0],
        DataDir::Out,
        &[
            seg(&data, PAGE as usize, 512),
            seg(&data, 3 * PAGE as usize, 512),
        ],
    );
    assert_eq!(
        hba.sg.bytes(0, 8),
        data.device_addr().wrapping_add(PAGE).to_le_bytes(),
        "SG[0].addr"
    );
    assert_eq!(wr.reaped.completion.host_status, btstat::SUCCESS);
    assert_eq!(wr.mapped.outcome.reason, rvscsi::ffi::CMD_CMPLT);
    data.write_bytes(2 * PAGE as usize, &[0u8; 1024]);
    let rd = hba.run(
        "read",
        64,
        &[0x28, 0, 0, 0, 0, 8, 0, 0, 2, 0],
        DataDir::In,
        &[seg(&data, 2 * PAGE as usize, 1024)],
    );
    assert_eq!(rd.mapped.outcome.reason, rvscsi::ffi::CMD_CMPLT);
    let back = data.bytes(2 * PAGE as usize, 1024);
    assert_eq!(&back[..512], &a[..], "first SG element");
    assert_eq!(&back[512..], &b[..], "second SG element");

    // A READ into a buffer larger than the transfer: DATARUN, and for
    // READ/WRITE that is an error.
    let over = hba.run(
        "read-short",
        64,
        &[0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0],
        DataDir::In,
        &[seg(&data, 0, 4096)],
    );
    assert_eq!(over.reaped.completion.host_status, btstat::DATARUN);
    assert_eq!(over.mapped.outcome.reason, rvscsi::ffi::CMD_DATA_OVR);

    // Hot-unplug target 64: DEV_REMOVED in the message ring (MSG_0), then
    // its commands end SELTIMEO.
    hba.regs.ack_intr(regs::INTR_ALL_SUPPORTED);
    let qmp = |cmd: &str, args: rvscsi_qtest::Value| {
        m.with_qemu(|q| q.qmp(cmd, args))
            .expect("QEMU")
            .unwrap_or_else(|e| panic!("{cmd}: {e}"))
    };
    qmp("device_del", rvscsi_qtest::json!({"id": "hd1"}));
    m.with_qemu(|q| q.wait_qmp_event("DEVICE_DELETED", Duration::from_secs(10)))
        .expect("QEMU")
        .expect("DEVICE_DELETED");
    assert_eq!(hba.regs.intr_status() & regs::INTR_MSG_0, regs::INTR_MSG_0);
    let w = hba.rings.msg_window().expect("a message ring");
    assert_eq!(
        w,
        MsgWindow::Available {
            n: 1,
            maybe_lost: false
        }
    );
    assert!(!msg::rescan_needed(w));
    let removed = Message::decode(&hba.rings.next_message().expect("a message"));
    assert_eq!(
        removed,
        Message::Removed {
            target: 64,
            lun: LunNumber::ZERO
        }
    );
    assert_eq!(msg::action(removed), msg::Action::RemoveTarget(64));
    assert_eq!(state.read_u32(rs::MSG_CONS), 1, "consumed");
    let tur = hba.run("tur-removed", 64, &[0; 6], DataDir::None, &[]);
    assert_eq!(tur.mapped.outcome.reason, rvscsi::ffi::CMD_DEV_GONE);

    // Hot-plug a disk at target 17 (beyond the 16 Linux and FreeBSD scan):
    // DEV_ADDED.
    let img = dir.join("t17.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    qmp(
        "blockdev-add",
        rvscsi_qtest::json!({"driver": "raw", "node-name": "n17",
            "file": {"driver": "file", "filename": img.display().to_string()}}),
    );
    qmp(
        "device_add",
        rvscsi_qtest::json!({"driver": "scsi-hd", "id": "hd17", "bus": "hba0.0",
            "drive": "n17", "scsi-id": 17, "lun": 0}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let added = loop {
        if let Some(raw) = hba.rings.next_message() {
            break Message::decode(&raw);
        }
        assert!(Instant::now() < deadline, "no DEV_ADDED");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(msg::action(added), msg::Action::AddTarget(17));
    let inq = hba.run(
        "inquiry17",
        17,
        &[0x12, 0, 0, 0, 36, 0],
        DataDir::In,
        &[seg(&data, 0, 36)],
    );
    assert_eq!(inq.reaped.completion.host_status, btstat::SUCCESS);

    assert_eq!(hba.rings.outstanding(), 0);
    assert_eq!(
        hba.regs.issue(&Command::AdapterReset),
        Ok(CommandStatus::Done(0))
    );
    assert!(m.violations().is_empty(), "{:?}", m.violations());
    m.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
