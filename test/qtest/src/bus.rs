//! What a test playing the CPU can do to a machine: port I/O, MMIO and
//! guest-memory accesses, and a look at the interrupt lines.
//!
//! [`QTest`](crate::QTest) does it to a QEMU process; the test bed's
//! in-process device model does it to a device that lives in the test's
//! own address space (for measuring the driver's CPU cost without a socket
//! round trip per register access). Code written against `Bus` (the PCI
//! helper, the emulated DDI) runs on either.

use crate::{Error, Op};

/// A machine's CPU-side bus.
pub trait Bus: Send + Sync {
    /// Runs `ops` in order, atomically with respect to other users of the
    /// bus; one value per op (the value read, 0 for writes).
    fn batch(&self, ops: &[Op<'_>]) -> Result<Vec<u64>, Error>;

    /// Reads guest memory.
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error>;

    /// Whether interrupt line `line` (an I/O APIC input) is asserted, as
    /// last seen (see [`Bus::sync_irqs`]).
    fn irq_level(&self, line: u32) -> bool;

    /// Brings the view of the interrupt lines up to date.
    fn sync_irqs(&self) -> Result<(), Error>;

    /// One op.
    fn op(&self, op: Op<'_>) -> Result<u64, Error> {
        Ok(self.batch(&[op])?.first().copied().unwrap_or(0))
    }

    /// 8-bit port read.
    fn inb(&self, port: u16) -> Result<u8, Error> {
        self.op(Op::Inb(port)).map(|v| v as u8)
    }
    /// 16-bit port read.
    fn inw(&self, port: u16) -> Result<u16, Error> {
        self.op(Op::Inw(port)).map(|v| v as u16)
    }
    /// 32-bit port read.
    fn inl(&self, port: u16) -> Result<u32, Error> {
        self.op(Op::Inl(port)).map(|v| v as u32)
    }
    /// 8-bit port write.
    fn outb(&self, port: u16, v: u8) -> Result<(), Error> {
        self.op(Op::Outb(port, v)).map(drop)
    }
    /// 16-bit port write.
    fn outw(&self, port: u16, v: u16) -> Result<(), Error> {
        self.op(Op::Outw(port, v)).map(drop)
    }
    /// 32-bit port write.
    fn outl(&self, port: u16, v: u32) -> Result<(), Error> {
        self.op(Op::Outl(port, v)).map(drop)
    }
    /// 8-bit guest-physical read.
    fn readb(&self, addr: u64) -> Result<u8, Error> {
        self.op(Op::Readb(addr)).map(|v| v as u8)
    }
    /// 16-bit guest-physical read.
    fn readw(&self, addr: u64) -> Result<u16, Error> {
        self.op(Op::Readw(addr)).map(|v| v as u16)
    }
    /// 32-bit guest-physical read.
    fn readl(&self, addr: u64) -> Result<u32, Error> {
        self.op(Op::Readl(addr)).map(|v| v as u32)
    }
    /// 64-bit guest-physical read.
    fn readq(&self, addr: u64) -> Result<u64, Error> {
        self.op(Op::Readq(addr))
    }
    /// 8-bit guest-physical write.
    fn writeb(&self, addr: u64, v: u8) -> Result<(), Error> {
        self.op(Op::Writeb(addr, v)).map(drop)
    }
    /// 16-bit guest-physical write.
    fn writew(&self, addr: u64, v: u16) -> Result<(), Error> {
        self.op(Op::Writew(addr, v)).map(drop)
    }
    /// 32-bit guest-physical write.
    fn writel(&self, addr: u64, v: u32) -> Result<(), Error> {
        self.op(Op::Writel(addr, v)).map(drop)
    }
    /// 64-bit guest-physical write.
    fn writeq(&self, addr: u64, v: u64) -> Result<(), Error> {
        self.op(Op::Writeq(addr, v)).map(drop)
    }
    /// Writes guest memory.
    fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.op(Op::WriteMem(addr, data)).map(drop)
    }
    /// Fills guest memory.
    fn memset(&self, addr: u64, len: u64, byte: u8) -> Result<(), Error> {
        self.op(Op::Memset(addr, len, byte)).map(drop)
    }
}

impl Bus for crate::QTest {
    fn batch(&self, ops: &[Op<'_>]) -> Result<Vec<u64>, Error> {
        crate::QTest::batch(self, ops)
    }

    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        crate::QTest::read_mem(self, addr, buf)
    }

    fn irq_level(&self, line: u32) -> bool {
        crate::QTest::irq_level(self, line)
    }

    fn sync_irqs(&self) -> Result<(), Error> {
        crate::QTest::sync_irqs(self)
    }

    fn op(&self, op: Op<'_>) -> Result<u64, Error> {
        crate::QTest::op(self, op)
    }
}
