//! pvscsi's one request queue on the core: [`Rings`] whose tokens are the
//! commands in flight, as the core's [`DeviceRing`], and the doorbell
//! choice of each batch.

use super::cmd::PvCmd;
use super::regs::{Doorbell, kick_needed};
use super::ring::{self, Reap, Rings, SubmitError};
use crate::ddi::dma::DmaBuffer;
use crate::ddi::fm::{Fma, HandleHealth};
use crate::hba::cmd::OwnedCmd;
use crate::hba::family::{AddError, BadCompletion, DeviceRing};
use crate::shmem::SharedMem;

/// The request, completion and message rings, with what the driver
/// remembers about them between calls (under the core's queue lock).
pub struct PvRing<M: SharedMem = DmaBuffer> {
    /// The rings.
    pub rings: Rings<M, OwnedCmd<PvCmd<M>>>,
    /// The doorbell the commands added since the last notification
    /// decision need (None: nothing added since).
    batch_bell: Option<Doorbell>,
    /// The device coalesces READ/WRITE doorbells (request-call threshold
    /// mode on).
    coalescing: bool,
    /// The consumer index at the previous look, if completions waited then.
    last_look: Option<u32>,
}

/// A command the ring would not take, with the reason.
pub type Refused<M> = (OwnedCmd<PvCmd<M>>, AddError);

impl<M: SharedMem> PvRing<M> {
    /// Over `rings`; `coalescing` when the device's request-call threshold
    /// mode is on.
    pub fn new(rings: Rings<M, OwnedCmd<PvCmd<M>>>, coalescing: bool) -> PvRing<M> {
        PvRing {
            rings,
            batch_bell: None,
            coalescing,
            last_look: None,
        }
    }

