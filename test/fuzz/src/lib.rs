//! Hostile-device fuzz harnesses: the input plays the device. Each
//! harness drives the driver's own code (the split virtqueue, the
//! virtio-scsi response, task management and event decoding, the limits
//! derived from the device configuration, auto request sense) with what a
//! device could write, and checks the invariants after every input:
//!
//! - nothing panics and nothing is read or written out of bounds (the
//!   host memory behind the ring asserts every access in range);
//! - every command (ring token) is completed at most once while
//!   outstanding, and exactly once counting what a reset takes back;
//! - sense is never copied beyond the status area, residuals never exceed
//!   the transfer;
//! - limits stay within what the driver can represent.
//!
//! pvscsi's harnesses do the same for its completion and message rings
//! and its completion mapping.
//!
//! libFuzzer runs them through `cargo fuzz` (`test/fuzz/fuzz/`); the tests
//! of this crate run them on a fixed set of generated inputs.

use rvscsi::scsa::flags::DataDir;
use rvscsi::scsa::{PktStatistics, arq};
use rvscsi::shmem::SharedMem;
use rvscsi::shmem::host::HostMem;
use rvscsi::vioscsi::config::{
    DeviceConfig, Limits, MAX_CDB_SIZE, MAX_SENSE, MIN_CDB_SIZE, MIN_SENSE,
};
use rvscsi::vioscsi::proto::{self, CmdFacts, Response};
use rvscsi::virtio::ring::{Layout, Segment, SplitQueue};
use std::collections::HashSet;

/// Reads the input a byte (or a word) at a time; zeros when it runs out.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// Over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input(data)
    }
    /// Whether bytes are left.
    pub fn more(&self) -> bool {
        !self.0.is_empty()
    }
    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// The next `N` bytes.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        for x in &mut b {
            *x = self.u8();
        }
        b
    }
}

const BASE: u64 = 0x10_0000;

