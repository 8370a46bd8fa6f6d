//! Feature probing, as pure decisions over what the device answered.
//! The register traffic that produces the answers is
//! [`super::regs::Regs::probe`] / [`super::regs::Regs::send_payload`];
//! what QEMU 10.0 answers is in notes §1 (Commands) and §2 item 5.
//!
//! Detection (header note on SETUP_MSG_RING; Linux
//! `pvscsi_setup_msg_workqueue`, `pvscsi_setup_req_threshold`): write only
//! the COMMAND register and read COMMAND_STATUS; −1 means "unsupported";
//! QEMU answers 0xFFFFFFFE ("waiting for data") for a supported command
//! with a payload.

use super::regs::CommandStatus;
use super::status::btstat;
use super::wire::{
    CONFIG_HOST_STATUS, CONFIG_NUM_PHYS, CONFIG_PAGE_CONTROLLER_SIZE, CONFIG_SCSI_STATUS,
};
use crate::ffi;

/// Whether the device knows SETUP_MSG_RING, from the status after writing
/// only the command number.
pub fn msg_ring_supported(after_command: CommandStatus) -> bool {
    after_command != CommandStatus::Failed
}

/// Whether SETUP_MSG_RING took effect, from the status after the payload
/// (QEMU: 34, the payload's dword count; −1 with `use_msg=off` or a bad
/// page count). QEMU silently ignores it before SETUP_RINGS: the core
/// must send it after.
pub fn msg_ring_set_up(after_payload: CommandStatus) -> bool {
    after_payload != CommandStatus::Failed
}

/// The request-call threshold (doorbell coalescing) mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThresholdMode {
    /// The device does not know the command (QEMU): kick every batch.
    Unsupported,
    /// Known but refused: kick every batch.
    Disabled,
    /// On: R/W kicks only when reqCallThreshold requests wait.
    Enabled,
}

impl ThresholdMode {
    /// Whether R/W kicks may be skipped.
    pub fn coalescing(self) -> bool {
        self == ThresholdMode::Enabled
    }
}

/// The mode from the status after the command number and, if that was
/// not −1, after the payload `{enable = 1}`. Linux takes any non-zero
/// final status as "on", −1 included; here −1 is "off".
pub fn threshold_mode(
    after_command: CommandStatus,
    after_enable: Option<CommandStatus>,
) -> ThresholdMode {
    match (after_command, after_enable) {
        (CommandStatus::Failed, _) | (_, None) => ThresholdMode::Unsupported,
        (_, Some(CommandStatus::Done(v))) if v != 0 => ThresholdMode::Enabled,
        _ => ThresholdMode::Disabled,
    }
}

/// The most targets the request descriptor's target byte can name.
pub const MAX_ADDRESSABLE_TARGETS: u32 = 256;

/// How many target ids to scan when the device will not say: QEMU's
/// pvscsi has max_target 64, so ids 0..=64 are valid (notes §2,
/// Q `pvscsi_scsi_info`). Linux and FreeBSD fall back to 16 and never find
/// a disk at scsi-id 16..64 on QEMU; absent ids cost one SELTIMEO each.
pub const FALLBACK_TARGETS: u32 = 65;

/// Where the target count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSource {
    /// FreeBSD's GET_MAX_TARGETS.
    GetMaxTargets,
    /// The CONFIG controller page's numPhys.
    ConfigPage,
    /// Neither answered: [`FALLBACK_TARGETS`].
    Fallback,
}

/// The number of target ids to scan (0..count) and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxTargets {
    /// Target ids 0..count.
    pub count: u32,
    /// The source.
    pub source: TargetSource,
}

fn plausible(n: u32) -> Option<u32> {
    (1..=MAX_ADDRESSABLE_TARGETS).contains(&n).then_some(n)
}

/// The count GET_MAX_TARGETS reported, if plausible (QEMU: −1).
pub fn from_get_max_targets(status: CommandStatus) -> Option<u32> {
    match status {
        CommandStatus::Done(n) => plausible(n),
        _ => None,
    }
}

/// Pre-marks a controller page before CONFIG, as Linux
/// `pvscsi_get_max_targets` does: hostStatus INVPARAM, scsiStatus CHECK,
/// so that a device that never writes the page is not believed (QEMU
/// leaves it untouched; illumos read whatever was there).
pub fn premark_config_page(page: &mut [u8; CONFIG_PAGE_CONTROLLER_SIZE]) {
    page.fill(0);
    page[CONFIG_HOST_STATUS..][..2].copy_from_slice(&btstat::INVPARAM.to_le_bytes());
    page[CONFIG_SCSI_STATUS..][..2].copy_from_slice(&u16::from(ffi::STATUS_CHECK).to_le_bytes());
}

