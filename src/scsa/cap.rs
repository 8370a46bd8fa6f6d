//! Capabilities (tran_getcap(9E), tran_setcap(9E)): the names
//! `scsi_hba_lookup_capstr(9F)` knows, by index (`SCSI_CAP_*`,
//! `sys/scsi/impl/services.h`), and the answers an HBA gives.

/// A capability `scsi_hba_lookup_capstr` recognized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Cap {
    DmaMax,
    MsgOut,
    Disconnect,
    Synchronous,
    WideXfer,
    Parity,
    InitiatorId,
    UntaggedQing,
    TaggedQing,
    AutoRqsense,
    LinkedCmds,
    SectorSize,
    TotalSectors,
    Geometry,
    ResetNotification,
    QfullRetries,
    QfullRetryInterval,
    ScsiVersion,
    InterconnectType,
    LunReset,
    CdbLen,
    DmaMaxArch,
    TranLayerRetries,
}

impl Cap {
    /// From the `SCSI_CAP_*` index `scsi_hba_lookup_capstr` returned.
    pub fn from_index(i: i32) -> Option<Cap> {
        use Cap::*;
        const ALL: [Cap; 23] = [
            DmaMax,
            MsgOut,
            Disconnect,
            Synchronous,
            WideXfer,
            Parity,
            InitiatorId,
            UntaggedQing,
            TaggedQing,
            AutoRqsense,
            LinkedCmds,
            SectorSize,
            TotalSectors,
            Geometry,
            ResetNotification,
            QfullRetries,
            QfullRetryInterval,
            ScsiVersion,
            InterconnectType,
            LunReset,
            CdbLen,
            DmaMaxArch,
            TranLayerRetries,
        ];
        usize::try_from(i).ok().and_then(|i| ALL.get(i).copied())
    }
}

/// What an HBA reports about itself for `getcap`.
#[derive(Clone, Copy, Debug)]
pub struct HbaCaps {
    /// Largest transfer in bytes.
    pub dma_max: u32,
    /// Longest CDB the device takes.
    pub max_cdb_len: u32,
    /// `INTERCONNECT_*`
    pub interconnect: i32,
}

/// Answer to `tran_getcap(9E)`: the value, or -1 for "not defined".
pub fn getcap(caps: &HbaCaps, cap: Option<Cap>) -> i32 {
    use Cap::*;
    match cap {
        Some(DmaMax) => caps.dma_max.min(i32::MAX as u32) as i32,
        Some(CdbLen) => caps.max_cdb_len as i32,
        Some(InterconnectType) => caps.interconnect,
        // Tagged queueing must read 1 or sd limits the queue depth to 3.
        Some(TaggedQing | UntaggedQing | AutoRqsense | LunReset | Disconnect | WideXfer) => 1,
        Some(Synchronous | Parity | LinkedCmds) => 0,
        Some(ScsiVersion) => 3,
        _ => -1,
    }
}

/// Answer to `tran_setcap(9E)`: 1 when the capability now has `value`, 0
/// when it cannot be set (or not to that value), -1 for unknown names.
pub fn setcap(cap: Option<Cap>, value: i32) -> i32 {
    use Cap::*;
    match cap {
        // Always on: the device always returns sense with CHECK CONDITION,
        // so turning ARQ off would lose it. Turning on is a success.
        Some(AutoRqsense | TaggedQing | UntaggedQing | LunReset | WideXfer | Disconnect) => {
            match value {
                1 => 1,
                0 => 0,
                _ => 0,
            }
        }
        // Fixed properties of the device or of the transport.
        Some(
            DmaMax | CdbLen | InterconnectType | ScsiVersion | Synchronous | Parity | LinkedCmds
            | MsgOut,
        ) => 0,
        Some(InitiatorId | SectorSize | TotalSectors | Geometry | ResetNotification) => 0,
        Some(QfullRetries | QfullRetryInterval | DmaMaxArch | TranLayerRetries) => 0,
        None => -1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: HbaCaps = HbaCaps {
        dma_max: 1 << 20,
        max_cdb_len: 32,
        interconnect: 1,
    };

    #[test]
    fn what_sd_asks_at_attach() {
        assert_eq!(getcap(&CAPS, Cap::from_index(8)), 1, "tagged-qing");
        assert_eq!(getcap(&CAPS, Cap::from_index(7)), 1, "untagged-qing");
        assert_eq!(getcap(&CAPS, Cap::from_index(9)), 1, "auto-rqsense");
        assert_eq!(getcap(&CAPS, Cap::from_index(0)), 1 << 20, "dma-max");
        assert_eq!(getcap(&CAPS, Cap::from_index(20)), 32, "max-cdb-length");
        assert_eq!(getcap(&CAPS, Cap::from_index(18)), 1, "interconnect-type");
        assert_eq!(getcap(&CAPS, Cap::from_index(19)), 1, "lun-reset");
        assert_eq!(
            setcap(Cap::from_index(8), 1),
            1,
            "setcap tagged-qing 1 must succeed"
        );
        assert_eq!(setcap(Cap::from_index(9), 1), 1);
        assert_eq!(setcap(Cap::from_index(9), 0), 0, "ARQ cannot be turned off");
    }

    #[test]
    fn unknown_and_bad_requests() {
        assert_eq!(Cap::from_index(-1), None);
        assert_eq!(Cap::from_index(23), None);
        assert_eq!(getcap(&CAPS, None), -1);
        assert_eq!(setcap(None, 1), -1);
        assert_eq!(
            setcap(Cap::from_index(8), 7),
            0,
            "a boolean capability set to 7"
        );
        assert_eq!(setcap(Cap::from_index(0), 4096), 0, "dma-max is read-only");
    }
}