/// The split virtqueue against a device that writes whatever the input
/// says into the used ring (and, sometimes, anywhere in the ring memory),
/// while the driver adds chains, publishes, pops, re-arms interrupts and
/// finally takes everything back as a device reset would.
pub fn ring(data: &[u8]) {
    let mut inp = Input::new(data);
    let size = 1u16 << (inp.u8() % 9);
    let event_idx = inp.u8() & 1 == 1;
    let Some(layout) = Layout::new(size) else {
        return;
    };
    let Some(mut q) =
        SplitQueue::<HostMem, u32>::new(HostMem::new(layout.total, BASE), size, event_idx)
    else {
        return;
    };
    let mut outstanding: HashSet<u32> = HashSet::new();
    let mut done: HashSet<u32> = HashSet::new();
    let mut next_token = 0u32;
    let mut device_used: u16 = 0;
    let mut steps = 0;
    while inp.more() && steps < 4096 {
        steps += 1;
        match inp.u8() % 9 {
            0 => {
                let n = usize::from(inp.u8() % 4) + 1;
                let segs: Vec<Segment> = (0..n)
                    .map(|i| Segment {
                        addr: u64::from(inp.u32()),
                        len: u32::from(inp.u16()) + 1,
                        device_writes: i + 1 == n,
                    })
                    .collect();
                let t = next_token;
                next_token += 1;
                if q.add_chain(segs, t).is_ok() {
                    outstanding.insert(t);
                }
            }
            1 => {
                let t = next_token;
                next_token += 1;
                if q.add_indirect(
                    u64::from(inp.u32()),
                    inp.u16() % 300,
                    u64::from(inp.u32()),
                    t,
                )
                .is_ok()
                {
                    outstanding.insert(t);
                }
            }
            2 => {
                let _ = q.publish();
            }
            3 => {
                // The device completes: an id an honest device would name
                // (from the available ring) or anything at all.
                let honest = inp.u8() & 1 == 0;
                let id = if honest {
                    let slot = usize::from(inp.u16() % size);
                    let mut b = [0u8; 2];
                    q.mem().read_bytes(layout.avail + 4 + 2 * slot, &mut b);
                    u32::from(u16::from_le_bytes(b))
                } else {
                    inp.u32()
                };
                let len = inp.u32();
                let pos = usize::from(device_used % size);
                q.mem().write_u32(layout.used + 4 + 8 * pos, id);
                q.mem().write_u32(layout.used + 8 + 8 * pos, len);
                device_used = device_used.wrapping_add(if inp.u8().is_multiple_of(16) {
                    inp.u16()
                } else {
                    1
                });
                q.mem().write_u16(layout.used + 2, device_used);
            }
            4 => {
                for _ in 0..size {
                    match q.pop_used() {
                        None => break,
                        Some(Ok(u)) => {
                            assert!(
                                outstanding.remove(&u.token),
                                "token {} completed while not outstanding",
                                u.token
                            );
                            assert!(done.insert(u.token), "token {} completed twice", u.token);
                        }
                        Some(Err(_)) => {}
                    }
                }
            }
            5 => {
                let _ = q.enable_interrupts();
            }
            6 => q.disable_interrupts(),
            7 => {
                // A hypervisor scribbling on ring memory.
                let off = usize::from(inp.u16()) % layout.total;
                let v = inp.u8();
                q.mem().write_bytes(off, &[v]);
            }
            _ => {
                let mut seen = 0;
                q.for_each_outstanding(|_, t| {
                    assert!(
                        outstanding.contains(t),
                        "an outstanding token the test did not add"
                    );
                    seen += 1;
                });
                assert_eq!(seen, outstanding.len());
            }
        }
    }
    // A device reset: everything still out comes back exactly once.
    let mut back = HashSet::new();
    q.reclaim_all(|t| {
        assert!(back.insert(t), "token {t} taken back twice");
    });
    assert_eq!(
        back, outstanding,
        "the reset takes back exactly what was out"
    );
    assert!(
        back.is_disjoint(&done),
        "a token both completed and taken back"
    );
    assert_eq!(q.outstanding(), 0);
}

/// A virtio-scsi command response as a device could write it, decoded and
/// turned into the packet's outcome and status area as `finish` does.
pub fn response(data: &[u8]) {
    let mut inp = Input::new(data);
    let hdr: [u8; proto::RESP_HEADER_LEN] = inp.bytes();
    let r = Response::parse(&hdr);
    let xfer = usize::from(inp.u16()) * 8;
    let dir = match inp.u8() % 3 {
        0 => DataDir::None,
        1 => DataDir::In,
        _ => DataDir::Out,
    };
    let facts = CmdFacts {
        xfer,
        dir,
        timed_out: inp.u8() & 1 == 1,
        recovery: PktStatistics::from_bits_truncate(u32::from(inp.u16())),
    };
    let o = proto::outcome(&r, &facts);
    assert!(
        o.resid <= xfer,
        "resid {} beyond the {xfer}-byte transfer",
        o.resid
    );
    // The response buffer holds sense_size bytes of sense; the device says
    // it wrote sense_len of them.
    let sense_size = (inp.u16() % 300) as u32;
    let sense_buf: Vec<u8> = (0..sense_size).map(|_| inp.u8()).collect();
    let n = proto::sense_to_copy(&r, sense_size);
    assert!(n <= sense_buf.len());
    // The status area: any size, with guard bytes after it.
    let scblen = usize::from(inp.u16() % 400);
    let mut area = vec![0x5a_u8; scblen + 16];
    let _state = arq::fill(&mut area[..scblen], o.status, &sense_buf[..n]);
    assert!(
        area[scblen..].iter().all(|&b| b == 0x5a),
        "wrote beyond a {scblen}-byte status area"
    );
}

