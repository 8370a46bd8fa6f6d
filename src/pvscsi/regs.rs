//! Registers, interrupt bits, adapter commands and doorbells.
//!
//! Offsets and command numbers are VMware's header (`pvscsi.h`,
//! `PVSCSIRegOffset`, `PVSCSICommands`; the same in Linux
//! `vmw_pvscsi.h`, FreeBSD `pvscsi.h`, illumos `pvscsi.h`); payload layouts
//! are the header's `PVSCSICmdDesc*` structures, packed little-endian. What
//! QEMU 10.0 does with each is in `shared/notes/pvscsi.md` §1.

use crate::scsa::addr::LunNumber;

/// Size of the register BAR every driver expects (8 pages of 4 KiB,
/// `PVSCSIMemSpace`; illumos `pvscsi_setup_io` requires exactly this).
pub const BAR_SIZE: u64 = 8 * 4096;

/// `PVSCSI_REG_OFFSET_COMMAND`: write the command number.
pub const REG_COMMAND: usize = 0x0000;
/// `PVSCSI_REG_OFFSET_COMMAND_DATA`: write the payload, one dword at a time.
pub const REG_COMMAND_DATA: usize = 0x0004;
/// `PVSCSI_REG_OFFSET_COMMAND_STATUS`: read the result.
pub const REG_COMMAND_STATUS: usize = 0x0008;
/// `PVSCSI_REG_OFFSET_LAST_STS_0` (unused by every driver).
pub const REG_LAST_STS_0: usize = 0x0100;
/// `PVSCSI_REG_OFFSET_INTR_STATUS`: pending bits, write-1-to-clear.
pub const REG_INTR_STATUS: usize = 0x100C;
/// `PVSCSI_REG_OFFSET_INTR_MASK`: enabled interrupt bits.
pub const REG_INTR_MASK: usize = 0x2010;
/// `PVSCSI_REG_OFFSET_KICK_NON_RW_IO` (misc page).
pub const REG_KICK_NON_RW_IO: usize = 0x3014;
/// `PVSCSI_REG_OFFSET_DEBUG` (ignored by QEMU).
pub const REG_DEBUG: usize = 0x3018;
/// `PVSCSI_REG_OFFSET_KICK_RW_IO` (the dedicated kick page).
pub const REG_KICK_RW_IO: usize = 0x4018;

/// `PVSCSI_INTR_CMPL_0`
pub const INTR_CMPL_0: u32 = 1 << 0;
/// `PVSCSI_INTR_CMPL_1`
pub const INTR_CMPL_1: u32 = 1 << 1;
/// `PVSCSI_INTR_CMPL_MASK`
pub const INTR_CMPL_MASK: u32 = INTR_CMPL_0 | INTR_CMPL_1;
/// `PVSCSI_INTR_MSG_0`
pub const INTR_MSG_0: u32 = 1 << 2;
/// `PVSCSI_INTR_MSG_1`
pub const INTR_MSG_1: u32 = 1 << 3;
/// `PVSCSI_INTR_MSG_MASK`
pub const INTR_MSG_MASK: u32 = INTR_MSG_0 | INTR_MSG_1;
/// `PVSCSI_INTR_ALL_SUPPORTED`
pub const INTR_ALL_SUPPORTED: u32 = INTR_CMPL_MASK | INTR_MSG_MASK;

/// `PVSCSI_SETUP_RINGS_MAX_NUM_PAGES`
pub const SETUP_RINGS_MAX_PAGES: usize = 32;
/// `PVSCSI_SETUP_MSG_RING_MAX_NUM_PAGES`
pub const SETUP_MSG_RING_MAX_PAGES: usize = 16;

/// `PVSCSI_CONFIG_PAGE_CONTROLLER`: the page number of the controller page.
pub const CONFIG_PAGE_CONTROLLER: u32 = 0x1958;
/// `PVSCSI_CONFIG_CONTROLLER_ADDRESS << 32`: the "address" of the controller
/// whose page CONFIG reads (Linux `pvscsi_get_max_targets`).
pub const CONFIG_CONTROLLER_ADDRESS: u64 = 0x2120 << 32;