/// numPhys from a controller page CONFIG returned, if the command did not
/// fail, the header says SUCCESS/GOOD, and the count is plausible.
pub fn from_config_page(
    status: CommandStatus,
    page: &[u8; CONFIG_PAGE_CONTROLLER_SIZE],
) -> Option<u32> {
    if status == CommandStatus::Failed {
        return None;
    }
    let host = u16::from_le_bytes([page[CONFIG_HOST_STATUS], page[CONFIG_HOST_STATUS + 1]]);
    let scsi = u16::from_le_bytes([page[CONFIG_SCSI_STATUS], page[CONFIG_SCSI_STATUS + 1]]);
    if host != btstat::SUCCESS || scsi != u16::from(ffi::STATUS_GOOD) {
        return None;
    }
    let mut n = [0u8; 4];
    n.copy_from_slice(&page[CONFIG_NUM_PHYS..][..4]);
    plausible(u32::from_le_bytes(n))
}

/// The decision: GET_MAX_TARGETS, else CONFIG, else the fallback.
pub fn max_targets(get_max_targets: Option<u32>, config_page: Option<u32>) -> MaxTargets {
    match (get_max_targets, config_page) {
        (Some(count), _) => MaxTargets {
            count,
            source: TargetSource::GetMaxTargets,
        },
        (None, Some(count)) => MaxTargets {
            count,
            source: TargetSource::ConfigPage,
        },
        (None, None) => MaxTargets {
            count: FALLBACK_TARGETS,
            source: TargetSource::Fallback,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandStatus::*;

    #[test]
    fn msg_ring_decisions() {
        assert!(msg_ring_supported(AwaitingData), "QEMU");
        assert!(msg_ring_supported(Done(0)));
        assert!(!msg_ring_supported(Failed));
        assert!(msg_ring_set_up(Done(34)), "QEMU");
        assert!(!msg_ring_set_up(Failed));
    }

    #[test]
    fn threshold_decisions() {
        assert_eq!(
            threshold_mode(Failed, None),
            ThresholdMode::Unsupported,
            "QEMU"
        );
        assert_eq!(
            threshold_mode(Failed, Some(Done(1))),
            ThresholdMode::Unsupported
        );
        assert_eq!(
            threshold_mode(AwaitingData, Some(Done(1))),
            ThresholdMode::Enabled
        );
        assert_eq!(
            threshold_mode(AwaitingData, Some(Done(0))),
            ThresholdMode::Disabled
        );
        assert_eq!(
            threshold_mode(AwaitingData, Some(Failed)),
            ThresholdMode::Disabled
        );
        assert!(!ThresholdMode::Unsupported.coalescing());
    }

    #[test]
    fn qemu_answers_lead_to_the_fallback_that_reaches_id_64() {
        let gmt = from_get_max_targets(Failed);
        let mut page = [0xAAu8; CONFIG_PAGE_CONTROLLER_SIZE];
        premark_config_page(&mut page);
        // QEMU: CONFIG returns -1 and leaves the page alone.
        let cfg = from_config_page(Failed, &page);
        let m = max_targets(gmt, cfg);
        assert_eq!(
            m,
            MaxTargets {
                count: 65,
                source: TargetSource::Fallback
            }
        );
        assert!(m.count > 64, "scsi-id 64 is scanned");
        // A device that "succeeds" without writing the page is not believed.
        assert_eq!(from_config_page(Done(0), &page), None);
    }

    #[test]
    fn device_answers_are_used_when_plausible() {
        assert_eq!(from_get_max_targets(Done(64)), Some(64));
        assert_eq!(from_get_max_targets(Done(0)), None);
        assert_eq!(from_get_max_targets(Done(100_000)), None);
        let mut page = [0u8; CONFIG_PAGE_CONTROLLER_SIZE];
        page[472..476].copy_from_slice(&64u32.to_le_bytes());
        assert_eq!(from_config_page(Done(0), &page), Some(64));
        assert_eq!(max_targets(None, Some(64)).source, TargetSource::ConfigPage);
        assert_eq!(
            max_targets(Some(16), Some(64)),
            MaxTargets {
                count: 16,
                source: TargetSource::GetMaxTargets
            }
        );
        page[472..476].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            from_config_page(Done(0), &page),
            None,
            "illumos fell back only here"
        );
    }
}
