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

/// The number of a single-level LUN: 0 to [`MAX_SINGLE_LEVEL_LUN`], by
/// construction, so whatever carries one can put it in the 14 bits of a
/// LUN structure without checking or masking again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LunNumber(u16);

impl LunNumber {
    /// LUN 0.
    pub const ZERO: Self = Self(0);
    /// The last LUN a single-level LUN can name.
    pub const MAX: Self = Self(MAX_SINGLE_LEVEL_LUN);

    /// `n`, if a single-level LUN can carry it.
    pub const fn new(n: u16) -> Option<Self> {
        if n <= MAX_SINGLE_LEVEL_LUN {
            Some(Self(n))
        } else {
            None
        }
    }

    /// The number in the two bytes of a single-level LUN structure in the
    /// peripheral or flat space method: the low six bits of `first` (the
    /// method bits dropped) above `second`.
    pub const fn from_structure(first: u8, second: u8) -> Self {
        Self(((first & !AM_MASK) as u16) << 8 | second as u16)
    }

    /// The number.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Bits 13 to 8 (at most 0x3f: the method bits stay free).
    pub const fn high_bits(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Bits 7 to 0.
    pub const fn low_byte(self) -> u8 {
        self.0 as u8
    }
}

impl From<LunNumber> for u16 {
    fn from(n: LunNumber) -> u16 {
        n.0
    }
}

impl From<LunNumber> for usize {
    fn from(n: LunNumber) -> usize {
        n.0.into()
    }
}

impl core::fmt::Display for LunNumber {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.0, f)
    }
}

/// A LUN this driver can address: a single-level LUN (SAM-5 §4.7.4) in the
/// peripheral or flat space method. The method matters past decoding only
/// for naming: a flat-space LUN's `lun64` has the number in its top 16
/// bits, which devfsadm drops (see [`SingleLevelLun::devfsadm_chan_lun`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleLevelLun {
    /// Peripheral device addressing method, bus identifier 0 (LUN < 256),
    /// or, as illumos tolerates it, a non-zero bus identifier making up
    /// the high bits (`scsi_lun_to_lun64`): `lun64` 0 to 0x3fff.
    Peripheral(LunNumber),
    /// Flat space addressing method: `lun64` `0x4HHLL00000000000`.
    Flat(LunNumber),
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
        if let Some(n) = u16::try_from(lun64).ok().and_then(LunNumber::new) {
            return Ok(Self::Peripheral(n));
        }
        let [msb, lsb, lower @ ..] = lun64.to_be_bytes();
        match msb & AM_MASK {
            // A single-level peripheral LUN would have the compatible
            // form above: this one has lower levels.
            AM_PERIPHERAL => Err(LunError::MultiLevel),
            AM_FLAT if lower.iter().all(|&b| b == 0) => {
                Ok(Self::Flat(LunNumber::from_structure(msb, lsb)))
            }
            AM_FLAT => Err(LunError::MultiLevel),
            AM_LOGICAL_UNIT => Err(LunError::LogicalUnitMethod),
            _ => Err(LunError::Extended),
        }
    }

    /// The LUN number.
    pub fn number(self) -> LunNumber {
        match self {
            Self::Peripheral(n) | Self::Flat(n) => n,
        }
    }

    /// The LUN devfsadm puts in the `/dev/dsk` name of this LUN's disk on
    /// an HBA of the parallel interconnect type (sd's `DDI_NT_BLOCK_CHAN`
    /// minor nodes; `usr/src/cmd/devfsadm/disk_link.c`,
    /// `disk_callback_chan`): `sscanf(addr, "%X,%X")` into a `uint_t`
    /// keeps the low 32 bits of the `lun64` (libc `doscan.c`, `number()`,
    /// stores `(int)` of its `long long`), printed `"d%d"`. A peripheral
    /// LUN keeps its number; every flat-space LUN becomes 0, LUN 0's name.
    pub fn devfsadm_chan_lun(self) -> u16 {
        match self {
            Self::Peripheral(n) => n.get(),
            Self::Flat(_) => 0,
        }
    }
}