/// Command numbers (`PVSCSICommands`; GET_MAX_TARGETS is FreeBSD's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CommandNumber {
    /// `PVSCSI_CMD_ADAPTER_RESET`
    AdapterReset = 1,
    /// `PVSCSI_CMD_ISSUE_SCSI` (no driver uses it; QEMU: -1)
    IssueScsi = 2,
    /// `PVSCSI_CMD_SETUP_RINGS`
    SetupRings = 3,
    /// `PVSCSI_CMD_RESET_BUS`
    ResetBus = 4,
    /// `PVSCSI_CMD_RESET_DEVICE`
    ResetDevice = 5,
    /// `PVSCSI_CMD_ABORT_CMD`
    AbortCmd = 6,
    /// `PVSCSI_CMD_CONFIG`
    Config = 7,
    /// `PVSCSI_CMD_SETUP_MSG_RING`
    SetupMsgRing = 8,
    /// `PVSCSI_CMD_DEVICE_UNPLUG` (QEMU: -1)
    DeviceUnplug = 9,
    /// `PVSCSI_CMD_SETUP_REQCALLTHRESHOLD` (unknown to QEMU: -1)
    SetupReqCallThreshold = 10,
    /// `PVSCSI_CMD_GET_MAX_TARGETS` (FreeBSD; QEMU: -1)
    GetMaxTargets = 11,
}

/// A command with its payload, as typed values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Cancel all I/O (completed with BUSRESET into the completion ring),
    /// invalidate the rings. No payload.
    AdapterReset,
    /// `PVSCSICmdDescSetupRings`: the rings-state page and the physical
    /// page numbers of the request and completion rings (1..=32 each, a
    /// power of two: QEMU does not check that, see [`RingPages`]).
    ///
    /// [`RingPages`]: super::ring::RingPages
    SetupRings {
        /// PPN of the rings-state page.
        rings_state_ppn: u64,
        /// PPNs of the request ring's pages.
        req_ppns: &'a [u64],
        /// PPNs of the completion ring's pages.
        cmp_ppns: &'a [u64],
    },
    /// Reset the bus. No payload.
    ResetBus,
    /// `PVSCSICmdDescResetDevice`: target and single-level LUN.
    ResetDevice {
        /// Target.
        target: u32,
        /// LUN (must fit in `lun[1]`).
        lun: LunNumber,
    },
    /// `PVSCSICmdDescAbortCmd`: the context of the command to abort.
    AbortCmd {
        /// The context of the request descriptor.
        context: u64,
        /// Target (QEMU ignores it).
        target: u32,
    },
    /// `PVSCSICmdDescConfigCmd`: read a configuration page into `cmp_addr`.
    Config {
        /// Physical address of the page buffer the device fills.
        cmp_addr: u64,
        /// Which object's page ([`CONFIG_CONTROLLER_ADDRESS`]).
        page_addr: u64,
        /// Which page ([`CONFIG_PAGE_CONTROLLER`]).
        page_num: u32,
    },
    /// `PVSCSICmdDescSetupMsgRing`: PPNs of the message ring (1..=16).
    SetupMsgRing {
        /// PPNs of the message ring's pages.
        ppns: &'a [u64],
    },
    /// `PVSCSICmdDescSetupReqCall`: enable request-call threshold mode.
    SetupReqCallThreshold {
        /// Enable.
        enable: bool,
    },
    /// FreeBSD's GET_MAX_TARGETS: no payload, result in COMMAND_STATUS.
    GetMaxTargets,
}

/// Largest payload in dwords (SETUP_RINGS: 528 bytes).
pub const MAX_PAYLOAD_DWORDS: usize = 132;

/// Why a command cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// A ring's page count is not a power of two between 1 and the limit.
    BadPageCount {
        /// The count given.
        pages: usize,
    },
    /// The LUN does not fit the one byte `lun[1]` every driver uses.
    LunOutOfRange,
}

