//! A virtio-scsi request queue's ring on the core: the split virtqueue
//! (`crate::virtio::ring`) whose tokens are the commands in flight, and
//! how a command's chain is written into it (virtio 1.2 §5.6.6.1: the
//! request header and data-out buffers the device reads, then the
//! response and data-in buffers it writes).

use super::cmd::{CmdLayout, VioCmd};
use crate::ddi::dma::DmaBuffer;
use crate::ddi::fm::{Fma, HandleHealth};
use crate::ffi;
use crate::hba::cmd::OwnedCmd;
use crate::hba::family::{AddError, BadCompletion, DeviceRing};
use crate::scsa::flags::DataDir;
use crate::shmem::SharedMem;
use crate::virtio::ring::{self, Segment, SplitQueue, UsedError};

/// A request queue's split virtqueue.
pub struct ReqRing {
    /// The ring; its tokens are the commands in flight.
    pub ring: SplitQueue<DmaBuffer, OwnedCmd<VioCmd>>,
}

fn add_error(e: ring::AddError) -> AddError {
    match e {
        ring::AddError::Full => AddError::Full,
        ring::AddError::Invalid => AddError::Invalid,
    }
}

impl ReqRing {
    /// Puts command `c` (prepared for `layout`) in the ring, through its
    /// indirect table or as a direct chain; its head descriptor.
    pub fn add(
        &mut self,
        c: OwnedCmd<VioCmd>,
        layout: &CmdLayout,
        indirect: bool,
    ) -> Result<u16, (OwnedCmd<VioCmd>, AddError)> {
        let f = c.fields_ref();
        let nseg = f.pkt.as_ref().map_or(0, |p| p.cookies().len());
        let r = if indirect {
            let writable = layout.resp_len as u64
                + if f.dir == DataDir::In {
                    f.xfer as u64
                } else {
                    0
                };
            let table = f.dev.dma.device_addr() + layout.table_off as u64;
            let entries = (2 + nseg) as u16;
            self.ring.add_indirect(table, entries, writable, c)
        } else {
            self.add_direct(c, layout)
        };
        r.map_err(|(c, e)| (c, add_error(e)))
    }

    fn add_direct(
        &mut self,
        c: OwnedCmd<VioCmd>,
        layout: &CmdLayout,
    ) -> Result<u16, (OwnedCmd<VioCmd>, ring::AddError)> {
        // The segments are read from the command (its packet's cookies)
        // while the chain is written, and the command becomes the chain's
        // token at commit.
        let written = {
            let f = c.fields_ref();
            let cookies = f.pkt.as_ref().map_or(&[][..], |p| p.cookies());
            let base = f.dev.dma.device_addr();
            let data = |k: &ffi::ddi_dma_cookie_t, writes| Segment {
                addr: k.dmac_laddress,
                len: k.dmac_size as u32,
                device_writes: writes,
            };
            self.ring.begin_chain(2 + cookies.len()).and_then(|mut w| {
                w.push(Segment {
                    addr: base,
                    len: layout.req_len as u32,
                    device_writes: false,
                })?;
                if f.dir == DataDir::Out {
                    for k in cookies {
                        w.push(data(k, false))?;
                    }
                }
                w.push(Segment {
                    addr: base + layout.resp_off as u64,
                    len: layout.resp_len as u32,
                    device_writes: true,
                })?;
                if f.dir == DataDir::In {
                    for k in cookies {
                        w.push(data(k, true))?;
                    }
                }
                Ok(w)
            })
        };
        match written {
            Ok(w) => w.commit(c),
            Err(e) => Err((c, e)),
        }
    }
}

impl DeviceRing<VioCmd> for ReqRing {
    fn capacity(&self) -> usize {
        usize::from(self.ring.size())
    }

    fn take_dma_fault(&self, fma: &Fma) -> HandleHealth {
        self.ring.memory().take_dma_fault(fma)
    }

    fn pop(&mut self) -> Option<Result<OwnedCmd<VioCmd>, BadCompletion>> {
        Some(match self.ring.pop_used()? {
            Ok(u) => Ok(u.token),
            // An id at or past the ring's size names no descriptor at
            // all: the device cannot have been given it. One in range
            // names no chain outstanding: a descriptor that never headed
            // one, or a chain returned already (the ring remembers the
            // last return at each head).
            Err(UsedError::UnknownId { id }) if id >= u32::from(self.ring.size()) => {
                Err(BadCompletion::Impossible { id: u64::from(id) })
            }
            Err(UsedError::UnknownId { id }) => Err(BadCompletion::Unknown { id: u64::from(id) }),
            Err(UsedError::AlreadyReturned { id }) => {
                Err(BadCompletion::Duplicate { id: u64::from(id) })
            }
            Err(UsedError::IndexRunaway {
                device_idx,
                expected,
            }) => Err(BadCompletion::Runaway {
                device_idx: u32::from(device_idx),
                expected: u32::from(expected),
            }),
        })
    }

    fn rearm(&mut self) -> bool {
        self.ring.enable_interrupts()
    }

    fn publish(&mut self) {
        self.ring.expose();
    }

    fn notify_needed(&mut self) -> bool {
        self.ring.notify_needed()
    }

    fn get_mut(&mut self, slot: u16) -> Option<&mut OwnedCmd<VioCmd>> {
        self.ring.token_mut(slot)
    }

    fn for_each_outstanding(&mut self, f: &mut dyn FnMut(u16, &mut OwnedCmd<VioCmd>)) {
        self.ring.for_each_outstanding(f);
    }

    fn reclaim_all(&mut self, f: &mut dyn FnMut(OwnedCmd<VioCmd>)) {
        self.ring.reclaim_all(f);
    }

    fn outstanding(&self) -> usize {
        self.ring.outstanding()
    }

    fn stalled_since_last_look(&mut self) -> bool {
        self.ring.used_waiting_since_last_look()
    }
}
