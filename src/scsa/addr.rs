//! Unit addresses of SCSI children under an iport with a target map, and
//! the LUNs they name.
//!
//! The framework names a LUN child `"<target>,<lun64>"`: the target
//! address the HBA reported to the target map, then the LUN in illumos'
//! `lun64` form, lowercase hexadecimal without leading zeros
//! (`scsi_hba.c`, `scsi_lunmap_set_add`: `"%s,%" PRIx64`). The `lun64` is
//! what `scsi_lun_to_lun64()` (`usr/src/common/devid/devid_scsi.c`) makes
//! of the 8-byte SAM LUN that REPORT LUNS returned:
//!
//! - a single-level LUN in the peripheral device addressing method
//!   (`sl_lun1_msb & SCSI_LUN_AM_MASK == SCSI_LUN_AM_PDEV`, the other six
//!   bytes zero) keeps its SCSI-2 compatible value, the low six bits of
//!   byte 0 (the bus identifier, which illumos tolerates being non-zero)
//!   above byte 1: 0 to 0x3fff;
//! - anything else, the flat space method included, is the whole LUN as
//!   a big-endian 64-bit number: flat LUN 256 (`41 00 00 .. 00`, as QEMU
//!   reports it, `hw/scsi/scsi-bus.c` `store_lun`) is `0x4100000000000000`
//!   and its child is `"0,4100000000000000"`.
//!
//! Method bits are `sys/scsi/scsi_address.h` `SCSI_LUN_AM_*`. devfsadm
//! builds `/dev/dsk` names from the unit address (`disk_link.c`,
//! `disk_callback_chan`: `sscanf("%X,%X")` into `uint_t`s).

/// The LUN numbers a single-level LUN can carry (14 bits): what
/// virtio-scsi addresses (virtio 1.2 §5.6.6.1).
pub const MAX_SINGLE_LEVEL_LUN: u16 = 0x3fff;

/// `SCSI_LUN_AM_MASK`, the addressing method bits of a LUN's byte 0.
const AM_MASK: u8 = 0xc0;
/// `SCSI_LUN_AM_PDEV`
const AM_PERIPHERAL: u8 = 0x00;
/// `SCSI_LUN_AM_FLAT`
const AM_FLAT: u8 = 0x40;
/// `SCSI_LUN_AM_LUN`
const AM_LOGICAL_UNIT: u8 = 0x80;

/// A LUN this driver can address: a single-level LUN (SAM-5 §4.7.4) whose
/// number fits the 14 bits of the peripheral or flat space methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleLevelLun {
    /// Peripheral device addressing method, bus identifier 0 (LUN < 256),
    /// or, as illumos tolerates it, a non-zero bus identifier making up
    /// the high bits (`scsi_lun_to_lun64`): `lun64` 0 to 0x3fff.
    Peripheral(u16),
    /// Flat space addressing method: `lun64` `0x40HHLL0000000000`.
    Flat(u16),
}

/// Why a `lun64` names nothing this driver can address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LunError {
    /// A second (or deeper) level is present: a LUN behind a bridge or a
    /// dependent logical unit.
    MultiLevel,
    /// The logical unit addressing method (`SCSI_LUN_AM_LUN`, bus, target
    /// and LUN fields of a SCSI-2 style bridge).
    LogicalUnitMethod,
    /// The extended flat space or extended logical unit methods
    /// (`SCSI_LUN_AM_EFLAT`/`_ELUN`, 24 or more bits, or well-known LUNs).
    Extended,
}

impl LunError {
    /// Says what the driver cannot address, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            LunError::MultiLevel => "a multi-level LUN",
            LunError::LogicalUnitMethod => "the logical unit addressing method",
            LunError::Extended => "an extended addressing method",
        }
    }
}

impl SingleLevelLun {
    /// Decodes the `lun64` of a unit address (the inverse of
    /// `scsi_lun_to_lun64` for the LUNs this driver can address).
    pub fn from_lun64(lun64: u64) -> Result<Self, LunError> {
        if lun64 <= u64::from(MAX_SINGLE_LEVEL_LUN) {
            return Ok(Self::Peripheral(lun64 as u16));
        }
        let [msb, lsb, lower @ ..] = lun64.to_be_bytes();
        match msb & AM_MASK {
            // A single-level peripheral LUN would have the compatible
            // form above: this one has lower levels.
            AM_PERIPHERAL => Err(LunError::MultiLevel),
            AM_FLAT if lower.iter().all(|&b| b == 0) => {
                Ok(Self::Flat(u16::from_be_bytes([msb & !AM_MASK, lsb])))
            }
            AM_FLAT => Err(LunError::MultiLevel),
            AM_LOGICAL_UNIT => Err(LunError::LogicalUnitMethod),
            _ => Err(LunError::Extended),
        }
    }