/// A command's payload: up to [`MAX_PAYLOAD_DWORDS`] dwords, in the order
/// they are written to COMMAND_DATA.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    dwords: [u32; MAX_PAYLOAD_DWORDS],
    len: usize,
}

impl core::fmt::Debug for Payload {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl Payload {
    const fn empty() -> Self {
        Payload {
            dwords: [0; MAX_PAYLOAD_DWORDS],
            len: 0,
        }
    }

    fn push32(&mut self, v: u32) {
        if let Some(d) = self.dwords.get_mut(self.len) {
            *d = v;
            self.len += 1;
        }
    }

    fn push64(&mut self, v: u64) {
        self.push32(v as u32);
        self.push32((v >> 32) as u32);
    }

    /// The dwords.
    pub fn as_slice(&self) -> &[u32] {
        &self.dwords[..self.len]
    }

    /// The payload as little-endian bytes (for comparing with the header's
    /// packed structures).
    pub fn byte_len(&self) -> usize {
        4 * self.len
    }
}

fn valid_page_count(n: usize, max: usize) -> Result<u32, CommandError> {
    if n == 0 || n > max || !n.is_power_of_two() {
        return Err(CommandError::BadPageCount { pages: n });
    }
    Ok(n as u32)
}

impl Command<'_> {
    /// The command number.
    pub fn number(&self) -> CommandNumber {
        match self {
            Command::AdapterReset => CommandNumber::AdapterReset,
            Command::SetupRings { .. } => CommandNumber::SetupRings,
            Command::ResetBus => CommandNumber::ResetBus,
            Command::ResetDevice { .. } => CommandNumber::ResetDevice,
            Command::AbortCmd { .. } => CommandNumber::AbortCmd,
            Command::Config { .. } => CommandNumber::Config,
            Command::SetupMsgRing { .. } => CommandNumber::SetupMsgRing,
            Command::SetupReqCallThreshold { .. } => CommandNumber::SetupReqCallThreshold,
            Command::GetMaxTargets => CommandNumber::GetMaxTargets,
        }
    }

    /// Encodes the payload: the dwords written to COMMAND_DATA after the
    /// command number. Page lists shorter than the header's array are
    /// padded with zero PPNs (the device reads the whole structure:
    /// QEMU runs the command only once all 528 / 136 bytes arrived).
    pub fn encode(&self) -> Result<Payload, CommandError> {
        let mut p = Payload::empty();
        match *self {
            Command::AdapterReset | Command::ResetBus | Command::GetMaxTargets => {}
            Command::SetupRings {
                rings_state_ppn,
                req_ppns,
                cmp_ppns,
            } => {
                // PVSCSICmdDescSetupRings: reqRingNumPages u32,
                // cmpRingNumPages u32, ringsStatePPN u64, reqRingPPNs[32],
                // cmpRingPPNs[32].
                p.push32(valid_page_count(req_ppns.len(), SETUP_RINGS_MAX_PAGES)?);
                p.push32(valid_page_count(cmp_ppns.len(), SETUP_RINGS_MAX_PAGES)?);
                p.push64(rings_state_ppn);
                for list in [req_ppns, cmp_ppns] {
                    for i in 0..SETUP_RINGS_MAX_PAGES {
                        p.push64(list.get(i).copied().unwrap_or(0));
                    }
                }
            }
            Command::ResetDevice { target, lun } => {
                // PVSCSICmdDescResetDevice: target u32, lun[8].
                let lun = super::wire::lun_field(lun).ok_or(CommandError::LunOutOfRange)?;
                p.push32(target);
                p.push32(u32::from_le_bytes([lun[0], lun[1], lun[2], lun[3]]));
                p.push32(u32::from_le_bytes([lun[4], lun[5], lun[6], lun[7]]));
            }
            Command::AbortCmd { context, target } => {
                // PVSCSICmdDescAbortCmd: context u64, target u32, _pad u32.
                p.push64(context);
                p.push32(target);
                p.push32(0);
            }
            Command::Config {
                cmp_addr,
                page_addr,
                page_num,
            } => {
                // PVSCSICmdDescConfigCmd: cmpAddr u64, configPageAddress
                // u64, configPageNum u32, _pad u32.
                p.push64(cmp_addr);
                p.push64(page_addr);
                p.push32(page_num);
                p.push32(0);
            }
            Command::SetupMsgRing { ppns } => {
                // PVSCSICmdDescSetupMsgRing: numPages u32, _pad u32,
                // ringPPNs[16].
                p.push32(valid_page_count(ppns.len(), SETUP_MSG_RING_MAX_PAGES)?);
                p.push32(0);
                for i in 0..SETUP_MSG_RING_MAX_PAGES {
                    p.push64(ppns.get(i).copied().unwrap_or(0));
                }
            }
            Command::SetupReqCallThreshold { enable } => {
                p.push32(u32::from(enable));
            }
        }
        Ok(p)
    }
}

