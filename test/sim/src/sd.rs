//! An sd(4D)-like target driver for the test bed: what sd asks of an HBA at
//! attach (capabilities, then TEST UNIT READY with the power-on unit
//! attention, INQUIRY with VPD pages, READ CAPACITY(10)/(16), MODE SENSE,
//! START STOP UNIT), and block I/O with sd's habits: transfers cut at the
//! HBA's `dma-max`, partial DMA windows (`PKT_DMA_PARTIAL`) each sent as
//! its own READ/WRITE, retries of unit attentions and transport errors,
//! and sd's completion routine's resets (see [`Recovery`]): like sdintr,
//! it calls `scsi_reset(9F)` from the completion callback, which runs
//! where `scsi_hba_pkt_comp` is called (the HBA's interrupt handler:
//! scsi_hba.c `scsi_hba_pkt_comp` calls `pkt_comp` directly).

use crate::scsi::{self, key};
use rvscsi::ffi;
use rvscsi::scsa::{PktFlags, PktState, PktStatistics};
use rvscsi_emu::{DataBuf, Device, InitArgs, Packet, PktResult, TargetDriver, TargetInstance};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a command may take (sd's default `sd_io_time`).
pub const IO_TIME: i32 = 60;
/// Retries of a failing command (sd's `sd_retry_count` is 5 for most).
pub const RETRIES: u32 = 5;

/// `CMD_UNX_BUS_FREE` (sys/scsi/scsi_pkt.h).
const CMD_UNX_BUS_FREE: u8 = 20;
/// `CMD_TAG_REJECT` (sys/scsi/scsi_pkt.h).
const CMD_TAG_REJECT: u8 = 21;

/// The resets sd's completion routine makes, and what it did.
///
/// sd.c: sdintr sends `CMD_INCOMPLETE` (unless only `STATE_GOT_BUS`),
/// `CMD_TRAN_ERR` (unless `STAT_PERR` or only `STATE_GOT_BUS`),
/// `CMD_RESET`, `CMD_ABORTED`, `CMD_TIMEOUT` and every reason it has no
/// case for (`sd_pkt_reason_default`) to `sd_reset_target`, in the
/// completion routine itself; `CMD_DEV_GONE`, `CMD_UNX_BUS_FREE` and
/// `CMD_TAG_REJECT` reset nothing. `sd_reset_target` does nothing if the
/// packet says the transport already reset or aborted (`STAT_BUS_RESET`,
/// `STAT_DEV_RESET`, `STAT_ABORTED`); otherwise, with
/// `un_f_allow_bus_device_reset` (property "allow-bus-device-reset",
/// default 1), `scsi_reset(RESET_LUN)` if `un_f_lun_reset_enabled`, then
/// `RESET_TARGET` if that returned 0, and `RESET_ALL` if all returned 0
/// (or bus-device resets are not allowed). sd calls `scsi_abort(9F)` only
/// from the `DKIOCABORT` debug ioctl, not from its completion routine.
///
/// `STATUS_BUSY` (sd.c `sd_pkt_status_busy`, also in the completion
/// routine): on the completion where the command's retry count reaches
/// `max(2, un_reset_retry_count)` (`un_reset_retry_count` is
/// `un_retry_count / 2`), the same ladder (without the statistics test),
/// and if RESET_LUN, RESET_TARGET and RESET_ALL all returned 0, sd gives
/// up: the command fails with EIO (`sd_return_failed_command`), no retry
/// (here [`IoError::ResetFailed`]). Each retry here is a new packet, so
/// the try number stands for `xb_retry_count` (every earlier try having
/// failed busy too, as when a device stays busy).
///
/// Not modelled: the resets of `sd_sense_key_medium_or_hardware_error`
/// (after `un_reset_retry_count` retries of a medium or hardware error).
pub struct Recovery {
    /// `un_f_allow_bus_device_reset`.
    pub allow_bus_device_reset: AtomicBool,
    /// `un_f_lun_reset_enabled`: off, as in sd, unless sd.conf sets
    /// "reset-lun" to "true" (sd.c `sd_set_properties`); a test opts in.
    /// So sd's default first step is RESET_TARGET.
    pub lun_reset_enabled: AtomicBool,
    /// `scsi_reset` calls from the completion routine: `RESET_LUN`,
    /// `RESET_TARGET`, `RESET_ALL`.
    pub resets: [AtomicU64; 3],
    /// How many of those returned 1.
    pub resets_done: [AtomicU64; 3],
    /// Completion routines run.
    pub completions: AtomicU64,
    /// Completion routines that ran in interrupt context
    /// (`servicing_interrupt()` true).
    pub in_interrupt: AtomicU64,
    /// `sd_reset_target` calls made in interrupt context.
    pub interrupt_resets: AtomicU64,
    /// `sd_pkt_status_busy` resets (the ladder run on a busy command).
    pub busy_resets: AtomicU64,
    /// Of those, the ones where every reset returned 0: the command failed
    /// with EIO.
    pub busy_failures: AtomicU64,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            allow_bus_device_reset: AtomicBool::new(true),
            lun_reset_enabled: AtomicBool::new(false),
            resets: Default::default(),
            resets_done: Default::default(),
            completions: AtomicU64::new(0),
            in_interrupt: AtomicU64::new(0),
            interrupt_resets: AtomicU64::new(0),
            busy_resets: AtomicU64::new(0),
            busy_failures: AtomicU64::new(0),
        }
    }
}