/// A task management response byte and an event, as a device could write
/// them.
pub fn control(data: &[u8]) {
    let mut inp = Input::new(data);
    let _ = proto::tmf_succeeded(inp.u8());
    let ev: [u8; proto::EVENT_LEN] = inp.bytes();
    let _ = proto::parse_event(&ev);
    let lun: [u8; 8] = inp.bytes();
    if let Some((t, l)) = proto::decode_lun(&lun) {
        assert_eq!(proto::decode_lun(&proto::lun_bytes(t, l)), Some((t, l)));
    }
}

/// Device configuration values and a queue size, as a device could offer
/// them, turned into the driver's limits.
pub fn config(data: &[u8]) {
    let mut inp = Input::new(data);
    let cfg = DeviceConfig {
        num_queues: inp.u32(),
        seg_max: inp.u32(),
        max_sectors: inp.u32(),
        cmd_per_lun: inp.u32(),
        event_info_size: inp.u32(),
        sense_size: inp.u32(),
        cdb_size: inp.u32(),
        max_channel: inp.u16(),
        max_target: inp.u16(),
        max_lun: inp.u32(),
    };
    let queue_size = inp.u16();
    if let Ok(l) = Limits::new(&cfg, queue_size) {
        assert!(l.request_queues >= 1);
        assert!(l.segments >= 1 && l.segments <= u32::from(queue_size) - 2);
        assert!((MIN_SENSE..=MAX_SENSE).contains(&l.sense_size));
        assert!(
            (MIN_CDB_SIZE..=MAX_CDB_SIZE).contains(&l.cdb_size),
            "cdb_size {}",
            l.cdb_size
        );
        assert!(l.max_xfer >= 512);
        assert!(l.event_size as usize >= proto::EVENT_LEN);
    }
}

/// Host memory one side (the "driver's" rings) and the other (the input
/// playing the device) both reach.
type Shared = std::rc::Rc<HostMem>;

fn shared(len: usize, base: u64) -> Shared {
    std::rc::Rc::new(HostMem::new(len, base))
}

