//! virtio over PCI (virtio 1.2 §4.1): the split virtqueue, the legacy and
//! modern transports, feature negotiation. Independent of SCSI.

pub mod pci;
pub mod ring;

use bitflags::bitflags;

/// PCI vendor ID of virtio devices (§4.1.2).
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern PCI device IDs are 0x1040 + the virtio device ID (§4.1.2.1).
pub const VIRTIO_PCI_MODERN_BASE: u16 = 0x1040;
/// Transitional PCI device IDs are 0x1000..=0x103f (§4.1.2.1).
pub const VIRTIO_PCI_TRANSITIONAL_RANGE: core::ops::RangeInclusive<u16> = 0x1000..=0x103f;

bitflags! {
    /// The device status field (§2.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Status: u8 {
        /// The guest has noticed the device.
        const ACKNOWLEDGE = 1;
        /// The guest knows how to drive it.
        const DRIVER = 2;
        /// The driver is ready.
        const DRIVER_OK = 4;
        /// Feature negotiation is complete (modern only).
        const FEATURES_OK = 8;
        /// The device hit an error it cannot recover from without a reset.
        const DEVICE_NEEDS_RESET = 64;
        /// The driver gave up on the device.
        const FAILED = 128;
    }
}

bitflags! {
    /// Feature bits: the transport-level ones (§6) and virtio-scsi's (§5.6.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u64 {
        /// `VIRTIO_SCSI_F_INOUT`: bidirectional commands.
        const SCSI_INOUT = 1 << 0;
        /// `VIRTIO_SCSI_F_HOTPLUG`: hot-plug events on the event queue.
        const SCSI_HOTPLUG = 1 << 1;
        /// `VIRTIO_SCSI_F_CHANGE`: parameter-change events.
        const SCSI_CHANGE = 1 << 2;
        /// `VIRTIO_SCSI_F_T10_PI`: protection information.
        const SCSI_T10_PI = 1 << 3;
        /// `VIRTIO_F_NOTIFY_ON_EMPTY` (legacy).
        const NOTIFY_ON_EMPTY = 1 << 24;
        /// `VIRTIO_F_ANY_LAYOUT` (legacy).
        const ANY_LAYOUT = 1 << 27;
        /// `VIRTIO_F_INDIRECT_DESC` (§2.7.5.3).
        const INDIRECT_DESC = 1 << 28;
        /// `VIRTIO_F_EVENT_IDX` (§2.7.10).
        const EVENT_IDX = 1 << 29;
        /// `VIRTIO_F_VERSION_1`: a virtio 1.x device.
        const VERSION_1 = 1 << 32;
        /// `VIRTIO_F_ACCESS_PLATFORM`: addresses go through the platform's
        /// DMA translation, which is what DDI DMA cookies already are.
        const ACCESS_PLATFORM = 1 << 33;
        /// `VIRTIO_F_RING_PACKED`
        const RING_PACKED = 1 << 34;
        /// `VIRTIO_F_IN_ORDER`
        const IN_ORDER = 1 << 35;
        /// `VIRTIO_F_ORDER_PLATFORM`
        const ORDER_PLATFORM = 1 << 36;
        /// `VIRTIO_F_SR_IOV`
        const SR_IOV = 1 << 37;
        /// `VIRTIO_F_NOTIFICATION_DATA`
        const NOTIFICATION_DATA = 1 << 38;
    }
}