impl Recovery {
    /// Whether sdintr's handling of `r` calls `sd_reset_target`, and that
    /// resets (sd.c, see [`Recovery`]).
    pub fn wants_reset(r: &PktResult) -> bool {
        let by_reason = match r.reason {
            ffi::CMD_CMPLT | ffi::CMD_DEV_GONE | CMD_UNX_BUS_FREE | CMD_TAG_REJECT => false,
            ffi::CMD_INCOMPLETE => r.state != PktState::GOT_BUS,
            ffi::CMD_TRAN_ERR => {
                !r.statistics.contains(PktStatistics::PERR) && r.state != PktState::GOT_BUS
            }
            // CMD_RESET, CMD_ABORTED, CMD_TIMEOUT, and the default case.
            _ => true,
        };
        by_reason
            && !r.statistics.intersects(
                PktStatistics::BUS_RESET | PktStatistics::DEV_RESET | PktStatistics::ABORTED,
            )
    }

    /// The try (0 first) whose busy completion makes
    /// `sd_pkt_status_busy` reset: the one that brings the retry count to
    /// `max(2, un_reset_retry_count)`, `un_reset_retry_count` being
    /// `un_retry_count / 2` (sd.c `sd_unit_attach`).
    pub const BUSY_RESET_TRY: u32 = if RETRIES / 2 < 2 { 2 } else { RETRIES / 2 } - 1;

    /// The reset ladder of `sd_reset_target` and `sd_pkt_status_busy`,
    /// from the completion routine; whether a reset returned 1.
    fn reset_target(&self, dev: &Device) -> bool {
        let reset = |level: i32, slot: usize| {
            self.resets[slot].fetch_add(1, Ordering::Relaxed);
            let rc = dev.reset(level);
            if rc == 1 {
                self.resets_done[slot].fetch_add(1, Ordering::Relaxed);
            }
            rc
        };
        let mut rc = 0;
        if self.allow_bus_device_reset.load(Ordering::Relaxed) {
            if self.lun_reset_enabled.load(Ordering::Relaxed) {
                rc = reset(ffi::RESET_LUN, 0);
            }
            if rc == 0 {
                rc = reset(ffi::RESET_TARGET, 1);
            }
        }
        if rc == 0 {
            rc = reset(ffi::RESET_ALL, 2);
        }
        rc != 0
    }

    /// The completion callback (sdintr's part that concerns the HBA).
    fn completion(self: &Arc<Self>) -> rvscsi_emu::scsa::packet::Callback {
        self.completion_of_try(0, Arc::new(AtomicBool::new(false)))
    }

    /// [`Self::completion`] for try `attempt` of a command; `failed` is
    /// set when sd gives the command up with EIO (see [`Recovery`]).
    fn completion_of_try(
        self: &Arc<Self>,
        attempt: u32,
        failed: Arc<AtomicBool>,
    ) -> rvscsi_emu::scsa::packet::Callback {
        let me = self.clone();
        Arc::new(move |p: &Packet| {
            me.completions.fetch_add(1, Ordering::Relaxed);
            let interrupt = rvscsi_emu::ddi::cpu::servicing_interrupt() != 0;
            if interrupt {
                me.in_interrupt.fetch_add(1, Ordering::Relaxed);
            }
            let r = p.result();
            if Recovery::wants_reset(&r) {
                if interrupt {
                    me.interrupt_resets.fetch_add(1, Ordering::Relaxed);
                }
                me.reset_target(p.device());
            } else if r.reason == ffi::CMD_CMPLT
                && r.status() & ffi::STATUS_MASK == ffi::STATUS_BUSY
                && attempt == Self::BUSY_RESET_TRY
            {
                me.busy_resets.fetch_add(1, Ordering::Relaxed);
                if interrupt {
                    me.interrupt_resets.fetch_add(1, Ordering::Relaxed);
                }
                if !me.reset_target(p.device()) {
                    me.busy_failures.fetch_add(1, Ordering::Relaxed);
                    failed.store(true, Ordering::Release);
                }
            }
        })
    }

