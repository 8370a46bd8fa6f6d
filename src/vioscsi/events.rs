//! The event queue (virtio 1.2 §5.6.6.3): buffers kept posted for the
//! device's events, and what each event asks of the core (a discovery, a
//! LUN rescan).

use super::device::VioScsi;
use super::proto::{self, EVENT_QUEUE, Event};
use crate::ddi::dma::{DmaBuffer, DmaMode, FaultCheck};
use crate::ddi::fm::{Fma, HandleHealth};
use crate::ddi::kstat::HbaStat;
use crate::ddi::{Dip, Sleep};
use crate::hba::{AttachError, Hba};
use crate::shmem::SharedMem;
use crate::virtio::ring::{Segment, SplitQueue};
use crate::{dev_note, dev_warn};

/// Event buffers kept posted.
pub const EVENT_BUFFERS: u16 = 16;

/// The event queue and its buffers.
pub struct EventQueue {
    /// The ring; a chain's token is its buffer's index.
    pub ring: SplitQueue<DmaBuffer, u16>,
    bufs: DmaBuffer,
    count: u16,
    size: usize,
}

impl EventQueue {
    /// The event queue in `mem`, with `min(queue size, 16)` buffers of
    /// `event_size` bytes.
    pub fn new(
        dip: Dip,
        mem: DmaBuffer,
        size: u16,
        event_idx: bool,
        event_size: u32,
    ) -> Result<Self, AttachError> {
        let ring = SplitQueue::new(mem, size, event_idx)
            .ok_or(AttachError::Device("event queue memory"))?;
        let count = EVENT_BUFFERS.min(size);
        let esize = event_size as usize;
        let bufs = DmaBuffer::alloc(
            dip,
            esize * usize::from(count),
            64,
            u64::MAX,
            DmaMode::Consistent,
            FaultCheck::Taken,
            Sleep::Yes,
        )?;
        Ok(Self {
            ring,
            bufs,
            count,
            size: esize,
        })
    }

    fn post(&mut self, i: u16) {
        let seg = Segment {
            addr: self.bufs.device_addr() + (usize::from(i) * self.size) as u64,
            len: self.size as u32,
            device_writes: true,
        };
        // Cannot fail: at most `count` <= queue size buffers are ever posted.
        let _ = self.ring.add_chain([seg], i);
    }

    /// Takes the faults recorded on the ring's and the buffers' DMA
    /// handles (`Fma::take_dma_fault`), the first one or Ok.
    pub fn take_dma_fault(&self, fma: &Fma) -> HandleHealth {
        let ring = self.ring.memory().take_dma_fault(fma);
        ring.first_of(self.bufs.take_dma_fault(fma))
    }

    /// Posts every buffer (after a (re)initialization); the caller
    /// notifies the device.
    pub fn post_all(&mut self) {
        for i in 0..self.count {
            self.post(i);
        }
        self.ring.publish();
    }
}

/// Reads and re-posts every event the device returned, then hands
/// what needs a thread to the work task. Like the core's reap, it looks
/// again when events arrived while interrupts were being re-armed
/// (virtio 1.2 §2.7.10: otherwise they would wait for an interrupt
/// that never comes), a bounded number of times.
pub(crate) fn service_events(hba: &Hba<VioScsi>) {
    let dev = &hba.dev;
    for _pass in 0..4 {
        let mut events = [(Event::None, false); EVENT_BUFFERS as usize];
        let mut n = 0;
        let (kick, more) = {
            let mut e = dev.evt.lock();
            for _ in 0..e.count {
                match e.ring.pop_used() {
                    None => break,
                    Some(Ok(u)) => {
                        let i = u.token;
                        let off = usize::from(i) * e.size;
                        e.bufs.sync_for_cpu(off, proto::EVENT_LEN);
                        let mut b = [0u8; proto::EVENT_LEN];
                        e.bufs.read_bytes(off, &mut b);
                        if n < events.len() {
                            events[n] = proto::parse_event(&b);
                            n += 1;
                        }
                        e.post(i);
                    }
                    Some(Err(err)) => {
                        dev_warn!(dev.dip, "event queue: bad used element {err:?}")
                    }
                }
            }
            let kick = e.ring.publish();
            let more = dev.mode.interrupts() && e.ring.enable_interrupts();
            (kick, more)
        };
        if kick {
            dev.transport.notify(EVENT_QUEUE);
        }
        for &(ev, missed) in &events[..n] {
            hba.count(HbaStat::Events);
            handle_event(hba, ev, missed);
        }
        if !more {
            return;
        }
    }
}

fn handle_event(hba: &Hba<VioScsi>, ev: Event, missed: bool) {
    let dip = hba.dip();
    match ev {
        Event::TransportReset { addr, reason } => {
            let what = match reason {
                proto::event::RESET_RESCAN => "appeared",
                proto::event::RESET_REMOVED => "removed",
                _ => "reset",
            };
            match addr {
                Some((t, l)) => dev_note!(dip, "target {t} lun {l} {what}"),
                None => dev_note!(dip, "a target {what}"),
            }
            if reason == proto::event::RESET_RESCAN || reason == proto::event::RESET_REMOVED {
                // A full-set discovery adds and drops targets; a LUN
                // rescan finds LUN changes behind a known target.
                hba.schedule(|w| {
                    w.discover = true;
                    if let Some((t, _)) = addr {
                        w.rescan_target(t);
                    }
                });
            }
        }
        Event::ParamChange { addr, asc, ascq } => {
            // The LUN reports the change as a unit attention on its next
            // command; the target driver handles it (e.g. sd re-reads the
            // capacity after 2A/09).
            let (t, l) = addr.unwrap_or((0, crate::scsa::addr::LunNumber::ZERO));
            dev_note!(
                dip,
                "target {t} lun {l}: parameters changed (asc {asc:#x} ascq {ascq:#x})"
            );
        }
        Event::None => {}
        Event::Other(code) => dev_note!(dip, "ignoring event {code:#x}"),
    }
    if missed {
        dev_warn!(dip, "events were lost: rediscovering every target");
        hba.schedule(|w| {
            w.discover = true;
            w.scan = [u64::MAX; 4];
        });
    }
}
