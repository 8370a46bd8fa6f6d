//! Task management on the control queue (virtio 1.2 §5.6.6.2): one TMF
//! at a time, polled (the control queue has no interrupt vector).

use super::device::VioScsi;
use super::proto::{self, CONTROL_QUEUE, Tmf};
use crate::ddi::dma::{DmaBuffer, DmaMode, FaultCheck};
use crate::ddi::fm::{Fma, HandleHealth};
use crate::ddi::{Dip, Sleep, time};
use crate::dev_warn;
use crate::ffi;
use crate::hba::AttachError;
use crate::hba::family::TmAnswer;
use crate::scsa::addr::LunNumber;
use crate::shmem::SharedMem;
use crate::virtio::ring::{Segment, SplitQueue};

/// How long a TMF may take before the device is considered unresponsive.
const TMF_TIMEOUT_US: i64 = 5 * ffi::MICROSEC;
/// Offset of the TMF response in the control buffer.
const TMF_RESP_OFF: usize = 32;

/// The control queue and the buffer of the one TMF in flight.
pub struct ControlQueue {
    /// The ring (chains carry no token: one TMF at a time).
    pub ring: SplitQueue<DmaBuffer, ()>,
    buf: DmaBuffer,
    /// False after a TMF never came back (its buffer still belongs to the
    /// device); a device reset makes it usable again.
    pub usable: bool,
}

impl ControlQueue {
    /// The control queue in `mem`, with its request buffer.
    pub fn new(dip: Dip, mem: DmaBuffer, size: u16, event_idx: bool) -> Result<Self, AttachError> {
        let ring = SplitQueue::new(mem, size, event_idx)
            .ok_or(AttachError::Device("control queue memory"))?;
        let buf = DmaBuffer::alloc(
            dip,
            64,
            64,
            u64::MAX,
            DmaMode::Streaming,
            FaultCheck::Taken,
            Sleep::Yes,
        )?;
        Ok(Self {
            ring,
            buf,
            usable: true,
        })
    }
}

impl ControlQueue {
    /// Takes the faults recorded on the ring's and the request buffer's
    /// DMA handles (`Fma::take_dma_fault`), the first one or Ok.
    pub fn take_dma_fault(&self, fma: &Fma) -> HandleHealth {
        let ring = self.ring.memory().take_dma_fault(fma);
        ring.first_of(self.buf.take_dma_fault(fma))
    }
}

/// Sends a TMF and polls the control queue for its response.
pub(crate) fn send(
    dev: &VioScsi,
    tmf: Tmf,
    target: u8,
    lun: LunNumber,
    tag: u64,
    can_sleep: bool,
) -> TmAnswer {
    let mut c = dev.ctl.lock();
    if !c.usable {
        return TmAnswer::Unavailable;
    }
    c.buf
        .write_bytes(0, &proto::tmf_request(tmf, target, lun, tag));
    c.buf.write_bytes(TMF_RESP_OFF, &[0xff]);
    c.buf.sync_for_device(0, TMF_RESP_OFF + 1);
    let base = c.buf.device_addr();
    let chain = [
        Segment {
            addr: base,
            len: proto::TMF_REQ_LEN as u32,
            device_writes: false,
        },
        Segment {
            addr: base + TMF_RESP_OFF as u64,
            len: 1,
            device_writes: true,
        },
    ];
    if c.ring.add_chain(chain, ()).is_err() {
        return TmAnswer::Unavailable;
    }
    if c.ring.publish() {
        dev.transport.notify(CONTROL_QUEUE);
    }
    let start = time::hrtime();
    let mut spins = 0u32;
    loop {
        match c.ring.pop_used() {
            Some(Ok(_)) => {
                c.buf.sync_for_cpu(TMF_RESP_OFF, 1);
                let mut r = [0u8];
                c.buf.read_bytes(TMF_RESP_OFF, &mut r);
                return if proto::tmf_succeeded(r[0]) {
                    TmAnswer::Done
                } else {
                    TmAnswer::Refused(u32::from(r[0]))
                };
            }
            Some(Err(e)) => {
                dev_warn!(dev.dip, "control queue: bad used element {e:?}");
            }
            None => {}
        }
        if (time::hrtime() - start) / 1000 >= TMF_TIMEOUT_US {
            // Its buffer still belongs to the device: no TMF until a
            // device reset makes the queue usable again.
            c.usable = false;
            return TmAnswer::NoAnswer;
        }
        time::poll_pause(&mut spins, can_sleep);
    }
}
