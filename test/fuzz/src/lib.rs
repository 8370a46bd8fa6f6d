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

/// Runs every harness on `data` (what the generated-input test does).
pub fn all(data: &[u8]) {
    ring(data);
    response(data);
    control(data);
    config(data);
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
    }
}