    /// Resets made so far at `level` (`RESET_LUN`, `RESET_TARGET`,
    /// `RESET_ALL`): (calls, returned 1).
    pub fn resets_at(&self, level: i32) -> (u64, u64) {
        let slot = match level {
            ffi::RESET_LUN => 0,
            ffi::RESET_TARGET => 1,
            _ => 2,
        };
        (
            self.resets[slot].load(Ordering::Relaxed),
            self.resets_done[slot].load(Ordering::Relaxed),
        )
    }
}

/// One command of the attach sequence and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// The command's name.
    pub command: String,
    /// "GOOD", "CHECK CONDITION UNIT ATTENTION 29/00", "CMD_DEV_GONE"...
    pub outcome: String,
}

/// Why an I/O failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoError {
    /// CHECK CONDITION with this sense (after retries).
    Check {
        /// Sense key.
        key: u8,
        /// Additional sense code.
        asc: u8,
        /// Qualifier.
        ascq: u8,
        /// First block of the failing command.
        lba: u64,
    },
    /// A SCSI status other than GOOD and CHECK CONDITION.
    Status {
        /// The status byte.
        status: u8,
        /// First block.
        lba: u64,
    },
    /// The transport failed (`pkt_reason`).
    Transport {
        /// `CMD_*`
        reason: u8,
        /// `pkt_statistics`
        statistics: u32,
        /// First block.
        lba: u64,
    },
    /// `tran_start` refused the packet (`TRAN_BADPKT`, `TRAN_FATAL_ERROR`).
    Refused(i32),
    /// The device is gone (`CMD_DEV_GONE`).
    Gone,
    /// The packet could not be allocated or bound.
    NoPacket(String),
    /// The completion never came.
    Hung,
    /// A request the disk cannot take (beyond its end, not whole blocks).
    Invalid(String),
    /// The device stayed busy and every reset sd tried returned 0: sd
    /// fails the command with EIO (`sd_pkt_status_busy`).
    ResetFailed {
        /// First block.
        lba: u64,
    },
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Check {
                key,
                asc,
                ascq,
                lba,
            } => {
                write!(
                    f,
                    "I/O error at block {lba}: {} (ASC {asc:#04x} ASCQ {ascq:#04x})",
                    scsi::key_name(*key)
                )
            }
            IoError::Status { status, lba } => {
                write!(f, "I/O error at block {lba}: SCSI status {status:#04x}")
            }
            IoError::Transport {
                reason,
                statistics,
                lba,
            } => {
                write!(
                    f,
                    "I/O error at block {lba}: transport failure (pkt_reason {reason}, statistics {statistics:#x})"
                )
            }
            IoError::Refused(rc) => write!(f, "the HBA refused the command (tran_start {rc})"),
            IoError::Gone => write!(f, "the device is gone"),
            IoError::NoPacket(why) => write!(f, "no packet: {why}"),
            IoError::Hung => write!(f, "the command never completed"),
            IoError::Invalid(why) => write!(f, "invalid request: {why}"),
            IoError::ResetFailed { lba } => write!(
                f,
                "I/O error at block {lba} (EIO): device busy, and every reset failed"
            ),
        }
    }
}

impl std::error::Error for IoError {}

/// A short description of a packet's outcome.
pub fn describe(r: &PktResult) -> String {
    if r.reason != ffi::CMD_CMPLT {
        return format!(
            "pkt_reason {} statistics {:#x}",
            r.reason,
            r.statistics.bits()
        );
    }
    match r.status() & ffi::STATUS_MASK {
        ffi::STATUS_GOOD => "GOOD".into(),
        ffi::STATUS_CHECK => match r.sense().as_deref().and_then(scsi::decode_sense) {
            Some((k, a, q)) => format!("CHECK CONDITION {} {a:02X}/{q:02X}", scsi::key_name(k)),
            None => "CHECK CONDITION (no sense)".into(),
        },
        s => format!("status {s:#04x}"),
    }
}