/// Commands [`pvscsi_rings`] saw complete (so that a test can tell the
/// harness reaches completions at all).
pub static COMPLETED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// pvscsi's rings against a device that writes whatever the input says
/// into the completion ring, the message ring and the device's indices
/// of the rings-state page (cmpProdIdx, msgProdIdx, reqConsIdx), while
/// the driver submits, publishes, reaps (bounded by the ring, as a pass
/// is), consumes messages, and finally takes everything back as an
/// adapter reset does. A command completes at most once, only while it
/// is outstanding, and exactly once counting what the reset takes back.
pub fn pvscsi_rings(data: &[u8]) {
    use rvscsi::pvscsi::ring::{Geometry, MsgRingPages, Reap, RingPages, Rings};
    use rvscsi::pvscsi::wire::{CMP_DESC_SIZE, Completion, MSG_DESC_SIZE, PAGE_SIZE, rs};
    let mut inp = Input::new(data);
    let pages = 1u32 << (inp.u8() % 2);
    let geometry = Geometry {
        req_pages: RingPages::new(pages).expect("1 or 2 pages"),
        cmp_pages: RingPages::new(pages).expect("1 or 2 pages"),
        msg_pages: MsgRingPages::new(1),
    };
    let page = PAGE_SIZE as u64;
    let state = shared(PAGE_SIZE, page);
    let cmp = shared(pages as usize * PAGE_SIZE, 0x100 * page);
    let msg = shared(PAGE_SIZE, 0x200 * page);
    let Ok(mut r) = Rings::<Shared, u32>::new(
        geometry,
        state.clone(),
        shared(pages as usize * PAGE_SIZE, 0x10 * page),
        cmp.clone(),
        Some(msg.clone()),
    ) else {
        panic!("rings over page-aligned memory");
    };
    let mut outstanding: HashSet<u32> = HashSet::new();
    let mut published: HashSet<u32> = HashSet::new();
    let mut contexts: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    let mut done: HashSet<u32> = HashSet::new();
    let mut next_token = 0u32;
    let mut steps = 0;
    while inp.more() && steps < 4096 {
        steps += 1;
        match inp.u8() % 11 {
            0 | 9 => {
                let t = next_token;
                next_token += 1;
                if let Ok(ctx) = r.submit(t, |ctx| Ok::<_, ()>([ctx as u8; 128])) {
                    outstanding.insert(t);
                    contexts.insert(t, ctx.value());
                }
            }
            1 => {
                r.publish();
                published.extend(outstanding.iter().copied());
            }
            2 | 10 => {
                // The device completes something: mostly a context it
                // could have been given, sometimes any; at its producer
                // slot (advancing cmpProdIdx) or anywhere.
                let pick = inp.u8();
                let mut given: Vec<u64> = published
                    .intersection(&outstanding)
                    .filter_map(|t| contexts.get(t).copied())
                    .collect();
                given.sort_unstable();
                let context = match (pick % 4, given.len()) {
                    (0, _) => u64::from(inp.u32()),
                    (1, _) => u64::from(pick % (geometry.req_entries() as u8 + 2)),
                    (_, 0) => u64::from(pick),
                    (_, n) => given[usize::from(pick) % n],
                };
                let c = Completion {
                    context,
                    data_len: u64::from(inp.u16()),
                    sense_len: u32::from(inp.u16()),
                    host_status: u16::from(inp.u8()),
                    scsi_status: inp.u16() % 0x180,
                };
                let slots = cmp.len() / CMP_DESC_SIZE;
                let prod = state.read_u32(rs::CMP_PROD);
                let owed = published.intersection(&outstanding).count() as u32;
                let waiting = prod.wrapping_sub(r.completions_consumed());
                match inp.u8() % 8 {
                    7 => {
                        // Anywhere in the ring, the index untouched.
                        let slot = usize::from(inp.u16()) % slots;
                        cmp.write_bytes(slot * CMP_DESC_SIZE, &c.to_bytes());
                    }
                    // A sane device completes only what it was given; a
                    // hostile one (6) produces more.
                    k if k == 6 || waiting < owed => {
                        let slot = prod as usize % (geometry.cmp_entries() as usize);
                        cmp.write_bytes(slot * CMP_DESC_SIZE, &c.to_bytes());
                        state.write_u32(rs::CMP_PROD, prod.wrapping_add(1));
                    }
                    _ => {}
                }
            }
            3 if inp.u8().is_multiple_of(4) => {
                let off = [rs::CMP_PROD, rs::MSG_PROD, rs::REQ_CONS][usize::from(inp.u8() % 3)];
                let now = state.read_u32(off);
                let v = match inp.u8() % 3 {
                    0 => now.wrapping_add(1),
                    1 => now.wrapping_add(u32::from(inp.u8())),
                    _ => inp.u32(),
                };
                state.write_u32(off, v);
            }
            4 => {
                for _ in 0..=geometry.cmp_entries() {
                    match r.reap() {
                        Reap::Empty | Reap::Runaway { .. } => break,
                        Reap::Dropped(_) => {}
                        Reap::Done(d) => {
                            COMPLETED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            assert!(
                                outstanding.remove(&d.token),
                                "completed twice or never issued"
                            );
                            assert!(
                                published.contains(&d.token),
                                "completed before the device could see it"
                            );
                            assert!(done.insert(d.token));
                        }
                    }
                }
            }
            5 => {
                let m: [u8; MSG_DESC_SIZE] = inp.bytes();
                let slot = usize::from(inp.u8()) % (msg.len() / MSG_DESC_SIZE);
                msg.write_bytes(slot * MSG_DESC_SIZE, &m);
            }
            6 => {
                let _ = r.msg_window();
                for _ in 0..=geometry.msg_entries() {
                    let Some(raw) = r.next_message() else {
                        break;
                    };
                    let _ = rvscsi::pvscsi::msg::action(rvscsi::pvscsi::msg::Message::decode(&raw));
                }
                if inp.u8() & 1 == 1 {
                    r.skip_messages();
                }
            }
            7 => {
                // An adapter reset: everything outstanding taken back once;
                // SETUP_RINGS zeroes the device's indices.
                let mut taken = HashSet::new();
                r.reclaim_all(&mut |t| assert!(taken.insert(t), "taken back twice"));
                assert_eq!(
                    taken, outstanding,
                    "the reset takes back what is outstanding"
                );
                assert!(taken.is_disjoint(&done));
                done.extend(taken);
                outstanding.clear();
                published.clear();
                for off in [rs::CMP_PROD, rs::MSG_PROD, rs::REQ_CONS] {
                    state.write_u32(off, 0);
                }
            }
            _ => {
                let _ = r.device_pending_requests();
                let _ = r.completions_waiting();
                assert_eq!(r.outstanding(), outstanding.len());
            }
        }
    }
    let mut taken = HashSet::new();
    r.reclaim_all(&mut |t| assert!(taken.insert(t), "taken back twice"));
    assert_eq!(
        taken, outstanding,
        "the reset takes back exactly what is outstanding"
    );
    assert!(
        taken.is_disjoint(&done),
        "a command both completed and taken back"
    );
    assert_eq!(r.outstanding(), 0);
    assert_eq!(r.free_contexts(), geometry.req_entries() as usize);
}

