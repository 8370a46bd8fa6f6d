//! The disks of the in-process device: a direct-access logical unit on a
//! RAM buffer, answering the commands sd and the SCSA framework send
//! (SPC-4, SBC-3): INQUIRY (standard data and VPD pages 0x00/0x80/0x83),
//! REPORT LUNS, TEST UNIT READY, READ CAPACITY(10)/(16), READ and WRITE
//! (6/10/12/16), MODE SENSE(6)/(10), REQUEST SENSE, START STOP UNIT,
//! SYNCHRONIZE CACHE. Anything else is CHECK CONDITION, ILLEGAL REQUEST,
//! INVALID COMMAND OPERATION CODE, as a real disk answers.

/// Logical block size.
pub const BLOCK: usize = 512;

/// A RAM disk.
#[derive(Clone, Debug)]
pub struct RamDisk {
    data: Vec<u8>,
}

impl RamDisk {
    /// `blocks` zeroed blocks.
    pub fn zeroed(blocks: u64) -> RamDisk {
        RamDisk {
            data: vec![0; blocks as usize * BLOCK],
        }
    }

    /// The contents of an image file (its length rounded down to whole
    /// blocks).
    pub fn from_file(path: &str) -> Result<RamDisk, String> {
        let mut data =
            std::fs::read(path).map_err(|e| format!("cannot read disk image {path}: {e}"))?;
        data.truncate(data.len() / BLOCK * BLOCK);
        if data.is_empty() {
            return Err(format!("disk image {path} holds no whole block"));
        }
        Ok(RamDisk { data })
    }

    /// Size in blocks.
    pub fn blocks(&self) -> u64 {
        (self.data.len() / BLOCK) as u64
    }
}

/// SCSI status codes (SAM-5).
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;

/// What a command produced.
pub struct Outcome {
    /// SCSI status.
    pub status: u8,
    /// Sense data (fixed format) with CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Data for the initiator (already cut to the allocation length and
    /// the buffer).
    pub data_in: Vec<u8>,
    /// Data-out bytes the command did not consume.
    pub out_unused: usize,
}

fn good(data_in: Vec<u8>) -> Outcome {
    Outcome {
        status: GOOD,
        sense: Vec::new(),
        data_in,
        out_unused: 0,
    }
}

/// CHECK CONDITION with fixed-format sense (SPC-4 §4.5.3).
fn check(key: u8, asc: u8, ascq: u8) -> Outcome {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    Outcome {
        status: CHECK_CONDITION,
        sense: s,
        data_in: Vec::new(),
        out_unused: 0,
    }
}

const ILLEGAL_REQUEST: u8 = 0x05;

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |v, x| (v << 8) | u64::from(*x))
}

/// The LUN list entry (SAM-5 §4.7: peripheral addressing below 256, flat
/// space addressing above).
fn lun_entry(lun: u16) -> [u8; 8] {
    let mut e = [0u8; 8];
    if lun < 256 {
        e[1] = lun as u8;
    } else {
        e[0] = 0x40 | (lun >> 8) as u8;
        e[1] = lun as u8;
    }
    e
}