    /// The LUN number (0 to 16383).
    pub fn number(self) -> u16 {
        match self {
            Self::Peripheral(n) | Self::Flat(n) => n,
        }
    }

    /// Its `lun64` (what `scsi_lun_to_lun64` makes of it).
    pub fn lun64(self) -> u64 {
        match self {
            Self::Peripheral(n) => u64::from(n),
            Self::Flat(n) => u64::from(n | u16::from(AM_FLAT) << 8) << 48,
        }
    }
}

/// Parses a child's unit address `"t,l"` (or just `"t"`, LUN 0): target
/// and `lun64`. Only the canonical form the framework makes is accepted
/// (lowercase hexadecimal — `scsi_hba_ua_set` refuses other LUN digits —
/// without leading zeros): any other spelling would be a second name, and
/// a second target-driver instance, for a LUN that has one.
pub fn parse_unit_address(ua: &[u8]) -> Option<(u32, u64)> {
    let (t, l) = match ua.iter().position(|&c| c == b',') {
        Some(i) => (&ua[..i], Some(&ua[i + 1..])),
        None => (ua, None),
    };
    let target = parse_hex(t)?;
    let lun = match l {
        Some(l) => parse_hex(l)?,
        None => 0,
    };
    Some((u32::try_from(target).ok()?, lun))
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || (s.len() > 1 && s[0] == b'0') {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some((acc << 4) | u64::from(d))
    })
}

/// Why `tran_tgt_init(9E)` refuses a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildError {
    /// Not a unit address the framework makes.
    Malformed,
    /// A target beyond the device's `max_target`.
    TargetBeyond {
        /// The target.
        target: u32,
        /// The device's limit.
        max: u8,
    },
    /// A LUN the driver cannot address.
    Lun {
        /// The `lun64` of the unit address.
        lun64: u64,
        /// How it is out of reach.
        why: LunError,
    },
    /// A LUN beyond the device's `max_lun`.
    LunBeyond {
        /// The LUN number.
        lun: u16,
        /// The device's limit.
        max: u16,
    },
}

impl core::fmt::Display for ChildError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ChildError::Malformed => f.write_str("not a target,lun unit address"),
            ChildError::TargetBeyond { target, max } => {
                write!(
                    f,
                    "target {target} is beyond the device's last target {max}"
                )
            }
            ChildError::Lun { lun64, why } => write!(
                f,
                "LUN {lun64:#x} uses {}; virtio-scsi addresses single-level LUNs 0 to {}",
                why.describe(),
                MAX_SINGLE_LEVEL_LUN
            ),
            ChildError::LunBeyond { lun, max } => {
                write!(f, "LUN {lun} is beyond the device's last LUN {max}")
            }
        }
    }
}

/// The target and LUN number of the child named `ua`, on a device whose
/// last target and LUN are `max_target` and `max_lun`.
pub fn child_of_unit_address(
    ua: &[u8],
    max_target: u8,
    max_lun: u16,
) -> Result<(u8, SingleLevelLun), ChildError> {
    let (target, lun64) = parse_unit_address(ua).ok_or(ChildError::Malformed)?;
    let target = u8::try_from(target)
        .ok()
        .filter(|&t| t <= max_target)
        .ok_or(ChildError::TargetBeyond {
            target,
            max: max_target,
        })?;
    let lun = SingleLevelLun::from_lun64(lun64).map_err(|why| ChildError::Lun { lun64, why })?;
    if lun.number() > max_lun {
        return Err(ChildError::LunBeyond {
            lun: lun.number(),
            max: max_lun,
        });
    }
    Ok((target, lun))
}

/// A NUL-terminated target address ("%x") for the target map.
pub struct TargetAddr {
    buf: [u8; 9],
}

impl TargetAddr {
    /// Formats `target` in lowercase hex.
    pub fn new(target: u32) -> Self {
        let mut buf = [0u8; 9];
        let digits = b"0123456789abcdef";
        let mut n = 0;
        let mut started = false;
        for shift in (0..8).rev() {
            let d = ((target >> (4 * shift)) & 0xf) as usize;
            if d != 0 || started || shift == 0 {
                buf[n] = digits[d];
                n += 1;
                started = true;
            }
        }
        Self { buf }
    }