    /// Puts a prepared command on the request ring (not yet visible to the
    /// device); its slot (context index) and the doorbell it needs.
    pub fn add(&mut self, c: OwnedCmd<PvCmd<M>>) -> Result<(u16, Doorbell), Refused<M>> {
        let x = &c.fields_ref().dev;
        if x.encoded.is_err() {
            return Err((c, AddError::Invalid));
        }
        let (bell, proto) = (x.bell, x.desc);
        let template = PvCmd::<M>::descriptor_from(proto);
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

impl<M: SharedMem + Send> DeviceRing<PvCmd<M>> for PvRing<M> {
    fn capacity(&self) -> usize {
        self.rings.geometry().cmp_entries() as usize
    }

    fn take_dma_fault(&self, fma: &Fma) -> HandleHealth {
        // Every ring's fault is taken (cleared), not just the first.
        self.rings
            .memories()
            .into_iter()
            .flatten()
            .map(|m| m.take_dma_fault(fma))
            .fold(HandleHealth::Ok, HandleHealth::first_of)
    }

    fn pop(&mut self) -> Option<Result<OwnedCmd<PvCmd<M>>, BadCompletion>> {
        Some(match self.rings.reap() {
            Reap::Empty => return None,
            Reap::Done(r) => {
                let mut c = r.token;
                c.fields().dev.completion = r.completion;
                Ok(c)
            }
            Reap::Dropped(bad) => Err(match bad {
                ring::BadCompletion::Duplicate { context } => {
                    BadCompletion::Duplicate { id: context }
                }
                ring::BadCompletion::NeverIssued { context } => {
                    BadCompletion::Unknown { id: context }
                }
                ring::BadCompletion::ContextOutOfRange { context }
                | ring::BadCompletion::NotPublished { context } => {
                    BadCompletion::Impossible { id: context }
                }
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

    fn publish(&mut self) {
        self.rings.publish();
    }

    fn notify_needed(&mut self) -> bool {
        // The batch's doorbell, set by `add` and taken by the decision:
        // none if nothing was added since the last one.
        let Some(bell) = self.batch_bell.take() else {
            return false;
        };
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

    fn get_mut(&mut self, slot: u16) -> Option<&mut OwnedCmd<PvCmd<M>>> {
        self.rings.token_mut(slot)
    }

    fn for_each_outstanding(&mut self, f: &mut dyn FnMut(u16, &mut OwnedCmd<PvCmd<M>>)) {
        self.rings.for_each_outstanding(f);
    }

    fn reclaim_all(&mut self, f: &mut dyn FnMut(OwnedCmd<PvCmd<M>>)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hba::cmd::{Cmd, CmdState};
    use crate::pvscsi::cmd::CMD_MEM_LEN;
    use crate::pvscsi::ring::{Geometry, MsgRingPages, RingPages};
    use crate::pvscsi::status::btstat;
    use crate::pvscsi::wire::{CMP_DESC_SIZE, Completion, EncodeError, PAGE_SIZE, rs};
    use crate::shmem::shared::SharedHostMem;
    use std::vec::Vec;

    struct Dev {
        state: SharedHostMem,
        cmp: SharedHostMem,
    }

    impl Dev {
        /// Completes `context` at the device's producer index.
        fn complete(&self, context: u64, host_status: u16) {
            let prod = self.state.read_u32(rs::CMP_PROD);
            let slot = prod as usize % (PAGE_SIZE / CMP_DESC_SIZE);
            let c = Completion {
                context,
                host_status,
                ..Completion::default()
            };
            self.cmp.write_bytes(slot * CMP_DESC_SIZE, &c.to_bytes());
            self.state.write_u32(rs::CMP_PROD, prod.wrapping_add(1));
        }
    }

    fn ring(coalescing: bool) -> (PvRing<SharedHostMem>, Dev) {
        let g = Geometry {
            req_pages: RingPages::new(1).unwrap(),
            cmp_pages: RingPages::new(1).unwrap(),
            msg_pages: MsgRingPages::new(1),
        };
        let p = PAGE_SIZE as u64;
        let state = SharedHostMem::new(PAGE_SIZE, p);
        let cmp = SharedHostMem::new(PAGE_SIZE, 3 * p);
        let rings = Rings::new(
            g,
            state.clone(),
            SharedHostMem::new(PAGE_SIZE, 2 * p),
            cmp.clone(),
            Some(SharedHostMem::new(PAGE_SIZE, 4 * p)),
        )
        .unwrap();
        (PvRing::new(rings, coalescing), Dev { state, cmp })
    }

    /// `n` commands; the vector is never grown afterwards, so the tokens'
    /// pointers into it stay valid.
    fn cmds(n: usize) -> Vec<Cmd<PvCmd<SharedHostMem>>> {
        (0..n)
            .map(|i| {
                let mem = SharedHostMem::new(CMD_MEM_LEN, 0x10_0000 * (i as u64 + 1));
                let mut c = PvCmd::over(mem);
                c.encoded = Ok(());
                c.bell = Doorbell::ReadWrite;
                Cmd::new(c)
            })
            .collect()
    }

    fn owned(c: &Cmd<PvCmd<SharedHostMem>>) -> OwnedCmd<PvCmd<SharedHostMem>> {
        OwnedCmd::claim(c).unwrap()
    }

    fn done(c: OwnedCmd<PvCmd<SharedHostMem>>) {
        c.release(CmdState::Idle);
    }

    #[test]
    fn commands_go_in_by_context_until_the_ring_is_full_and_only_valid_ones() {
        let (mut r, _dev) = ring(false);
        let cs = cmds(34);
        let mut bad = owned(&cs[33]);
        bad.fields().dev.encoded = Err(EncodeError::DirectionContradictsCdb);
        let (bad, e) = r.add(bad).unwrap_err();
        assert_eq!(e, AddError::Invalid);
        done(bad);
        for (i, c) in cs.iter().take(32).enumerate() {
            let (slot, bell) = r.add(owned(c)).map_err(|(_, e)| e).unwrap();
            assert_eq!((slot, bell), (i as u16, Doorbell::ReadWrite));
        }
        assert_eq!(r.outstanding(), 32);
        let (c, e) = r.add(owned(&cs[32])).unwrap_err();
        assert_eq!(e, AddError::Full, "TRAN_BUSY only when no context is free");
        done(c);
        let mut seen = Vec::new();
        r.for_each_outstanding(&mut |slot, c| {
            assert!(c.is(&cs[usize::from(slot)]));
            seen.push(slot);
        });
        assert_eq!(seen, (0..32).collect::<Vec<u16>>());
        assert!(r.get_mut(5).is_some_and(|c| c.is(&cs[5])));
        let mut back = 0;
        r.reclaim_all(&mut |c| {
            back += 1;
            done(c)
        });
        assert_eq!((back, r.outstanding()), (32, 0));
        assert!(r.get_mut(5).is_none());
    }

    #[test]
    fn publish_asks_for_a_doorbell_unless_the_device_coalesces_read_write() {
        let (mut r, dev) = ring(false);
        r.publish();
        assert!(!r.notify_needed(), "nothing new");
        let cs = cmds(4);
        r.add(owned(&cs[0])).map_err(|(_, e)| e).unwrap();
        r.publish();
        assert_eq!(dev.state.read_u32(rs::REQ_PROD), 1, "visible at once");
        assert!(r.notify_needed());
        r.publish();
        assert!(!r.notify_needed(), "decided already");
        // Threshold mode: READ/WRITE waits for the device's threshold.
        let (mut r, dev) = ring(true);
        dev.state.write_u32(rs::REQ_CALL_THRESHOLD, 4);
        r.add(owned(&cs[1])).map_err(|(_, e)| e).unwrap();
        r.publish();
        assert!(!r.notify_needed(), "1 waiting, threshold 4");
        // One decision for a batch: a non-READ/WRITE command among
        // READ/WRITEs rings for all of them (NonReadWrite's doorbell
        // makes the device process the whole ring: `Doorbell::merge`).
        r.add(owned(&cs[2])).map_err(|(_, e)| e).unwrap();
        r.publish();
        let mut c = owned(&cs[3]);
        c.fields().dev.bell = Doorbell::NonReadWrite;
        r.add(c).map_err(|(_, e)| e).unwrap();
        r.publish();
        assert_eq!(dev.state.read_u32(rs::REQ_PROD), 3);
        assert!(
            r.notify_needed(),
            "a non-READ/WRITE command in the batch always rings"
        );
        assert!(!r.notify_needed(), "the batch was decided");
        let mut all = Vec::new();
        r.reclaim_all(&mut |c| all.push(c));
        all.into_iter().for_each(done);
    }

    #[test]
    fn a_ring_consumed_from_since_the_last_look_is_not_stalled() {
        let (mut r, dev) = ring(false);
        let cs = cmds(2);
        for c in &cs {
            r.add(owned(c)).map_err(|(_, e)| e).unwrap();
        }
        r.publish();
        dev.complete(1, btstat::SUCCESS);
        dev.complete(2, btstat::SUCCESS);
        assert!(!r.stalled_since_last_look(), "first look");
        done(r.pop().unwrap().map_err(|_| ()).unwrap());
        assert!(
            !r.stalled_since_last_look(),
            "one was consumed since: the other waits, but nothing is stuck"
        );
        assert!(r.stalled_since_last_look(), "nothing consumed since");
        done(r.pop().unwrap().map_err(|_| ()).unwrap());
        assert!(!r.stalled_since_last_look(), "nothing waits");
    }

    #[test]
    fn completions_come_back_with_what_the_device_wrote_and_bad_ones_are_named() {
        let (mut r, dev) = ring(false);
        let cs = cmds(2);
        for c in &cs {
            r.add(owned(c)).map_err(|(_, e)| e).unwrap();
        }
        r.publish();
        assert!(r.pop().is_none() && !r.rearm(), "nothing yet");
        assert!(!r.stalled_since_last_look());
        dev.complete(2, btstat::SELTIMEO);
        assert!(r.rearm(), "a completion waits");
        assert!(!r.stalled_since_last_look(), "first look");
        assert!(
            r.stalled_since_last_look(),
            "still waiting, nobody consumed it"
        );
        let c = r.pop().unwrap().map_err(|_| ()).unwrap();
        assert!(c.is(&cs[1]));
        assert_eq!(c.fields_ref().dev.completion.host_status, btstat::SELTIMEO);
        done(c);
        assert!(!r.stalled_since_last_look());
        dev.complete(2, btstat::SUCCESS);
        assert_eq!(
            r.pop().unwrap().map(|_| ()).unwrap_err(),
            BadCompletion::Duplicate { id: 2 },
            "a duplicate"
        );
        dev.complete(0x9999, btstat::SUCCESS);
        assert_eq!(
            r.pop().unwrap().map(|_| ()).unwrap_err(),
            BadCompletion::Impossible { id: 0x9999 },
            "beyond the context table"
        );
        // More completions than commands: the ring state is lost.
        let prod = dev.state.read_u32(rs::CMP_PROD);
        dev.state.write_u32(rs::CMP_PROD, prod + 5);
        assert_eq!(
            r.pop().unwrap().map(|_| ()).unwrap_err(),
            BadCompletion::Runaway {
                device_idx: prod + 5,
                expected: prod
            }
        );
        assert_eq!(r.capacity(), PAGE_SIZE / CMP_DESC_SIZE);
        let mut all = Vec::new();
        r.reclaim_all(&mut |c| all.push(c));
        assert_eq!(all.len(), 1);
        all.into_iter().for_each(done);
    }
}