/// A disk the target driver attached to.
pub struct Disk {
    /// The LUN.
    pub dev: Arc<Device>,
    /// INQUIRY vendor.
    pub vendor: String,
    /// INQUIRY product.
    pub product: String,
    /// INQUIRY revision.
    pub revision: String,
    /// Capacity in blocks.
    pub blocks: u64,
    /// Block size.
    pub block_size: u32,
    /// Largest transfer per command (from `dma-max`, whole blocks).
    pub max_xfer: usize,
    /// Longest CDB (from `max-cdb-length`).
    pub max_cdb: usize,
    /// Tagged queueing accepted (`setcap tagged-qing 1` returned 1).
    pub tagged: bool,
    /// Unit serial number (VPD 0x80).
    pub serial: Option<String>,
    /// Write cache enabled (MODE SENSE caching page).
    pub write_cache: Option<bool>,
    /// What attach sent and got.
    pub trace: Vec<TraceEntry>,
    gone: AtomicBool,
    /// Commands sent.
    pub commands: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
    /// What the completion routine does about failures, and did.
    pub recovery: Arc<Recovery>,
    /// `pkt_time` of reads and writes (sd's `sd_io_time`, [`IO_TIME`]).
    io_time: AtomicI32,
    /// The `/dev/dsk` name devfsadm gives it (see [`Disk::name`]).
    dev_name: String,
}

/// The outcome of one command.
pub struct Outcome {
    /// How the packet ended.
    pub result: PktResult,
}

impl Disk {
    /// The disk's name as format(8) shows it, `c0t<target>d<lun>`, as
    /// devfsadm names the `/dev/dsk` links of the `DDI_NT_BLOCK_CHAN` minor
    /// nodes sd makes under an HBA of the parallel interconnect type
    /// (`usr/src/cmd/devfsadm/disk_link.c`, `disk_callback_chan`):
    /// `sscanf(unit address, "%X,%X")` into two `uint_t`s, printed
    /// `"t%dd%d"`, both in decimal. The scan keeps the low 32 bits of each
    /// number (see [`devfsadm_chan_name`]), so every flat-space LUN
    /// (`lun64` `0x4HHLL000_00000000`) is `d0` and shares LUN 0's name;
    /// devfsadm then points the link at whichever node it made it for last
    /// (`devfsadm.c`, `create_link_common` replaces a link to another node).
    pub fn name(&self) -> String {
        self.dev_name.clone()
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }

    /// Whether the LUN went away.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Sets the `pkt_time` of reads and writes (sd's `sd_io_time` tunable).
    pub fn set_io_time(&self, seconds: i32) {
        self.io_time.store(seconds, Ordering::Relaxed);
    }

    /// Sends `cdb` once (interrupt-driven, as sd does), with `data`.
    pub fn command_once(
        dev: &Arc<Device>,
        cdb: &[u8],
        data: Option<Arc<DataBuf>>,
        time: i32,
    ) -> Result<Outcome, IoError> {
        Self::send_once(dev, cdb, data, time, None)
    }

    /// [`Self::command_once`] with sd's completion routine (`recovery`).
    fn send_once(
        dev: &Arc<Device>,
        cdb: &[u8],
        data: Option<Arc<DataBuf>>,
        time: i32,
        recovery: Option<&Arc<Recovery>>,
    ) -> Result<Outcome, IoError> {
        let args = InitArgs {
            cmdlen: cdb.len(),
            ..InitArgs::default()
        };
        let mut p = dev
            .init_pkt(data, args)
            .map_err(|e| IoError::NoPacket(format!("{e:?}")))?;
        p.cdb_mut().copy_from_slice(cdb);
        p.set_time(time);
        p.set_flags(PktFlags::STAG);
        if let Some(r) = recovery {
            p.set_callback(Some(r.completion()));
        }
        let rc = p.transport();
        if rc != ffi::TRAN_ACCEPT {
            p.destroy();
            return Err(if rc == ffi::TRAN_BUSY {
                IoError::NoPacket("TRAN_BUSY".into())
            } else {
                IoError::Refused(rc)
            });
        }
        if !p.wait(Duration::from_secs(time.max(1) as u64 * 3 + 60)) {
            // Cannot free a packet the HBA still has: leak it (the bed
            // reports the violation).
            std::mem::forget(p);
            return Err(IoError::Hung);
        }
        let result = p.result();
        p.destroy();
        Ok(Outcome { result })
    }

    /// Sends `cdb` with sd's retry rules; `lba` names the failing block in
    /// errors. The data buffer is rebuilt by `make_data` for each try.
    fn command(
        &self,
        cdb: &[u8],
        make_data: &dyn Fn() -> Option<Arc<DataBuf>>,
        lba: u64,
    ) -> Result<Outcome, IoError> {
        command_with_retries(
            &self.dev,
            cdb,
            make_data,
            lba,
            &self.commands,
            &self.retries,
            &self.recovery,
        )
    }