    /// The address without NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.buf.len());
        &self.buf[..end]
    }

    /// Pointer to the NUL-terminated address.
    pub fn as_c_ptr(&self) -> *mut core::ffi::c_char {
        self.buf.as_ptr().cast_mut().cast()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::format;

    /// `scsi_lun_to_lun64` (devid_scsi.c), restated from its source.
    fn illumos_lun_to_lun64(l: [u8; 8]) -> u64 {
        if l[2..].iter().all(|&b| b == 0) && l[0] & AM_MASK == AM_PERIPHERAL {
            (u64::from(l[0] & !AM_MASK) << 8) | u64::from(l[1])
        } else {
            u64::from_be_bytes(l)
        }
    }

    /// What QEMU's REPORT LUNS says for LUN `n` (scsi-bus.c `store_lun`).
    fn qemu_reported(n: u16) -> [u8; 8] {
        if n < 256 {
            [0, n as u8, 0, 0, 0, 0, 0, 0]
        } else {
            [AM_FLAT | (n >> 8) as u8, n as u8, 0, 0, 0, 0, 0, 0]
        }
    }

    #[test]
    fn unit_addresses() {
        assert_eq!(parse_unit_address(b"0,0"), Some((0, 0)));
        assert_eq!(parse_unit_address(b"1f,a"), Some((31, 10)));
        assert_eq!(parse_unit_address(b"3"), Some((3, 0)));
        assert_eq!(parse_unit_address(b"ff,3fff"), Some((255, 0x3fff)));
        assert_eq!(
            parse_unit_address(b"0,4100000000000000"),
            Some((0, 0x4100_0000_0000_0000))
        );
        assert_eq!(parse_unit_address(b""), None);
        assert_eq!(parse_unit_address(b"1,"), None);
        assert_eq!(parse_unit_address(b"x,1"), None);
        assert_eq!(parse_unit_address(b"1,2,3"), None);
        assert_eq!(parse_unit_address(b"1,11111111111111111"), None);
        // Not what the framework writes: other names for named LUNs.
        assert_eq!(parse_unit_address(b"0,A"), None, "uppercase");
        assert_eq!(parse_unit_address(b"0,00"), None, "leading zero");
        assert_eq!(parse_unit_address(b"01,0"), None, "leading zero");
    }

    #[test]
    fn target_addresses() {
        assert_eq!(TargetAddr::new(0).as_bytes(), b"0");
        assert_eq!(TargetAddr::new(10).as_bytes(), b"a");
        assert_eq!(TargetAddr::new(255).as_bytes(), b"ff");
        assert_eq!(TargetAddr::new(0x1000).as_bytes(), b"1000");
    }

    #[test]
    fn the_luns_qemu_reports_decode_to_their_numbers() {
        for (n, lun64, lun) in [
            (0u16, 0u64, SingleLevelLun::Peripheral(0)),
            (255, 0xff, SingleLevelLun::Peripheral(255)),
            (256, 0x4100_0000_0000_0000, SingleLevelLun::Flat(256)),
            (16383, 0x7fff_0000_0000_0000, SingleLevelLun::Flat(16383)),
        ] {
            assert_eq!(illumos_lun_to_lun64(qemu_reported(n)), lun64);
            assert_eq!(SingleLevelLun::from_lun64(lun64), Ok(lun));
            assert_eq!(lun.number(), n);
            assert_eq!(lun.lun64(), lun64);
        }
        // A flat-space LUN below 256, as some targets report LUN 0.
        assert_eq!(
            SingleLevelLun::from_lun64(0x4000_0000_0000_0000),
            Ok(SingleLevelLun::Flat(0))
        );
        // Peripheral with a bus identifier, which illumos folds in.
        assert_eq!(
            SingleLevelLun::from_lun64(illumos_lun_to_lun64([0x01, 0x00, 0, 0, 0, 0, 0, 0])),
            Ok(SingleLevelLun::Peripheral(256))
        );
    }

    #[test]
    fn what_cannot_be_addressed_is_refused_by_kind() {
        for (lun, err) in [
            // Peripheral LUN 1 behind peripheral LUN 0: two levels.
            ([0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0], LunError::MultiLevel),
            ([0x40, 0x05, 0x40, 0x01, 0, 0, 0, 0], LunError::MultiLevel),
            ([0x40, 0x05, 0, 0, 0, 0, 0, 0x01], LunError::MultiLevel),
            ([0x80, 0x01, 0, 0, 0, 0, 0, 0], LunError::LogicalUnitMethod),
            // Extended flat space (length 01: 3 bytes), the REPORT LUNS
            // well-known LUN (C1 01), the logical unit not specified one.
            ([0xd2, 0x00, 0x10, 0x00, 0, 0, 0, 0], LunError::Extended),
            ([0xc1, 0x01, 0, 0, 0, 0, 0, 0], LunError::Extended),
            ([0xff; 8], LunError::Extended),
        ] {
            let lun64 = illumos_lun_to_lun64(lun);
            assert_eq!(
                SingleLevelLun::from_lun64(lun64),
                Err(err),
                "{lun:02x?} (lun64 {lun64:#x})"
            );
        }
    }

    #[test]
    fn children_are_checked_against_the_device_limits() {
        assert_eq!(
            child_of_unit_address(b"3,4100000000000000", 255, 16383),
            Ok((3, SingleLevelLun::Flat(256)))
        );
        assert_eq!(
            child_of_unit_address(b"0,7fff000000000000", 0, 16383),
            Ok((0, SingleLevelLun::Flat(16383)))
        );
        assert_eq!(
            child_of_unit_address(b"1,0", 0, 16383),
            Err(ChildError::TargetBeyond { target: 1, max: 0 })
        );
        assert_eq!(
            child_of_unit_address(b"100,0", 255, 16383),
            Err(ChildError::TargetBeyond {
                target: 256,
                max: 255
            })
        );
        assert_eq!(
            child_of_unit_address(b"0,4100000000000000", 255, 255),
            Err(ChildError::LunBeyond { lun: 256, max: 255 })
        );
        assert_eq!(
            child_of_unit_address(b"0,8001000000000000", 255, 16383),
            Err(ChildError::Lun {
                lun64: 0x8001_0000_0000_0000,
                why: LunError::LogicalUnitMethod
            })
        );
        assert_eq!(
            child_of_unit_address(b"0,0,1", 255, 16383),
            Err(ChildError::Malformed)
        );
        let msg = format!(
            "{}",
            ChildError::Lun {
                lun64: 0xc101_0000_0000_0000,
                why: LunError::Extended
            }
        );
        assert_eq!(
            msg,
            "LUN 0xc101000000000000 uses an extended addressing method; \
             virtio-scsi addresses single-level LUNs 0 to 16383"
        );
    }

    proptest! {
        /// Every LUN QEMU can report: the name the framework gives it
        /// parses back to the same LUN number, whatever the target.
        #[test]
        fn every_single_level_lun_round_trips_through_its_name(
            n in 0u16..=MAX_SINGLE_LEVEL_LUN,
            target in 0u32..=255,
        ) {
            let lun64 = illumos_lun_to_lun64(qemu_reported(n));
            let ua = format!("{target:x},{lun64:x}");
            let (t, l) = parse_unit_address(ua.as_bytes()).unwrap();
            prop_assert_eq!(t, target);
            let lun = SingleLevelLun::from_lun64(l).unwrap();
            prop_assert_eq!(lun.number(), n);
            prop_assert_eq!(lun.lun64(), lun64);
        }

        /// Any 8-byte LUN: either refused, or decoded to a LUN whose
        /// `lun64` is the one the framework computed (so never a wrong
        /// LUN).
        #[test]
        fn any_lun_decodes_exactly_or_is_refused(raw in any::<[u8; 8]>()) {
            let lun64 = illumos_lun_to_lun64(raw);
            if let Ok(lun) = SingleLevelLun::from_lun64(lun64) {
                prop_assert_eq!(lun.lun64(), lun64);
                prop_assert!(lun.number() <= MAX_SINGLE_LEVEL_LUN);
                // illumos' compatible form (0 to 0x3fff) cannot tell a
                // peripheral LUN from a deeper LUN whose full form is as
                // small (`00 00 .. 00 01`): that name is the framework's
                // own ambiguity, and it means the single-level LUN.
                prop_assume!(lun64 > u64::from(MAX_SINGLE_LEVEL_LUN));
                prop_assert!(raw[2..].iter().all(|&b| b == 0));
                prop_assert_eq!(raw[0] & AM_MASK & !AM_FLAT, 0);
                prop_assert_eq!(
                    lun.number(),
                    u16::from_be_bytes([raw[0] & !AM_MASK, raw[1]])
                );
            }
        }
    }
}