/// What COMMAND_STATUS said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandStatus {
    /// The command ran; its value (0 for most, 34 for QEMU's
    /// SETUP_MSG_RING, a count for GET_MAX_TARGETS).
    Done(u32),
    /// 0xFFFFFFFF: failed or not supported.
    Failed,
    /// 0xFFFFFFFE: QEMU waits for more payload (seen after writing only
    /// the command number of a command with a payload).
    AwaitingData,
}

impl CommandStatus {
    /// Decodes the register value.
    pub fn from_raw(v: u32) -> Self {
        match v {
            u32::MAX => CommandStatus::Failed,
            0xFFFF_FFFE => CommandStatus::AwaitingData,
            v => CommandStatus::Done(v),
        }
    }
}

/// The two doorbells (`PVSCSI_REG_OFFSET_KICK_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Doorbell {
    /// READ/WRITE(6/10/12/16): the dedicated kick page, and subject to
    /// the request-call threshold where the device has one.
    ReadWrite,
    /// Everything else: always rung.
    NonReadWrite,
}

impl Doorbell {
    /// The register to write.
    pub fn register(self) -> usize {
        match self {
            Doorbell::ReadWrite => REG_KICK_RW_IO,
            Doorbell::NonReadWrite => REG_KICK_NON_RW_IO,
        }
    }

    /// One doorbell for a batch: the non-R/W one if any command of the
    /// batch needs it (it is never subject to the threshold, and it makes
    /// the device process the whole ring, R/W requests included).
    pub fn merge(self, other: Doorbell) -> Doorbell {
        self.max(other)
    }
}

/// Whether `opcode` is a READ or WRITE (6/10/12/16): the opcodes Linux
/// `scsi_is_rw` and FreeBSD `pvscsi_kick_io` send to KICK_RW_IO.
pub fn is_read_write(opcode: u8) -> bool {
    matches!(
        opcode,
        0x08 | 0x0A | 0x28 | 0x2A | 0xA8 | 0xAA | 0x88 | 0x8A
    )
}

/// The doorbell for a CDB (an empty CDB counts as non-R/W).
pub fn doorbell_for(cdb: &[u8]) -> Doorbell {
    match cdb.first() {
        Some(&op) if is_read_write(op) => Doorbell::ReadWrite,
        _ => Doorbell::NonReadWrite,
    }
}

/// Whether the doorbell must be written after a publish: the non-R/W one
/// always; the R/W one unless threshold mode is on and fewer than
/// `threshold` requests wait (Linux/FreeBSD `pvscsi_kick_io`). `pending`
/// is [`Rings::device_pending_requests`] (`None` when the device-written
/// consumer index is impossible) and `threshold` the device-written
/// reqCallThreshold: an impossible index or a zero threshold means "kick".
///
/// [`Rings::device_pending_requests`]: super::ring::Rings::device_pending_requests
pub fn kick_needed(
    bell: Doorbell,
    threshold_mode: bool,
    pending: Option<u32>,
    threshold: u32,
) -> bool {
    if bell == Doorbell::NonReadWrite || !threshold_mode || threshold == 0 {
        return true;
    }
    pending.is_none_or(|waiting| waiting >= threshold)
}