    fn check_range(&self, lba: u64, bytes: usize) -> Result<u64, IoError> {
        let bs = u64::from(self.block_size);
        if !(bytes as u64).is_multiple_of(bs) {
            return Err(IoError::Invalid(format!(
                "{bytes} bytes is not a whole number of {bs}-byte blocks"
            )));
        }
        let n = bytes as u64 / bs;
        if lba.checked_add(n).is_none_or(|end| end > self.blocks) {
            return Err(IoError::Invalid(format!(
                "blocks {lba}..{} beyond the end ({} blocks)",
                lba + n,
                self.blocks
            )));
        }
        Ok(n)
    }

    /// Reads `len` bytes from block `lba`.
    pub fn read(&self, lba: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.check_range(lba, len)?;
        let mut out = Vec::with_capacity(len);
        let chunk = self.max_xfer.max(self.block_size as usize);
        let mut done = 0usize;
        while done < len {
            let n = chunk.min(len - done);
            let at = lba + (done / self.block_size as usize) as u64;
            out.extend_from_slice(&self.transfer(false, at, n, None)?);
            done += n;
        }
        Ok(out)
    }

    /// Writes `data` at block `lba`.
    pub fn write(&self, lba: u64, data: &[u8]) -> Result<(), IoError> {
        self.check_range(lba, data.len())?;
        let chunk = self.max_xfer.max(self.block_size as usize);
        for (i, piece) in data.chunks(chunk).enumerate() {
            let at = lba + ((i * chunk) / self.block_size as usize) as u64;
            self.transfer(true, at, piece.len(), Some(piece))?;
        }
        Ok(())
    }

    /// One buffer's worth: a packet bound with `PKT_DMA_PARTIAL`, one
    /// READ/WRITE per DMA window (sd_setup_next_rw_pkt), retried per sd.
    fn transfer(
        &self,
        write: bool,
        lba: u64,
        len: usize,
        src: Option<&[u8]>,
    ) -> Result<Vec<u8>, IoError> {
        let bs = self.block_size as usize;
        for attempt in 0..=RETRIES {
            let data = Arc::new(DataBuf::new(len, 0, !write));
            if let Some(s) = src {
                data.bytes_mut().copy_from_slice(s);
            }
            let args = InitArgs {
                cmdlen: 16.min(self.max_cdb).max(10),
                flags: ffi::PKT_DMA_PARTIAL,
                ..InitArgs::default()
            };
            let mut p = self
                .dev
                .init_pkt(Some(data.clone()), args)
                .map_err(|e| IoError::NoPacket(format!("{e:?}")))?;
            let given_up = Arc::new(AtomicBool::new(false));
            p.set_callback(Some(
                self.recovery.completion_of_try(attempt, given_up.clone()),
            ));
            let mut failure = None;
            let mut window_lba = lba;
            loop {
                let (wlen, _) = p.window_extent();
                if wlen % bs != 0 {
                    failure = Some(IoError::Invalid(format!(
                        "a DMA window of {wlen} bytes is not whole blocks"
                    )));
                    break;
                }
                let blocks = (wlen / bs) as u32;
                let Some(cdb) = scsi::rw(write, window_lba, blocks, self.max_cdb) else {
                    failure = Some(IoError::Invalid("no CDB can express this request".into()));
                    break;
                };
                let cdb_len = p.cdb_mut().len();
                let c = p.cdb_mut();
                c.fill(0);
                c[..cdb.len().min(cdb_len)].copy_from_slice(&cdb[..cdb.len().min(cdb_len)]);
                p.set_time(self.io_time.load(Ordering::Relaxed));
                p.set_flags(PktFlags::STAG);
                self.commands.fetch_add(1, Ordering::Relaxed);
                let rc = p.transport();
                if rc != ffi::TRAN_ACCEPT {
                    failure = Some(if rc == ffi::TRAN_BUSY {
                        IoError::NoPacket("TRAN_BUSY".into())
                    } else {
                        IoError::Refused(rc)
                    });
                    break;
                }
                let limit = self.io_time.load(Ordering::Relaxed).max(1) as u64;
                if !p.wait(Duration::from_secs(limit * 3 + 60)) {
                    std::mem::forget(p);
                    return Err(IoError::Hung);
                }
                let r = p.result();
                if given_up.load(Ordering::Acquire) {
                    failure = Some(IoError::ResetFailed { lba: window_lba });
                    break;
                }
                if let Some(e) = classify(&r, window_lba) {
                    failure = Some(e);
                    break;
                }
                if r.resid != 0 {
                    failure = Some(IoError::Transport {
                        reason: r.reason,
                        statistics: r.statistics.bits(),
                        lba: window_lba,
                    });
                    break;
                }
                window_lba += u64::from(blocks);
                if p.next_window().is_err() {
                    break;
                }
            }
            p.destroy();
            match failure {
                None => {
                    return Ok(if write {
                        Vec::new()
                    } else {
                        data.bytes().to_vec()
                    });
                }
                Some(e) if attempt < RETRIES && retryable(&e) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(
                        if matches!(e, IoError::NoPacket(_)) {
                            10
                        } else {
                            50
                        },
                    ));
                }
                Some(e) => return Err(e),
            }
        }
        Err(IoError::Hung)
    }

    /// SYNCHRONIZE CACHE.
    pub fn sync_cache(&self) -> Result<(), IoError> {
        self.command(&scsi::synchronize_cache(), &|| None, 0)
            .map(|_| ())
    }
}

