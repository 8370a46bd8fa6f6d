//! The virtio-scsi device configuration (virtio 1.2 §5.6.4) and the limits
//! the driver derives from it. A device can report anything here; every
//! value is checked or clamped before it sizes an allocation or a loop.

use crate::virtio::pci::Transport;

/// Offsets in `struct virtio_scsi_config` (§5.6.4).
pub(crate) mod off {
    pub const NUM_QUEUES: usize = 0;
    pub const SEG_MAX: usize = 4;
    pub const MAX_SECTORS: usize = 8;
    pub const CMD_PER_LUN: usize = 12;
    pub const EVENT_INFO_SIZE: usize = 16;
    pub const SENSE_SIZE: usize = 20;
    pub const CDB_SIZE: usize = 24;
    pub const MAX_CHANNEL: usize = 28;
    pub const MAX_TARGET: usize = 30;
    pub const MAX_LUN: usize = 32;
}

/// Bytes of device configuration the driver reads.
pub const CONFIG_LEN: usize = 36;

/// The device configuration as read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Request queues.
    pub num_queues: u32,
    /// Data segments per command.
    pub seg_max: u32,
    /// Largest transfer in 512-byte sectors (a hint).
    pub max_sectors: u32,
    /// Commands per LUN (a hint, virtio 1.2 §5.6.4). Read and not
    /// enforced: SCSA gives an HBA no way to hand sd a queue depth (sd's
    /// throttle comes from sd.conf and from QUEUE FULL status), and
    /// refusing commands below the ring's capacity would only turn into
    /// TRAN_BUSY retries. The ring is the limit: with indirect descriptors
    /// every command takes one slot, and TRAN_BUSY means the ring is full.
    pub cmd_per_lun: u32,
    /// Size of an event the device fills.
    pub event_info_size: u32,
    /// Sense bytes the device returns.
    pub sense_size: u32,
    /// CDB bytes the device reads.
    pub cdb_size: u32,
    /// Highest channel (always 0).
    pub max_channel: u16,
    /// Highest target.
    pub max_target: u16,
    /// Highest LUN.
    pub max_lun: u32,
}

impl DeviceConfig {
    /// Reads the configuration (a consistent snapshot on modern devices).
    pub fn read(t: &Transport) -> Self {
        t.read_config(|t| DeviceConfig {
            num_queues: t.config32(off::NUM_QUEUES),
            seg_max: t.config32(off::SEG_MAX),
            max_sectors: t.config32(off::MAX_SECTORS),
            cmd_per_lun: t.config32(off::CMD_PER_LUN),
            event_info_size: t.config32(off::EVENT_INFO_SIZE),
            sense_size: t.config32(off::SENSE_SIZE),
            cdb_size: t.config32(off::CDB_SIZE),
            max_channel: t.config16(off::MAX_CHANNEL),
            max_target: t.config16(off::MAX_TARGET),
            max_lun: t.config32(off::MAX_LUN),
        })
    }
}

/// Longest CDB the driver sends (it sizes every request header).
pub const MAX_CDB_SIZE: u32 = 256;
/// Fewest CDB bytes a device must take (a 6-byte CDB).
pub const MIN_CDB_SIZE: u32 = 6;
/// Most sense bytes the driver keeps (`MAX_SENSE_LENGTH`).
pub const MAX_SENSE: u32 = 252;
/// Sense room always provided: fixed-format sense with its additional
/// bytes (SPC-5 §4.4.3). A device that claims less still reports sense
/// (QEMU writes up to the buffer it is given), and without it a target
/// driver cannot tell a unit attention from a failure.
pub const MIN_SENSE: u32 = 32;
/// Most data segments per command: QEMU's virtqueues map at most 1024
/// buffers per chain (VIRTQUEUE_MAX_SIZE), two of which are headers.
pub const MAX_SEGMENTS: u32 = 1022;
/// Most request queues used.
pub const MAX_REQUEST_QUEUES: u32 = crate::hba::io::MAX_REQUEST_QUEUES;
/// max_sectors used when the device reports 0.
pub const DEFAULT_MAX_SECTORS: u32 = 0xffff;
/// Largest event the driver reads.
pub const MAX_EVENT_SIZE: u32 = 64;

/// What the driver will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Request queues to set up.
    pub request_queues: u16,
    /// Data segments per command (`dma_attr_sgllen`).
    pub segments: u32,
    /// Largest transfer in bytes (`dma_attr_maxxfer`, `dma-max`).
    pub max_xfer: u32,
    /// CDB bytes in every request header.
    pub cdb_size: u32,
    /// Sense bytes the driver provides room for.
    pub sense_size: u32,
    /// Size of each event buffer.
    pub event_size: u32,
    /// Highest target probed.
    pub max_target: u8,
    /// Highest LUN accepted.
    pub max_lun: u16,
}

