//! What every family decides the same way about its interrupts: the
//! `interrupt-type` tunable, the interrupt mode it leads to, and the
//! refusal of high-level interrupt priorities.

use crate::ddi::Dip;
use crate::ddi::dev::StrProp;
use crate::ddi::intr::IntrKind;
use crate::hba::AttachError;
use crate::{dev_warn, ffi};

/// How completions are signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntrMode {
    /// MSI-X.
    MsiX,
    /// One MSI vector.
    Msi,
    /// The fixed (INTx) line, possibly shared.
    Fixed,
    /// No interrupts: completions are polled (the `interrupt-type=poll`
    /// tunable).
    Poll,
}

impl IntrMode {
    /// Whether the device interrupts at all.
    pub fn interrupts(self) -> bool {
        self != IntrMode::Poll
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            IntrMode::MsiX => "MSI-X",
            IntrMode::Msi => "MSI",
            IntrMode::Fixed => "fixed",
            IntrMode::Poll => "polled",
        }
    }

    /// Its `DDI_INTR_TYPE_*` (ddi_intr_get_supported_types(9F)), 0 when
    /// polled: what the HBA kstat's `intr_type` shows.
    pub fn ddi_type(self) -> u64 {
        match self {
            IntrMode::MsiX => ffi::DDI_INTR_TYPE_MSIX as u64,
            IntrMode::Msi => ffi::DDI_INTR_TYPE_MSI as u64,
            IntrMode::Fixed => ffi::DDI_INTR_TYPE_FIXED as u64,
            IntrMode::Poll => 0,
        }
    }

    /// The mode of interrupts of `kind`.
    pub fn of(kind: IntrKind) -> IntrMode {
        match kind {
            IntrKind::MsiX => IntrMode::MsiX,
            IntrKind::Msi => IntrMode::Msi,
            IntrKind::Fixed => IntrMode::Fixed,
        }
    }
}

/// What the `interrupt-type` tunable asks for (rvscsi(4D)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptChoice {
    /// The interrupt types to try, in order (empty when polled).
    pub kinds: &'static [IntrKind],
    /// `interrupt-type=poll`.
    pub poll: bool,
}

const AUTO: InterruptChoice = InterruptChoice {
    kinds: &[IntrKind::MsiX, IntrKind::Msi, IntrKind::Fixed],
    poll: false,
};

/// Reads `interrupt-type` (auto | msix | msi | fixed | poll); a value it
/// does not know is reported and `auto` used. `msi` falls back to fixed
/// (a system without MSI still gets interrupts).
pub fn interrupt_choice(dip: Dip) -> InterruptChoice {
    let mut buf = [0u8; 32];
    match dip.prop_string(c"interrupt-type", &mut buf) {
        StrProp::Value("msix") => InterruptChoice {
            kinds: &[IntrKind::MsiX],
            poll: false,
        },
        StrProp::Value("msi") => InterruptChoice {
            kinds: &[IntrKind::Msi, IntrKind::Fixed],
            poll: false,
        },
        StrProp::Value("fixed") => InterruptChoice {
            kinds: &[IntrKind::Fixed],
            poll: false,
        },
        StrProp::Value("poll") => InterruptChoice {
            kinds: &[],
            poll: true,
        },
        StrProp::Absent | StrProp::Value("auto") => AUTO,
        other => {
            dev_warn!(
                dip,
                "interrupt-type {} is not auto, msix, msi, fixed or poll: using auto",
                Shown(other)
            );
            AUTO
        }
    }
}

/// Refuses a high-level interrupt priority (at or above
/// `ddi_intr_get_hilevel_pri(9F)`, e.g. from an `interrupt-priorities`
/// property in a .conf): the locks its handlers take would be spin locks
/// and `scsi_hba_pkt_comp(9F)` and everything it calls would run above the
/// scheduler, where blocking kernel services must not be used. The driver
/// has no soft-interrupt stage for that.
pub fn refuse_high_level(dip: Dip, pri: u32) -> Result<(), AttachError> {
    // SAFETY: no arguments; callable from attach context.
    let hilevel = unsafe { ffi::ddi_intr_get_hilevel_pri() };
    if pri < hilevel {
        return Ok(());
    }
    dev_warn!(
        dip,
        "interrupt priority {pri} is high-level (at or above {hilevel}, \
         ddi_intr_get_hilevel_pri): not supported, attach refused; remove \
         interrupt-priorities from rvscsi.conf or set it below {hilevel}"
    );
    Err(AttachError::Device(
        "high-level interrupt priority is not supported",
    ))
}

/// A string property value for a message.
pub(crate) struct Shown<'a>(pub(crate) StrProp<'a>);

impl core::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            StrProp::Value(v) => write!(f, "\"{v}\""),
            StrProp::Unusable => f.write_str("(too long or not text)"),
            StrProp::Absent => f.write_str("(unset)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_modes_say_whether_the_device_interrupts() {
        assert!(IntrMode::MsiX.interrupts() && IntrMode::Msi.interrupts());
        assert!(IntrMode::Fixed.interrupts() && !IntrMode::Poll.interrupts());
        assert_eq!(IntrMode::of(IntrKind::MsiX), IntrMode::MsiX);
        assert_eq!(IntrMode::of(IntrKind::Msi), IntrMode::Msi);
        assert_eq!(IntrMode::of(IntrKind::Fixed), IntrMode::Fixed);
        let names = [
            IntrMode::MsiX,
            IntrMode::Msi,
            IntrMode::Fixed,
            IntrMode::Poll,
        ]
        .map(IntrMode::name);
        assert_eq!(names, ["MSI-X", "MSI", "fixed", "polled"]);
    }

    #[test]
    fn a_shown_property_says_what_it_was() {
        assert_eq!(alloc::format!("{}", Shown(StrProp::Value("x"))), "\"x\"");
        assert_eq!(alloc::format!("{}", Shown(StrProp::Absent)), "(unset)");
        assert_eq!(
            alloc::format!("{}", Shown(StrProp::Unusable)),
            "(too long or not text)"
        );
    }
}