/// An error for a completed packet, if it failed.
pub fn classify(r: &PktResult, lba: u64) -> Option<IoError> {
    if r.reason == ffi::CMD_DEV_GONE {
        return Some(IoError::Gone);
    }
    if r.reason != ffi::CMD_CMPLT {
        return Some(IoError::Transport {
            reason: r.reason,
            statistics: r.statistics.bits(),
            lba,
        });
    }
    match r.status() & ffi::STATUS_MASK {
        ffi::STATUS_GOOD => None,
        ffi::STATUS_CHECK => {
            let (k, a, q) = r
                .sense()
                .as_deref()
                .and_then(scsi::decode_sense)
                .unwrap_or((key::NO_SENSE, 0, 0));
            Some(IoError::Check {
                key: k,
                asc: a,
                ascq: q,
                lba,
            })
        }
        s => Some(IoError::Status { status: s, lba }),
    }
}

/// Whether sd would try a failed command again.
pub fn retryable(e: &IoError) -> bool {
    match e {
        IoError::Check { key, asc, .. } => {
            matches!(
                *key,
                key::UNIT_ATTENTION
                    | key::ABORTED_COMMAND
                    | key::MEDIUM_ERROR
                    | key::HARDWARE_ERROR
            ) || (*key == key::NOT_READY && *asc == 0x04)
        }
        IoError::Status { status, .. } => {
            *status == ffi::STATUS_BUSY || *status == ffi::STATUS_QFULL
        }
        IoError::Transport { reason, .. } => *reason != ffi::CMD_DEV_GONE,
        IoError::NoPacket(why) => why == "TRAN_BUSY",
        _ => false,
    }
}

fn command_with_retries(
    dev: &Arc<Device>,
    cdb: &[u8],
    make_data: &dyn Fn() -> Option<Arc<DataBuf>>,
    lba: u64,
    commands: &AtomicU64,
    retries: &AtomicU64,
    recovery: &Arc<Recovery>,
) -> Result<Outcome, IoError> {
    let mut last = IoError::Hung;
    for attempt in 0..=RETRIES {
        commands.fetch_add(1, Ordering::Relaxed);
        match Disk::send_once(dev, cdb, make_data(), IO_TIME, Some(recovery)) {
            Ok(o) => match classify(&o.result, lba) {
                None => return Ok(o),
                Some(e) if attempt < RETRIES && retryable(&e) => last = e,
                Some(e) => return Err(e),
            },
            Err(e) if attempt < RETRIES && retryable(&e) => last = e,
            Err(e) => return Err(e),
        }
        retries.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last)
}