/// Runs `cdb` on `disk` (None: the target exists, this LUN does not).
/// `luns` lists the target's LUNs (for REPORT LUNS); `room` is the size of
/// the initiator's data-in buffer.
pub fn execute(
    disk: Option<&mut RamDisk>,
    luns: &[u16],
    cdb: &[u8],
    data_out: &[u8],
    room: usize,
) -> Outcome {
    let op = cdb.first().copied().unwrap_or(0);
    let cut = |mut v: Vec<u8>, alloc: usize| {
        v.truncate(alloc.min(room));
        good(v)
    };
    // Commands any LUN answers, present or not (SPC-4 §6.6.2, §6.33).
    match op {
        0x12 if disk.is_none() => {
            let alloc = be(&cdb[3..5]) as usize;
            // Peripheral qualifier 3: no logical unit here.
            let mut d = vec![0u8; 36];
            d[0] = 0x7f;
            d[4] = 31;
            return cut(d, alloc);
        }
        0xa0 => {
            let alloc = be(&cdb[6..10]) as usize;
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
            for &l in luns {
                d.extend_from_slice(&lun_entry(l));
            }
            return cut(d, alloc);
        }
        0x03 => {
            let alloc = usize::from(cdb[4]);
            let mut d = vec![0u8; 18];
            d[0] = 0x70;
            d[7] = 10;
            return cut(d, alloc);
        }
        _ => {}
    }
    let Some(disk) = disk else {
        // LOGICAL UNIT NOT SUPPORTED.
        return check(ILLEGAL_REQUEST, 0x25, 0);
    };
    let blocks = disk.blocks();
    match op {
        0x00 | 0x1b | 0x35 | 0x91 => good(Vec::new()),
        0x12 => inquiry(cdb, room),
        0x25 => {
            let mut d = vec![0u8; 8];
            let last = (blocks - 1).min(u64::from(u32::MAX)) as u32;
            d[0..4].copy_from_slice(&last.to_be_bytes());
            d[4..8].copy_from_slice(&(BLOCK as u32).to_be_bytes());
            cut(d, 8)
        }
        0x9e if cdb[1] & 0x1f == 0x10 => {
            let alloc = be(&cdb[10..14]) as usize;
            let mut d = vec![0u8; 32];
            d[0..8].copy_from_slice(&(blocks - 1).to_be_bytes());
            d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
            cut(d, alloc)
        }
        0x1a => {
            // Mode parameter header(6), no block descriptor, no pages.
            let alloc = usize::from(cdb[4]);
            cut(vec![3, 0, 0, 0], alloc)
        }
        0x5a => {
            let alloc = be(&cdb[7..9]) as usize;
            cut(vec![0, 6, 0, 0, 0, 0, 0, 0], alloc)
        }
        0x08 | 0x0a | 0x28 | 0x2a | 0xa8 | 0xaa | 0x88 | 0x8a => {
            let (lba, count) = match op {
                0x08 | 0x0a => {
                    let n = u64::from(cdb[4]);
                    (be(&cdb[1..4]) & 0x1f_ffff, if n == 0 { 256 } else { n })
                }
                0x28 | 0x2a => (be(&cdb[2..6]), be(&cdb[7..9])),
                0xa8 | 0xaa => (be(&cdb[2..6]), be(&cdb[6..10])),
                _ => (be(&cdb[2..10]), be(&cdb[10..14])),
            };
            if lba.checked_add(count).is_none_or(|end| end > blocks) {
                // LOGICAL BLOCK ADDRESS OUT OF RANGE.
                return check(ILLEGAL_REQUEST, 0x21, 0);
            }
            let start = lba as usize * BLOCK;
            let len = count as usize * BLOCK;
            let write = matches!(op, 0x0a | 0x2a | 0xaa | 0x8a);
            if write {
                let n = len.min(data_out.len());
                disk.data[start..start + n].copy_from_slice(&data_out[..n]);
                Outcome {
                    out_unused: data_out.len() - n,
                    ..good(Vec::new())
                }
            } else {
                let n = len.min(room);
                good(disk.data[start..start + n].to_vec())
            }
        }
        // INVALID COMMAND OPERATION CODE.
        _ => check(ILLEGAL_REQUEST, 0x20, 0),
    }
}