/// 32-bit register access: what the typed accessor needs from the
/// project's register map (and what a test's fake provides).
pub trait Reg32 {
    /// Reads the 32-bit register at `off`.
    fn read32(&self, off: usize) -> u32;
    /// Writes the 32-bit register at `off`.
    fn write32(&self, off: usize, v: u32);
}

impl Reg32 for crate::ddi::regs::RegMap {
    fn read32(&self, off: usize) -> u32 {
        crate::ddi::regs::RegMap::read32(self, off)
    }
    fn write32(&self, off: usize, v: u32) {
        crate::ddi::regs::RegMap::write32(self, off, v)
    }
}

/// The pvscsi register window, typed. Every method is one register
/// access (a VM exit) except [`Regs::issue`], which is 2 + payload length.
pub struct Regs<R> {
    map: R,
}

impl<R: Reg32> Regs<R> {
    /// Wraps a mapping of BAR 0 (at least [`BAR_SIZE`] bytes).
    pub fn new(map: R) -> Self {
        Regs { map }
    }

    /// The underlying mapping.
    pub fn map(&self) -> &R {
        &self.map
    }

    /// Runs a command: the number, then every payload dword, then reads
    /// COMMAND_STATUS. Bounded: at most [`MAX_PAYLOAD_DWORDS`] writes.
    pub fn issue(&self, cmd: &Command<'_>) -> Result<CommandStatus, CommandError> {
        let payload = cmd.encode()?;
        self.map.write32(REG_COMMAND, cmd.number() as u32);
        for &d in payload.as_slice() {
            self.map.write32(REG_COMMAND_DATA, d);
        }
        Ok(CommandStatus::from_raw(self.map.read32(REG_COMMAND_STATUS)))
    }

    /// Feature detection (header note on SETUP_MSG_RING): writes only the
    /// command number and reads the status; the device then waits for a
    /// payload, which the caller must send ([`Regs::send_payload`]) or
    /// abandon by writing another command.
    pub fn probe(&self, number: CommandNumber) -> CommandStatus {
        self.map.write32(REG_COMMAND, number as u32);
        CommandStatus::from_raw(self.map.read32(REG_COMMAND_STATUS))
    }

    /// The payload of `cmd` after a [`Regs::probe`] of its number.
    pub fn send_payload(&self, cmd: &Command<'_>) -> Result<CommandStatus, CommandError> {
        let payload = cmd.encode()?;
        for &d in payload.as_slice() {
            self.map.write32(REG_COMMAND_DATA, d);
        }
        Ok(CommandStatus::from_raw(self.map.read32(REG_COMMAND_STATUS)))
    }

    /// INTR_STATUS, masked to the bits the interface defines.
    pub fn intr_status(&self) -> u32 {
        self.map.read32(REG_INTR_STATUS) & INTR_ALL_SUPPORTED
    }

    /// Acknowledges `bits` (write-1-to-clear).
    pub fn ack_intr(&self, bits: u32) {
        self.map.write32(REG_INTR_STATUS, bits & INTR_ALL_SUPPORTED)
    }

    /// Writes INTR_MASK (0 to mask everything; QEMU keeps it across an
    /// adapter reset, so attach and detach write it explicitly).
    pub fn set_intr_mask(&self, bits: u32) {
        self.map.write32(REG_INTR_MASK, bits & INTR_ALL_SUPPORTED)
    }

    /// Reads INTR_MASK.
    pub fn intr_mask(&self) -> u32 {
        self.map.read32(REG_INTR_MASK)
    }