/// What devfsadm's `disk_callback_chan` names a disk at unit address
/// `ua`: `c0t%dd%d` of the two `uint_t`s `sscanf(ua, "%X,%X")` leaves
/// (0 where a conversion fails, as they are initialized).
///
/// illumos libc (`usr/src/lib/libc/port/stdio/doscan.c`): `%X` is `%x`
/// (the conversion letter is lowered; only the obsolete `c_issue_4`
/// compilation mode makes it a `long`); `number()` skips white space,
/// takes an optional sign and `0x`, accumulates the hexadecimal digits in
/// a `long long` and stores `(int)` of it: the low 32 bits. `%d` prints
/// those 32 bits as a signed int.
pub fn devfsadm_chan_name(ua: &str) -> String {
    /// One `%X` conversion: the value stored and the rest of the input,
    /// `None` if no digit matched (sscanf stops there).
    fn scan_hex(s: &str) -> Option<(i32, &str)> {
        let s = s.trim_start();
        let (neg, s) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let s = match s.as_bytes() {
            [b'0', b'x' | b'X', c, ..] if c.is_ascii_hexdigit() => &s[2..],
            _ => s,
        };
        let digits = s.bytes().take_while(u8::is_ascii_hexdigit).count();
        if digits == 0 {
            return None;
        }
        let value = s[..digits].bytes().fold(0i64, |v, c| {
            let d = (c as char).to_digit(16).unwrap_or(0);
            v.wrapping_mul(16).wrapping_add(i64::from(d))
        });
        let value = if neg { value.wrapping_neg() } else { value };
        Some((value as i32, &s[digits..]))
    }
    let (mut targ, mut lun) = (0i32, 0i32);
    if let Some((t, rest)) = scan_hex(ua) {
        targ = t;
        if let Some(rest) = rest.strip_prefix(',')
            && let Some((l, _)) = scan_hex(rest)
        {
            lun = l;
        }
    }
    format!("c0t{targ}d{lun}")
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}

/// The target driver: attaches a [`Disk`] to every direct-access LUN.
#[derive(Default)]
pub struct Sd {
    disks: Mutex<Vec<Arc<Disk>>>,
}

impl Sd {
    /// A target driver with no disks yet.
    pub fn new() -> Arc<Sd> {
        Arc::new(Sd::default())
    }

