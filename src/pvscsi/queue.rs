//! pvscsi's one request queue on the core: [`Rings`] whose tokens are the
//! commands in flight, as the core's [`DeviceRing`], and the doorbell
//! choice of each batch.

use super::cmd::PvCmd;
use super::regs::{Doorbell, kick_needed};
use super::ring::{self, Reap, Rings, SubmitError};
use crate::ddi::dma::DmaBuffer;
use crate::hba::cmd::OwnedCmd;
use crate::hba::family::{AddError, BadCompletion, DeviceRing};

/// The request, completion and message rings, with what the driver
/// remembers about them between calls (under the core's queue lock).
pub struct PvRing {
    /// The rings.
    pub rings: Rings<DmaBuffer, OwnedCmd<PvCmd>>,
    /// The doorbell the commands added since the last publish need.
    batch_bell: Option<Doorbell>,
    /// The device coalesces READ/WRITE doorbells (request-call threshold
    /// mode on).
    coalescing: bool,
    /// The consumer index at the previous look, if completions waited then.
    last_look: Option<u32>,
}

/// The id of a completion the rings dropped (its context as written).
fn dropped_id(bad: ring::BadCompletion) -> u64 {
    match bad {
        ring::BadCompletion::ContextOutOfRange { context }
        | ring::BadCompletion::NeverIssued { context }
        | ring::BadCompletion::Duplicate { context }
        | ring::BadCompletion::NotPublished { context } => context,
    }
}

impl PvRing {
    /// Over `rings`; `coalescing` when the device's request-call threshold
    /// mode is on.
    pub fn new(rings: Rings<DmaBuffer, OwnedCmd<PvCmd>>, coalescing: bool) -> PvRing {
        PvRing {
            rings,
            batch_bell: None,
            coalescing,
            last_look: None,
        }
    }

    /// Puts a prepared command on the request ring (not yet visible to the
    /// device); its slot (context index) and the doorbell it needs.
    pub fn add(
        &mut self,
        c: OwnedCmd<PvCmd>,
    ) -> Result<(u16, Doorbell), (OwnedCmd<PvCmd>, AddError)> {
        let x = &c.fields_ref().dev;
        if x.encoded.is_err() {
            return Err((c, AddError::Invalid));
        }
        let (bell, proto) = (x.bell, x.desc);
        let template = PvCmd::descriptor_from(proto);
        match self
            .rings
            .submit(c, |context| Ok::<_, ()>(template(context)))
        {
            Ok(ctx) => {
                self.batch_bell = Some(self.batch_bell.map_or(bell, |b| b.merge(bell)));
                Ok((ctx.index() as u16, bell))
            }
            Err(SubmitError::Full(c)) => Err((c, AddError::Full)),
            Err(SubmitError::Encode((), c)) => Err((c, AddError::Invalid)),
        }
    }
}

impl DeviceRing<PvCmd> for PvRing {
    fn capacity(&self) -> usize {
        self.rings.geometry().cmp_entries() as usize
    }

    fn pop(&mut self) -> Option<Result<OwnedCmd<PvCmd>, BadCompletion>> {
        Some(match self.rings.reap() {
            Reap::Empty => return None,
            Reap::Done(r) => {
                let mut c = r.token;
                c.fields().dev.completion = r.completion;
                Ok(c)
            }
            Reap::Dropped(bad) => Err(BadCompletion::Unknown {
                id: dropped_id(bad),
            }),
            Reap::Runaway {
                device_prod, cons, ..
            } => Err(BadCompletion::Runaway {
                device_idx: device_prod,
                expected: cons,
            }),
        })
    }

    /// The device interrupts for every completion batch while INTR_MASK
    /// allows it (no per-ring suppression to re-arm): only the look again.
    fn rearm(&mut self) -> bool {
        self.rings.completions_waiting()
    }

    fn publish(&mut self) -> bool {
        if self.rings.publish() == 0 {
            return false;
        }
        let bell = self.batch_bell.take().unwrap_or(Doorbell::NonReadWrite);
        if !self.coalescing {
            return true;
        }
        kick_needed(
            bell,
            true,
            self.rings.device_pending_requests(),
            self.rings.device_req_call_threshold(),
        )
    }

    fn get_mut(&mut self, slot: u16) -> Option<&mut OwnedCmd<PvCmd>> {
        self.rings.token_mut(slot)
    }

    fn for_each_outstanding(&mut self, f: &mut dyn FnMut(u16, &mut OwnedCmd<PvCmd>)) {
        self.rings.for_each_outstanding(f);
    }

    fn reclaim_all(&mut self, f: &mut dyn FnMut(OwnedCmd<PvCmd>)) {
        self.batch_bell = None;
        self.last_look = None;
        self.rings.reclaim_all(f);
    }

    fn outstanding(&self) -> usize {
        self.rings.outstanding()
    }

    fn stalled_since_last_look(&mut self) -> bool {
        let waiting = self.rings.completions_waiting();
        let cons = self.rings.completions_consumed();
        let stalled = waiting && self.last_look == Some(cons);
        self.last_look = waiting.then_some(cons);
        stalled
    }
}