fn inquiry(cdb: &[u8], room: usize) -> Outcome {
    let alloc = be(&cdb[3..5]) as usize;
    let evpd = cdb[1] & 1 != 0;
    let d = if !evpd {
        if cdb[2] != 0 {
            // INVALID FIELD IN CDB.
            return check(ILLEGAL_REQUEST, 0x24, 0);
        }
        let mut d = vec![0u8; 36];
        d[2] = 0x05; // SPC-3
        d[3] = 0x02; // response data format 2
        d[4] = 31;
        d[7] = 0x02; // CMDQUE: tagged command queueing
        d[8..16].copy_from_slice(b"RVSCSI  ");
        d[16..32].copy_from_slice(b"IN-MEMORY DISK  ");
        d[32..36].copy_from_slice(b"1.0 ");
        d
    } else {
        match cdb[2] {
            0x00 => vec![0, 0, 0, 3, 0x00, 0x80, 0x83],
            0x80 => {
                let mut d = vec![0, 0x80, 0, 8];
                d.extend_from_slice(b"MEMDISK0");
                d
            }
            0x83 => {
                // One T10 vendor ID designator (SPC-4 §7.8.6.4).
                let id = b"RVSCSI  MEMDISK0";
                let mut d = vec![
                    0,
                    0x83,
                    0,
                    (4 + id.len()) as u8,
                    0x02,
                    0x01,
                    0,
                    id.len() as u8,
                ];
                d.extend_from_slice(id);
                d
            }
            _ => return check(ILLEGAL_REQUEST, 0x24, 0),
        }
    };
    let mut d = d;
    d.truncate(alloc.min(room));
    good(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_was_written_and_refuses_the_end_of_the_disk() {
        let mut d = RamDisk::zeroed(16);
        let data: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        let w = execute(
            Some(&mut d),
            &[0],
            &[0x2a, 0, 0, 0, 0, 3, 0, 0, 2, 0],
            &data,
            0,
        );
        assert_eq!((w.status, w.out_unused), (GOOD, 0));
        let r = execute(
            Some(&mut d),
            &[0],
            &[0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0],
            &[],
            4096,
        );
        assert_eq!(r.data_in, data);
        let bad = execute(
            Some(&mut d),
            &[0],
            &[0x28, 0, 0, 0, 0, 15, 0, 0, 2, 0],
            &[],
            4096,
        );
        assert_eq!(bad.status, CHECK_CONDITION);
        assert_eq!((bad.sense[2], bad.sense[12]), (ILLEGAL_REQUEST, 0x21));
    }

    #[test]
    fn unknown_commands_and_absent_luns_get_sense() {
        let mut d = RamDisk::zeroed(16);
        let u = execute(Some(&mut d), &[0], &[0xc1, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!((u.status, u.sense[12]), (CHECK_CONDITION, 0x20));
        let inq = execute(None, &[0], &[0x12, 0, 0, 0, 96, 0], &[], 96);
        assert_eq!(inq.data_in[0], 0x7f, "no LU: peripheral qualifier 3");
        let tur = execute(None, &[0], &[0, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!((tur.status, tur.sense[12]), (CHECK_CONDITION, 0x25));
        let rl = execute(
            None,
            &[0, 300],
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            &[],
            256,
        );
        assert_eq!(&rl.data_in[..4], &[0, 0, 0, 16]);
        assert_eq!(&rl.data_in[16..18], &[0x41, 0x2c]);
    }

    /// Every LUN the in-memory device reports, through the name the
    /// framework gives it and the driver's decoding of that name, reaches
    /// the same LUN on the wire (never a wrong one): REPORT LUNS entry ->
    /// `scsi_lun_to_lun64` -> unit address -> `tran_tgt_init`'s
    /// `child_of_unit_address` -> `lun_bytes` -> the LUN this device
    /// decodes from a request (`virtio.rs`, `lun[1]` the target, the low
    /// 14 bits of `lun[2..4]` the LUN).
    #[test]
    fn every_reported_lun_is_the_lun_the_driver_then_addresses() {
        let luns: Vec<u16> = (0..=rvscsi::scsa::addr::MAX_SINGLE_LEVEL_LUN).collect();
        let room = 8 + 8 * luns.len();
        let mut cdb = [0u8; 12];
        cdb[0] = 0xa0;
        cdb[6..10].copy_from_slice(&(room as u32).to_be_bytes());
        let rl = execute(None, &luns, &cdb, &[], room);
        assert_eq!(rl.status, GOOD);
        assert_eq!(rl.data_in.len(), room);
        for (i, &lun) in luns.iter().enumerate() {
            let entry: [u8; 8] = rl.data_in[8 + 8 * i..16 + 8 * i].try_into().unwrap();
            let lun64 = crate::scsa::tgtmap::lun_to_lun64(entry);
            let ua = crate::scsa::tgtmap::unit_address("7", lun64);
            let (t, named) =
                rvscsi::scsa::addr::child_of_unit_address(ua.as_bytes(), 255, 16383).unwrap();
            let wire = rvscsi::vioscsi::proto::lun_bytes(t, named.number());
            assert_eq!((wire[0], wire[1]), (1, 7), "{ua}");
            let decoded = (u16::from(wire[2] & 0x3f) << 8) | u16::from(wire[3]);
            assert_eq!(decoded, lun, "{ua}");
        }
    }
}