impl Limits {
    /// Derives the limits for request queues of `queue_size` entries. An
    /// error names the value no driver can work with.
    pub fn new(cfg: &DeviceConfig, queue_size: u16) -> Result<Limits, &'static str> {
        if cfg.num_queues == 0 {
            return Err("num_queues is 0");
        }
        if cfg.cdb_size < MIN_CDB_SIZE || cfg.cdb_size > MAX_CDB_SIZE {
            return Err("cdb_size out of range");
        }
        if queue_size < 4 {
            return Err("request queue smaller than 4 entries");
        }
        // A chain carries the request header, the response and the data,
        // and is never longer than the queue (§2.7.5.3.1, §2.7.4.2).
        let chain_room = u32::from(queue_size) - 2;
        let segments = cfg.seg_max.max(1).min(chain_room).min(MAX_SEGMENTS);
        let sectors = if cfg.max_sectors == 0 {
            DEFAULT_MAX_SECTORS
        } else {
            cfg.max_sectors
        };
        let max_xfer = u64::from(sectors) * 512;
        Ok(Limits {
            request_queues: cfg.num_queues.min(MAX_REQUEST_QUEUES) as u16,
            segments,
            max_xfer: max_xfer.min(u64::from(u32::MAX)) as u32,
            cdb_size: cfg.cdb_size,
            sense_size: cfg.sense_size.clamp(MIN_SENSE, MAX_SENSE),
            event_size: cfg
                .event_info_size
                .clamp(super::proto::EVENT_LEN as u32, MAX_EVENT_SIZE),
            max_target: cfg.max_target.min(255) as u8,
            max_lun: cfg.max_lun.min(u32::from(super::proto::MAX_LUN)) as u16,
        })
    }
}

impl Limits {
    /// What SCSA sees of them (the core's limits).
    pub fn scsa(&self) -> crate::hba::Limits {
        crate::hba::Limits {
            segments: self.segments,
            max_xfer: self.max_xfer,
            cdb_size: self.cdb_size,
            sense_size: self.sense_size,
            max_target: self.max_target,
            max_lun: self.max_lun,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu() -> DeviceConfig {
        // What QEMU 10.0.2's virtio-scsi-pci reports (notes/qtest.md).
        DeviceConfig {
            num_queues: 1,
            seg_max: 254,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            event_info_size: 16,
            sense_size: 96,
            cdb_size: 32,
            max_channel: 0,
            max_target: 255,
            max_lun: 16383,
        }
    }

    #[test]
    fn qemu_defaults() {
        let l = Limits::new(&qemu(), 256).unwrap();
        assert_eq!(l.segments, 254, "sgllen = seg_max, not clamped to 128");
        assert_eq!(l.max_xfer, 0xffff * 512);
        assert_eq!((l.cdb_size, l.sense_size, l.event_size), (32, 96, 16));
        assert_eq!((l.max_target, l.max_lun, l.request_queues), (255, 16383, 1));
    }

    #[test]
    fn hostile_values_are_bounded() {
        let mut c = qemu();
        c.num_queues = 0;
        assert!(Limits::new(&c, 256).is_err());
        c = qemu();
        c.cdb_size = 1 << 30;
        assert!(Limits::new(&c, 256).is_err());
        c.cdb_size = 2;
        assert!(Limits::new(&c, 256).is_err());
        c = qemu();
        assert!(Limits::new(&c, 2).is_err());
        c.seg_max = u32::MAX;
        c.sense_size = u32::MAX;
        c.event_info_size = u32::MAX;
        c.max_target = u16::MAX;
        c.max_lun = u32::MAX;
        c.num_queues = u32::MAX;
        c.max_sectors = 0;
        let l = Limits::new(&c, 32768).unwrap();
        assert_eq!(l.segments, MAX_SEGMENTS);
        assert_eq!(l.sense_size, 252);
        assert_eq!(l.event_size, 64);
        assert_eq!((l.max_target, l.max_lun), (255, 0x3fff));
        assert_eq!(l.request_queues, 64);
        assert_eq!(l.max_xfer, 0xffff * 512);
        c.seg_max = 0;
        assert_eq!(Limits::new(&c, 8).unwrap().segments, 1);
        c.sense_size = 0;
        assert_eq!(Limits::new(&c, 8).unwrap().sense_size, MIN_SENSE);
    }
}
