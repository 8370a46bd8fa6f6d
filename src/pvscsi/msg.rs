//! Messages from the device (`PVSCSIMsgDescDevStatusChanged`): a target or
//! LUN appeared or went away. QEMU sends them on hot-plug and hot-unplug
//! only (devices present at boot give none) and drops them when the ring
//! is full (Q `pvscsi_send_msg`), so a full or overrun ring means "rescan".

use super::ring::MsgWindow;
use super::wire::{RawMessage, decode_lun_field};
use crate::scsa::addr::LunNumber;

/// `PVSCSI_MSG_DEV_ADDED`
pub const MSG_DEV_ADDED: u32 = 0;
/// `PVSCSI_MSG_DEV_REMOVED`
pub const MSG_DEV_REMOVED: u32 = 1;

/// A decoded message. Every message is consumed, whatever it says (the
/// illumos driver never consumed unknown types and its ring stalled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// A device appeared at (target, lun).
    Added {
        /// Target.
        target: u8,
        /// LUN.
        lun: LunNumber,
    },
    /// A device went away.
    Removed {
        /// Target.
        target: u8,
        /// LUN.
        lun: LunNumber,
    },
    /// A known kind naming an address this driver cannot have (bus ≠ 0,
    /// target above 255, a LUN field other than `[0, n, 0...]`).
    BadAddress {
        /// The kind.
        kind: u32,
    },
    /// A kind no header defines.
    Unknown {
        /// The kind.
        kind: u32,
    },
}

impl Message {
    /// Decodes a raw message.
    pub fn decode(m: &RawMessage) -> Message {
        if m.kind != MSG_DEV_ADDED && m.kind != MSG_DEV_REMOVED {
            return Message::Unknown { kind: m.kind };
        }
        let addr = (m.bus == 0)
            .then(|| u8::try_from(m.target).ok())
            .flatten()
            .zip(decode_lun_field(&m.lun));
        match (m.kind, addr) {
            (MSG_DEV_ADDED, Some((target, lun))) => Message::Added { target, lun },
            (_, Some((target, lun))) => Message::Removed { target, lun },
            (kind, None) => Message::BadAddress { kind },
        }
    }
}

/// What the core does about messages (on a task queue: tgtmap work).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Report the target present (LUN 0 added) in the target map.
    AddTarget(u8),
    /// Report the target gone (LUN 0 removed).
    RemoveTarget(u8),
    /// Rescan the LUNs of a target (a LUN ≠ 0 changed).
    RescanLuns(u8),
    /// Rescan every target: messages may have been lost or were garbage.
    RescanAll,
    /// Nothing (an unknown kind, consumed and counted).
    Ignore,
}

/// The action for one message.
pub fn action(m: Message) -> Action {
    match m {
        Message::Added { target, lun } if lun == LunNumber::ZERO => Action::AddTarget(target),
        Message::Removed { target, lun } if lun == LunNumber::ZERO => Action::RemoveTarget(target),
        Message::Added { target, .. } | Message::Removed { target, .. } => {
            Action::RescanLuns(target)
        }
        Message::BadAddress { .. } => Action::RescanAll,
        Message::Unknown { .. } => Action::Ignore,
    }
}

/// Whether a window of the message ring calls for a full rescan (besides
/// the messages it holds).
pub fn rescan_needed(w: MsgWindow) -> bool {
    match w {
        MsgWindow::Overflow { .. } => true,
        MsgWindow::Available { maybe_lost, .. } => maybe_lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pvscsi::ring::msg_window;

    fn raw(kind: u32, bus: u32, target: u32, lun: [u8; 8]) -> RawMessage {
        RawMessage {
            kind,
            bus,
            target,
            lun,
        }
    }
    const L0: [u8; 8] = [0; 8];

    #[test]
    fn decode_and_act() {
        let m = Message::decode(&raw(0, 0, 64, L0));
        assert_eq!(
            m,
            Message::Added {
                target: 64,
                lun: LunNumber::ZERO
            }
        );
        assert_eq!(action(m), Action::AddTarget(64));
        let m = Message::decode(&raw(1, 0, 3, L0));
        assert_eq!(action(m), Action::RemoveTarget(3));
        let m = Message::decode(&raw(0, 0, 3, [0, 2, 0, 0, 0, 0, 0, 0]));
        assert_eq!(
            m,
            Message::Added {
                target: 3,
                lun: LunNumber::new(2).unwrap()
            }
        );
        assert_eq!(action(m), Action::RescanLuns(3));
        assert_eq!(
            action(Message::decode(&raw(1, 0, 3, [0, 2, 0, 0, 0, 0, 0, 0]))),
            Action::RescanLuns(3)
        );
    }

    #[test]
    fn garbage_is_consumed() {
        assert_eq!(
            Message::decode(&raw(7, 0, 0, L0)),
            Message::Unknown { kind: 7 }
        );
        assert_eq!(action(Message::Unknown { kind: 7 }), Action::Ignore);
        for r in [
            raw(0, 1, 0, L0),
            raw(1, 0, 256, L0),
            raw(0, 0, 1, [1, 0, 0, 0, 0, 0, 0, 0]),
        ] {
            let m = Message::decode(&r);
            assert!(matches!(m, Message::BadAddress { .. }), "{r:?}");
            assert_eq!(action(m), Action::RescanAll);
        }
    }

    #[test]
    fn overflow_and_full_rings_need_a_rescan() {
        assert!(!rescan_needed(msg_window(5, 0, 32)));
        assert!(
            rescan_needed(msg_window(32, 0, 32)),
            "full: QEMU may have dropped some"
        );
        assert!(rescan_needed(msg_window(33, 0, 32)));
    }
}