/// A pvscsi completion as a device could write it, mapped to the SCSA
/// outcome as the family's decode does: the residual never exceeds the
/// transfer, valid sense never exceeds what was offered, and a status
/// wider than a byte is never a completed command.
pub fn pvscsi_completion(data: &[u8]) {
    use rvscsi::pvscsi::status::{self, MAX_SENSE_OFFER};
    use rvscsi::pvscsi::wire::{CMP_DESC_SIZE, Completion};
    let mut inp = Input::new(data);
    let c = Completion::parse(&inp.bytes::<CMP_DESC_SIZE>());
    let xfer = usize::from(inp.u16()) * 8;
    let dir = match (xfer, inp.u8() % 2) {
        (0, _) => DataDir::None,
        (_, 0) => DataDir::In,
        _ => DataDir::Out,
    };
    let facts = status::CmdFacts {
        xfer,
        dir,
        opcode: inp.u8(),
        sense_offered: MAX_SENSE_OFFER,
        timed_out: inp.u8() & 1 == 1,
        recovery: PktStatistics::from_bits_truncate(u32::from(inp.u16())),
    };
    let m = status::map_completion(&c, &facts);
    assert!(
        m.outcome.resid <= xfer,
        "resid {} beyond {xfer}",
        m.outcome.resid
    );
    assert!(
        m.sense_len <= MAX_SENSE_OFFER as usize,
        "sense {}",
        m.sense_len
    );
    if c.scsi_status > 0xFF {
        assert_ne!(m.outcome.reason, rvscsi::ffi::CMD_CMPLT, "{c:?}");
    }
}

/// Runs every harness on `data` (what the generated-input test does).
pub fn all(data: &[u8]) {
    ring(data);
    response(data);
    control(data);
    config(data);
    pvscsi_rings(data);
    pvscsi_completion(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of inputs: short and long, sparse and dense.
    fn inputs(n: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n).map(move |i| {
            let len = (i * 37) % 700;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if i % 3 == 0 { (x % 4) as u8 } else { x as u8 }
                })
                .collect()
        })
    }

    #[test]
    fn the_harnesses_hold_their_invariants_on_generated_inputs() {
        for data in inputs(3000) {
            all(&data);
        }
        all(&[]);
        all(&[0xff; 1024]);
        let completed = COMPLETED.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            completed > 200,
            "pvscsi_rings completed only {completed} commands"
        );
    }
}