    /// The attached disks, by target and LUN.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        let mut d = self.disks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        d.sort_by_key(|d| (d.dev.target, d.dev.lun));
        d
    }

    /// The disk at `target`/`lun`.
    pub fn disk(&self, target: u32, lun: u64) -> Option<Arc<Disk>> {
        self.disks()
            .into_iter()
            .find(|d| d.dev.target == target && d.dev.lun == lun)
    }

    /// The disk a `/dev/dsk` name leads to: of the disks devfsadm gives
    /// that name ([`Disk::name`]), the one attached last, whose link
    /// replaced the others' (`devfsadm.c`, `create_link_common`). (Once
    /// that one goes, devfsadm leaves no link to the others; here an
    /// earlier one is found again.)
    pub fn disk_named(&self, name: &str) -> Option<Arc<Disk>> {
        self.disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|d| d.name() == name)
            .cloned()
    }

    fn attach_disk(dev: Arc<Device>, inq: &[u8]) -> Result<Disk, String> {
        if inq.len() < 36 {
            return Err("short INQUIRY data".into());
        }
        if inq[0] & 0x1f != 0 {
            return Err(format!(
                "peripheral device type {:#x} is not a disk",
                inq[0] & 0x1f
            ));
        }
        let mut trace = Vec::new();
        let commands = AtomicU64::new(0);
        let retries = AtomicU64::new(0);
        let recovery = Arc::new(Recovery::default());
        // Capabilities, in sd_unit_attach's order.
        dev.setcap("lun-reset", 0, 1);
        dev.setcap("wide-xfer", 0, 1);
        dev.setcap("auto-rqsense", 0, 1);
        dev.setcap("tagged-qing", 0, 1);
        let _interconnect = dev.getcap("interconnect-type", -1);
        dev.setcap("auto-rqsense", 1, 1);
        if dev.getcap("auto-rqsense", 1) != 1 {
            return Err("the HBA does not do auto request sense".into());
        }
        let max_cdb = match dev.getcap("max-cdb-length", 1) {
            n if n <= 0 => 16,
            n => (n as usize).min(16),
        };
        let cmdque = inq[7] & 0x02 != 0;
        let tagged = cmdque && dev.setcap("tagged-qing", 1, 1) == 1;
        dev.setcap("lun-reset", 1, 1);
        let dma_max = dev.getcap("dma-max", 1);
        // TEST UNIT READY: the first one gets the power-on unit attention.
        let mut traced = |cdb: Vec<u8>, len: usize| -> Result<Option<Vec<u8>>, IoError> {
            let data = (len > 0).then(|| Arc::new(DataBuf::new(len, 0, true)));
            commands.fetch_add(1, Ordering::Relaxed);
            let o = Disk::send_once(&dev, &cdb, data.clone(), IO_TIME, Some(&recovery))?;
            trace.push(TraceEntry {
                command: scsi::name(&cdb).into(),
                outcome: describe(&o.result),
            });
            match classify(&o.result, 0) {
                None => Ok(data.map(|d| {
                    d.bytes()[..len - o.result.resid.clamp(0, len as isize) as usize].to_vec()
                })),
                Some(e) => Err(e),
            }
        };
        for _ in 0..=RETRIES {
            match traced(scsi::test_unit_ready(), 0) {
                Ok(_) => break,
                Err(IoError::Check {
                    key: key::UNIT_ATTENTION,
                    ..
                }) => continue,
                Err(IoError::Check {
                    key: key::NOT_READY,
                    ..
                }) => {
                    let _ = traced(scsi::start_unit(), 0);
                }
                Err(e) => return Err(format!("TEST UNIT READY: {e}")),
            }
        }
        let _ = traced(scsi::inquiry(None, 96), 96);
        let vpd_list = traced(scsi::inquiry(Some(0), 255), 255)
            .ok()
            .flatten()
            .unwrap_or_default();
        let pages: Vec<u8> = vpd_list.get(4..).map(|p| p.to_vec()).unwrap_or_default();
        let serial = if pages.contains(&0x80) {
            traced(scsi::inquiry(Some(0x80), 255), 255)
                .ok()
                .flatten()
                .and_then(|d| d.get(4..).map(|s| ascii(s).trim().to_string()))
        } else {
            None
        };
        if pages.contains(&0x83) {
            let _ = traced(scsi::inquiry(Some(0x83), 255), 255);
        }
        let cap10 = traced(scsi::read_capacity_10(), 8)
            .map_err(|e| format!("READ CAPACITY(10): {e}"))?
            .unwrap_or_default();
        if cap10.len() < 8 {
            return Err("short READ CAPACITY(10) data".into());
        }
        let mut last = u64::from(u32::from_be_bytes(cap10[0..4].try_into().unwrap_or([0; 4])));
        let mut bs = u32::from_be_bytes(cap10[4..8].try_into().unwrap_or([0; 4]));
        if last == u64::from(u32::MAX) {
            let cap16 = traced(scsi::read_capacity_16(32), 32)
                .map_err(|e| format!("READ CAPACITY(16): {e}"))?
                .unwrap_or_default();
            if cap16.len() < 12 {
                return Err("short READ CAPACITY(16) data".into());
            }
            last = u64::from_be_bytes(cap16[0..8].try_into().unwrap_or([0; 8]));
            bs = u32::from_be_bytes(cap16[8..12].try_into().unwrap_or([0; 4]));
        }
        if bs == 0 || bs % 512 != 0 {
            return Err(format!("unusable block size {bs}"));
        }
        let write_cache = traced(scsi::mode_sense_6(0x08, 0xff), 255)
            .ok()
            .flatten()
            .and_then(|d| {
                let bdlen = usize::from(*d.get(3)?);
                let page = d.get(4 + bdlen..)?;
                (page.first()? & 0x3f == 0x08).then(|| page.get(2).is_some_and(|b| b & 0x04 != 0))
            });
        let _ = traced(scsi::start_unit(), 0);
        let max_xfer = if dma_max > 0 {
            (dma_max as usize / bs as usize) * bs as usize
        } else {
            1 << 20
        };
        let ua = rvscsi_emu::ddi::devinfo::node(dev.node, "sd attach")
            .and_then(|n| n.unit_address())
            .map(|u| u.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Disk {
            dev_name: devfsadm_chan_name(&ua),
            vendor: ascii(&inq[8..16]),
            product: ascii(&inq[16..32]),
            revision: ascii(&inq[32..36]),
            dev,
            blocks: last + 1,
            block_size: bs,
            max_xfer: max_xfer.max(bs as usize),
            max_cdb,
            tagged,
            serial,
            write_cache,
            trace,
            gone: AtomicBool::new(false),
            commands,
            retries,
            recovery,
            io_time: AtomicI32::new(IO_TIME),
        })
    }
}

struct SdInstance {
    sd: Arc<Sd>,
    disk: Arc<Disk>,
}

impl TargetInstance for SdInstance {
    fn detach(&self) {
        self.disk.gone.store(true, Ordering::Release);
        self.sd
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| !Arc::ptr_eq(d, &self.disk));
    }
}

/// The target driver as the framework sees it.
pub struct SdDriver(pub Arc<Sd>);

impl TargetDriver for SdDriver {
    fn attach(&self, dev: Arc<Device>, inquiry: &[u8]) -> Result<Box<dyn TargetInstance>, String> {
        let disk = Arc::new(Sd::attach_disk(dev, inquiry)?);
        self.0
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(disk.clone());
        Ok(Box::new(SdInstance {
            sd: self.0.clone(),
            disk,
        }))
    }
}