    /// Rings a doorbell (the value is ignored by the device).
    pub fn kick(&self, bell: Doorbell) {
        self.map.write32(bell.register(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use std::vec::Vec;

    /// Records every access; reads return `status` for COMMAND_STATUS.
    struct Fake {
        log: RefCell<Vec<(char, usize, u32)>>,
        status: u32,
    }
    impl Reg32 for Fake {
        fn read32(&self, off: usize) -> u32 {
            self.log.borrow_mut().push(('r', off, 0));
            if off == REG_COMMAND_STATUS {
                self.status
            } else {
                0xffff_ffff
            }
        }
        fn write32(&self, off: usize, v: u32) {
            self.log.borrow_mut().push(('w', off, v));
        }
    }

    fn bytes(p: &Payload) -> Vec<u8> {
        p.as_slice().iter().flat_map(|d| d.to_le_bytes()).collect()
    }

    #[test]
    fn payload_sizes_match_the_header_structures() {
        let ppn = [7u64];
        let cases: [(Command<'_>, usize); 9] = [
            (Command::AdapterReset, 0),
            (Command::ResetBus, 0),
            (Command::GetMaxTargets, 0),
            (
                Command::SetupRings {
                    rings_state_ppn: 1,
                    req_ppns: &ppn,
                    cmp_ppns: &ppn,
                },
                528,
            ),
            (
                Command::ResetDevice {
                    target: 1,
                    lun: LunNumber::ZERO,
                },
                12,
            ),
            (
                Command::AbortCmd {
                    context: 1,
                    target: 0,
                },
                16,
            ),
            (
                Command::Config {
                    cmp_addr: 0,
                    page_addr: 0,
                    page_num: 0,
                },
                24,
            ),
            (Command::SetupMsgRing { ppns: &ppn }, 136),
            (Command::SetupReqCallThreshold { enable: true }, 4),
        ];
        for (c, len) in cases {
            assert_eq!(c.encode().unwrap().byte_len(), len, "{:?}", c.number());
        }
    }

    #[test]
    fn setup_rings_layout() {
        let req = [0x100u64, 0x101];
        let cmp = [0x200u64];
        let p = Command::SetupRings {
            rings_state_ppn: 0x1_0000_0042,
            req_ppns: &req,
            cmp_ppns: &cmp,
        }
        .encode()
        .unwrap();
        let b = bytes(&p);
        assert_eq!(&b[0..4], &2u32.to_le_bytes());
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..16], &0x1_0000_0042u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x100u64.to_le_bytes(), "reqRingPPNs[0]");
        assert_eq!(&b[24..32], &0x101u64.to_le_bytes(), "reqRingPPNs[1]");
        assert_eq!(&b[32..40], &[0; 8], "reqRingPPNs[2] padded");
        assert_eq!(
            &b[16 + 256..16 + 264],
            &0x200u64.to_le_bytes(),
            "cmpRingPPNs[0]"
        );
    }

    #[test]
    fn page_counts_must_be_powers_of_two_in_range() {
        let three = [1u64, 2, 3];
        let many = [0u64; 33];
        for (req, ok) in [
            (&three[..], false),
            (&many[..], false),
            (&[][..], false),
            (&many[..32], true),
        ] {
            let r = Command::SetupRings {
                rings_state_ppn: 0,
                req_ppns: req,
                cmp_ppns: &[1],
            }
            .encode();
            assert_eq!(r.is_ok(), ok, "{} pages", req.len());
        }
        let seventeen = [0u64; 17];
        assert_eq!(
            Command::SetupMsgRing { ppns: &seventeen }.encode(),
            Err(CommandError::BadPageCount { pages: 17 })
        );
        assert!(
            Command::SetupMsgRing {
                ppns: &seventeen[..16]
            }
            .encode()
            .is_ok()
        );
    }

    #[test]
    fn reset_device_and_abort_layouts() {
        let p = Command::ResetDevice {
            target: 64,
            lun: LunNumber::new(3).unwrap(),
        }
        .encode()
        .unwrap();
        assert_eq!(bytes(&p), [64, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Command::ResetDevice {
                target: 0,
                lun: LunNumber::new(256).unwrap()
            }
            .encode(),
            Err(CommandError::LunOutOfRange)
        );
        let p = Command::AbortCmd {
            context: 0x0102_0304_0506_0708,
            target: 9,
        }
        .encode()
        .unwrap();
        assert_eq!(bytes(&p), [8, 7, 6, 5, 4, 3, 2, 1, 9, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn issue_writes_number_then_payload_then_reads_status() {
        let f = Fake {
            log: RefCell::new(Vec::new()),
            status: 0,
        };
        let regs = Regs::new(f);
        let st = regs
            .issue(&Command::AbortCmd {
                context: 5,
                target: 1,
            })
            .unwrap();
        assert_eq!(st, CommandStatus::Done(0));
        let log = regs.map().log.borrow().clone();
        assert_eq!(
            log,
            [
                ('w', REG_COMMAND, 6),
                ('w', REG_COMMAND_DATA, 5),
                ('w', REG_COMMAND_DATA, 0),
                ('w', REG_COMMAND_DATA, 1),
                ('w', REG_COMMAND_DATA, 0),
                ('r', REG_COMMAND_STATUS, 0),
            ]
        );
        // A bad payload writes nothing at all.
        regs.map().log.borrow_mut().clear();
        assert!(regs.issue(&Command::SetupMsgRing { ppns: &[] }).is_err());
        assert!(regs.map().log.borrow().is_empty());
    }

    #[test]
    fn status_decoding() {
        assert_eq!(CommandStatus::from_raw(u32::MAX), CommandStatus::Failed);
        assert_eq!(
            CommandStatus::from_raw(0xFFFF_FFFE),
            CommandStatus::AwaitingData
        );
        assert_eq!(CommandStatus::from_raw(34), CommandStatus::Done(34));
    }

    #[test]
    fn doorbells() {
        for op in [0x08u8, 0x0A, 0x28, 0x2A, 0x88, 0x8A, 0xA8, 0xAA] {
            assert_eq!(doorbell_for(&[op, 0]), Doorbell::ReadWrite, "{op:#x}");
        }
        for op in [0x00u8, 0x12, 0x25, 0x9E, 0xA0, 0x35, 0x2F, 0x8F] {
            assert_eq!(doorbell_for(&[op, 0]), Doorbell::NonReadWrite, "{op:#x}");
        }
        assert_eq!(doorbell_for(&[]), Doorbell::NonReadWrite);
        assert_eq!(Doorbell::ReadWrite.register(), 0x4018);
        assert_eq!(Doorbell::NonReadWrite.register(), 0x3014);
        assert_eq!(
            Doorbell::ReadWrite.merge(Doorbell::NonReadWrite),
            Doorbell::NonReadWrite
        );
        assert_eq!(
            Doorbell::ReadWrite.merge(Doorbell::ReadWrite),
            Doorbell::ReadWrite
        );
    }

    #[test]
    fn threshold_kick_decisions() {
        assert!(kick_needed(Doorbell::NonReadWrite, true, Some(1), 8));
        assert!(kick_needed(Doorbell::ReadWrite, false, Some(1), 8));
        assert!(
            !kick_needed(Doorbell::ReadWrite, true, Some(1), 8),
            "1 waiting < 8"
        );
        assert!(
            kick_needed(Doorbell::ReadWrite, true, Some(8), 8),
            "8 waiting"
        );
        assert!(
            kick_needed(Doorbell::ReadWrite, true, None, 8),
            "impossible index"
        );
        assert!(
            kick_needed(Doorbell::ReadWrite, true, Some(1), 0),
            "no threshold written"
        );
    }

    #[test]
    fn intr_accessors_mask_to_defined_bits() {
        let f = Fake {
            log: RefCell::new(Vec::new()),
            status: 0,
        };
        let regs = Regs::new(f);
        assert_eq!(
            regs.intr_status(),
            INTR_ALL_SUPPORTED,
            "0xffffffff read masked"
        );
        regs.ack_intr(0xffff_ffff);
        regs.set_intr_mask(INTR_CMPL_MASK | INTR_MSG_MASK);
        regs.kick(Doorbell::ReadWrite);
        let log = regs.map().log.borrow().clone();
        assert_eq!(
            &log[1..],
            &[
                ('w', REG_INTR_STATUS, 0xf),
                ('w', REG_INTR_MASK, 0xf),
                ('w', REG_KICK_RW_IO, 0)
            ]
        );
    }
}