/// Parses a child's unit address `"t,l"`: target and `lun64`. Only the
/// canonical form the framework makes is accepted (lowercase hexadecimal
/// — `scsi_hba_ua_set` refuses other LUN digits — without leading zeros,
/// and the `",lun"` part present): any other spelling would be a second
/// name, and a second target-driver instance, for a LUN that has one.
/// (`scsi_hba_bus_configone` hands `"disk@3"` to `scsi_device_config`
/// as written, and `scsi_hba_ua_set` reads the missing LUN as 0.)
pub fn parse_unit_address(ua: &[u8]) -> Option<(u32, u64)> {
    let comma = ua.iter().position(|&c| c == b',')?;
    let target = parse_hex(&ua[..comma])?;
    let lun = parse_hex(&ua[comma + 1..])?;
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

/// Remembers, in a fixed table, which unit addresses a message was
/// already given for, so that a child the framework asks about again and
/// again (each BUS_CONFIG_ONE of a `/devices` path, each rescan) is
/// reported once, with no memory growing. The table holds `N` entries and
/// reuses the oldest: a unit address may be reported again after `N`
/// others. Two threads asking about the same new address at once may
/// both be told it is new (the message then appears twice, never lost).
pub struct ReportedUnitAddresses<const N: usize> {
    keys: [core::sync::atomic::AtomicU64; N],
    next: core::sync::atomic::AtomicUsize,
}

impl<const N: usize> ReportedUnitAddresses<N> {
    /// An empty table.
    pub const fn new() -> Self {
        Self {
            keys: [const { core::sync::atomic::AtomicU64::new(0) }; N],
            next: core::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Whether message `kind` about unit address `ua` of HBA `hba` is new
    /// (and from now on, not).
    pub fn first(&self, hba: usize, kind: u8, ua: &[u8]) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        // FNV-1a, 64 bits: collisions (a message suppressed for another
        // address) are as unlikely as any in 2^64.
        let key = (hba.to_le_bytes().iter())
            .chain(core::iter::once(&kind))
            .chain(ua)
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
            .max(1); // 0 marks an empty entry
        if N == 0 {
            return true;
        }
        if self.keys.iter().any(|k| k.load(Relaxed) == key) {
            return false;
        }
        let slot = self.next.fetch_add(1, Relaxed) % N;
        self.keys[slot].store(key, Relaxed);
        true
    }
}

impl<const N: usize> ReportedUnitAddresses<N> {
    /// Forgets every message given: after a detach the node addresses the
    /// keys were made of may be reused by the next attach (kmem hands out
    /// a freed dev_info again), whose children must be told about anew.
    /// Other HBAs' messages may then be given once more, never lost.
    pub fn forget_all(&self) {
        for k in &self.keys {
            k.store(0, core::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl<const N: usize> Default for ReportedUnitAddresses<N> {
    fn default() -> Self {
        Self::new()
    }
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
        lun: LunNumber,
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
    if lun.number().get() > max_lun {
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

    #[test]
    fn a_lun_number_converts_to_its_own_value() {
        // The DTrace probes take the LUN as a usize, the wire as u16.
        for n in [0u16, 1, 255, 256, 300, MAX_SINGLE_LEVEL_LUN] {
            let l = LunNumber::new(n).expect("a single-level LUN");
            assert_eq!(u16::from(l), n);
            assert_eq!(usize::from(l), usize::from(n));
            assert_eq!(format!("{l}"), format!("{n}"), "logged as its number");
        }
    }

    /// `scsi_lun_to_lun64` (devid_scsi.c), restated from its source.
    fn illumos_lun_to_lun64(l: [u8; 8]) -> u64 {
        if l[2..].iter().all(|&b| b == 0) && l[0] & AM_MASK == AM_PERIPHERAL {
            (u64::from(l[0] & !AM_MASK) << 8) | u64::from(l[1])
        } else {
            u64::from_be_bytes(l)
        }
    }

    /// The `lun64` the framework made of `lun` (what `scsi_lun_to_lun64`
    /// gives the LUN structure it decoded from).
    fn lun64_of(lun: SingleLevelLun) -> u64 {
        match lun {
            SingleLevelLun::Peripheral(n) => u64::from(n.get()),
            SingleLevelLun::Flat(n) => u64::from(n.get() | u16::from(AM_FLAT) << 8) << 48,
        }
    }

    fn n(n: u16) -> LunNumber {
        LunNumber::new(n).unwrap()
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
        // No ",lun": LUN 0's second name (scsi_hba_ua_set reads the
        // missing LUN as 0).
        assert_eq!(parse_unit_address(b"3"), None);
        assert_eq!(parse_unit_address(b"0"), None);
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
        for (number, lun64, lun) in [
            (0u16, 0u64, SingleLevelLun::Peripheral(n(0))),
            (255, 0xff, SingleLevelLun::Peripheral(n(255))),
            (256, 0x4100_0000_0000_0000, SingleLevelLun::Flat(n(256))),
            (16383, 0x7fff_0000_0000_0000, SingleLevelLun::Flat(n(16383))),
        ] {
            assert_eq!(illumos_lun_to_lun64(qemu_reported(number)), lun64);
            assert_eq!(SingleLevelLun::from_lun64(lun64), Ok(lun));
            assert_eq!(lun.number().get(), number);
            assert_eq!(lun64_of(lun), lun64);
        }
        // A flat-space LUN below 256, as some targets report LUN 0.
        assert_eq!(
            SingleLevelLun::from_lun64(0x4000_0000_0000_0000),
            Ok(SingleLevelLun::Flat(n(0)))
        );
        // Peripheral with a bus identifier, which illumos folds in.
        assert_eq!(
            SingleLevelLun::from_lun64(illumos_lun_to_lun64([0x01, 0x00, 0, 0, 0, 0, 0, 0])),
            Ok(SingleLevelLun::Peripheral(n(256)))
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
            Ok((3, SingleLevelLun::Flat(n(256))))
        );
        assert_eq!(
            child_of_unit_address(b"0,7fff000000000000", 0, 16383),
            Ok((0, SingleLevelLun::Flat(n(16383))))
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
            Err(ChildError::LunBeyond {
                lun: n(256),
                max: 255
            })
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
        assert_eq!(
            child_of_unit_address(b"0", 255, 16383),
            Err(ChildError::Malformed),
            "LUN 0 has one name, \"0,0\""
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

    /// 8-byte LUNs, weighted to the ones that matter: any bytes (almost
    /// all refused), single-level LUNs of every method (the first two
    /// bytes), those with one more non-zero byte below (a second level),
    /// and the small full forms that collide with the compatible form.
    fn lun_structures() -> impl Strategy<Value = [u8; 8]> {
        prop_oneof![
            any::<[u8; 8]>(),
            any::<[u8; 2]>().prop_map(|[a, b]| [a, b, 0, 0, 0, 0, 0, 0]),
            (any::<[u8; 2]>(), 2usize..8, 1u8..=255).prop_map(|([a, b], i, v)| {
                let mut l = [a, b, 0, 0, 0, 0, 0, 0];
                l[i] = v;
                l
            }),
            any::<[u8; 2]>().prop_map(|[a, b]| [0, 0, 0, 0, 0, 0, a, b]),
        ]
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
            prop_assert_eq!(lun.number().get(), n);
            prop_assert_eq!(lun64_of(lun), lun64);
        }

        /// Any 8-byte LUN: either refused, or decoded to the LUN it means
        /// and sent on the wire as that LUN (so never a wrong LUN).
        ///
        /// What a single-level LUN in the peripheral or flat space method
        /// means is the 14-bit number of its first two bytes; a
        /// peripheral LUN with a non-zero bus identifier (`01 02`) means
        /// 258 to the targets that report one: Linux's `int_to_scsilun`
        /// (`drivers/scsi/scsi_common.c`) writes LUN 258 as `01 02`, and
        /// LIO's REPORT LUNS (`spc_emulate_report_luns`) and so
        /// vhost-scsi report it so. The driver sends it as `41 02`
        /// (`proto::lun_bytes`), which vhost-scsi decodes as
        /// `(lun[2] << 8 | lun[3]) & 0x3fff` (`drivers/vhost/scsi.c`,
        /// `vhost_buf_to_lun`) and QEMU as the low 14 bits too
        /// (`virtio_scsi_get_lun`): 258 again.
        #[test]
        fn any_lun_decodes_exactly_or_is_refused(raw in lun_structures(), target in any::<u8>()) {
            let lun64 = illumos_lun_to_lun64(raw);
            if let Ok(lun) = SingleLevelLun::from_lun64(lun64) {
                prop_assert_eq!(lun64_of(lun), lun64);
                let wire = crate::vioscsi::proto::lun_bytes(target, lun.number());
                let device_sees = u16::from_be_bytes([wire[2], wire[3]]) & 0x3fff;
                prop_assert_eq!(device_sees, lun.number().get());
                prop_assert_eq!((wire[0], wire[1]), (1, target));
                if raw[2..].iter().all(|&b| b == 0) {
                    // Single-level: the number it means, peripheral (any
                    // bus identifier) or flat.
                    prop_assert!(raw[0] & AM_MASK == AM_PERIPHERAL || raw[0] & AM_MASK == AM_FLAT);
                    prop_assert_eq!(lun.number(), LunNumber::from_structure(raw[0], raw[1]));
                    let method_kept = matches!(
                        (raw[0] & AM_MASK, lun),
                        (AM_PERIPHERAL, SingleLevelLun::Peripheral(_))
                            | (AM_FLAT, SingleLevelLun::Flat(_))
                    );
                    prop_assert!(method_kept);
                } else {
                    // illumos' compatible form (0 to 0x3fff) cannot tell
                    // a peripheral LUN from a deeper LUN whose full form
                    // is as small (`00 00 .. 00 01`): that name is the
                    // framework's own ambiguity, and it means the
                    // single-level LUN of that number. Nothing else with
                    // lower levels decodes.
                    prop_assert_eq!(raw[..6].iter().all(|&b| b == 0), true);
                    prop_assert_eq!(u64::from(lun.number().get()), lun64);
                }
            }
        }
    }
}

#[cfg(test)]
mod reported_tests {
    use super::*;

    #[test]
    fn each_unit_address_is_reported_once_in_a_bounded_table() {
        let t = ReportedUnitAddresses::<4>::new();
        assert!(t.first(1, 0, b"0,00"));
        assert!(!t.first(1, 0, b"0,00"), "once");
        assert!(t.first(1, 1, b"0,00"), "another message");
        assert!(t.first(2, 0, b"0,00"), "another HBA");
        assert!(t.first(1, 0, b"00,0"));
        assert!(!t.first(1, 0, b"0,00"));
        // A fifth address takes the oldest entry: that one may be
        // reported again, nothing grows.
        assert!(t.first(1, 0, b"0"));
        assert!(t.first(1, 0, b"0,00"));
        assert!(ReportedUnitAddresses::<0>::new().first(1, 0, b"0"));
    }

    #[test]
    fn a_detach_forgets_what_was_reported() {
        let t = ReportedUnitAddresses::<4>::new();
        assert!(t.first(7, 0, b"1,4100000000000000"));
        assert!(!t.first(7, 0, b"1,4100000000000000"));
        t.forget_all();
        assert!(
            t.first(7, 0, b"1,4100000000000000"),
            "a node at a reused address is told again"
        );
    }

    #[test]
    fn lun_numbers_hold_14_bits() {
        assert_eq!(LunNumber::new(0x3fff), Some(LunNumber::MAX));
        assert_eq!(LunNumber::new(0x4000), None);
        assert_eq!(LunNumber::from_structure(0x41, 0x02).get(), 258);
        assert_eq!(LunNumber::from_structure(0xff, 0xff), LunNumber::MAX);
        assert_eq!(LunNumber::MAX.high_bits(), 0x3f);
    }

    #[test]
    fn devfsadm_names_every_flat_lun_d0() {
        for (ua, d) in [
            (&b"0,0"[..], 0),
            (b"0,ff", 255),
            (b"0,102", 258),
            (b"0,4100000000000000", 0),
            (b"0,7fff000000000000", 0),
        ] {
            let (_, lun) = child_of_unit_address(ua, 0, 16383).unwrap();
            assert_eq!(lun.devfsadm_chan_lun(), d, "{ua:?}");
        }
    }
}
