//! Counting MSI and MSI-X messages exactly, one by one, as a CPU's local
//! APIC takes them.
//!
//! The emulated DDI programs every message as an x86 kernel does: address
//! in the local APIC's MSI window (`0xFEE0_0000`, destination APIC 0,
//! physical mode), data = an APIC vector (fixed delivery, edge) that is
//! [`VECTOR_BASE`] + the vector's `inum` (Intel SDM vol. 3, §11.11.1 and
//! §11.11.2: address bits 19:12 destination, data bits 7:0 vector, 10:8
//! delivery mode, 15 trigger mode). The device's write of that DWORD is one
//! interrupt. Who counts it:
//!
//! - QEMU: its local APIC model takes every write into the window as one
//!   message (hw/intc/apic.c `apic_mem_write`: an offset above 0xfff, or
//!   register index 0, goes to `apic_send_msi` and `apic_deliver_irq`),
//!   and `apic_deliver_irq` fires the trace event `apic_deliver_irq` once
//!   per message, with the vector, before it touches the IRR. The machine
//!   starts QEMU with only that event enabled and its log (`-D`) on a FIFO
//!   that [`QemuApicTrace`]'s thread drains, counting a line per message.
//!   Why this is exact: the event is emitted synchronously on the path of
//!   each message, so nothing merges (the IRR bit it then sets would; the
//!   old RAM mailbox did), and a masked MSI-X vector sends nothing until
//!   QEMU's own pending-bit logic sends it once on unmask (hw/pci/msix.c
//!   `msix_notify`, `msix_handle_mask_update`), which is then one line.
//!   The log backend flushes the stream after every event (util/log.c
//!   `qemu_log_unlock`), so a line is in the FIFO when the message has
//!   been sent. What it costs: one formatted line (about 80 bytes) and one
//!   `write(2)` in QEMU per message, one `read(2)` here per batch of lines;
//!   no extra qtest round trip. It needs a QEMU built with the `log` trace
//!   backend (Debian's is); [`QemuApicTrace::verify`] proves at launch that
//!   the events arrive, and the machine refuses to start if they do not.
//! - The in-process device ([`crate::memdev`]): it owns the write, so it
//!   counts it at the source ([`MessageCounts::record`]) instead of
//!   storing it in RAM.
//!
//! The delivery thread ([`crate::machine`]) compares what was sent per
//! vector with what it has delivered and calls the handler once for each
//! message.

use crate::machine::lock;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Base of the local APIC's MSI window (Intel SDM vol. 3 §11.11.1).
pub const MSI_WINDOW: u64 = 0xFEE0_0000;
/// Size of the window (address bits 31:20 are 0xFEE).
pub const MSI_WINDOW_SIZE: u64 = 0x10_0000;
/// APIC vector of `inum` 0. Vectors below 32 are exceptions (SDM §6.3.1);
/// 0x30 leaves 208 vectors, more than any device here offers.
pub const VECTOR_BASE: u8 = 0x30;
/// The most vectors a device can be given.
pub const MAX_VECTORS: usize = 256 - VECTOR_BASE as usize - 1;
/// The APIC vector the machine sends itself at launch to prove the trace
/// works (outside every device's range).
const PROBE_VECTOR: u8 = 0xff;

/// The message the emulated kernel programs for `inum`: (address, data).
pub fn message_for(inum: usize) -> Option<(u64, u32)> {
    (inum < MAX_VECTORS).then(|| (MSI_WINDOW, u32::from(VECTOR_BASE) + inum as u32))
}

/// The `inum` an APIC vector belongs to, if it is one of the device's.
pub fn inum_of(apic_vector: u8) -> Option<usize> {
    let i = usize::from(apic_vector.checked_sub(VECTOR_BASE)?);
    (i < MAX_VECTORS).then_some(i)
}

/// Messages received so far, per APIC vector (cumulative, never reset).
pub struct MessageCounts {
    sent: [AtomicU64; 256],
    waker: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Default for MessageCounts {
    fn default() -> Self {
        MessageCounts {
            sent: [const { AtomicU64::new(0) }; 256],
            waker: Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for MessageCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageCounts")
    }
}

impl MessageCounts {
    /// One message to `apic_vector` arrived.
    pub fn record(&self, apic_vector: u8) {
        self.sent[usize::from(apic_vector)].fetch_add(1, Ordering::AcqRel);
        if let Some(w) = lock(&self.waker).as_ref() {
            w();
        }
    }

    /// Messages to `apic_vector` so far.
    pub fn sent(&self, apic_vector: u8) -> u64 {
        self.sent[usize::from(apic_vector)].load(Ordering::Acquire)
    }

    /// Messages to vector `inum` of the device so far.
    pub fn sent_to_inum(&self, inum: usize) -> u64 {
        message_for(inum).map_or(0, |(_, data)| self.sent(data as u8))
    }

    /// Called after every recorded message (the delivery thread's wake-up).
    pub fn set_waker(&self, w: Box<dyn Fn() + Send + Sync>) {
        *lock(&self.waker) = Some(w);
    }
}

/// The reader of QEMU's `apic_deliver_irq` trace events.
pub struct QemuApicTrace {
    fifo: PathBuf,
    /// The FIFO, opened read-write here: QEMU's open for writing never
    /// blocks and never sees a missing reader; the thread is woken for
    /// shutdown by writing to it.
    file: Arc<std::fs::File>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counts: Arc<MessageCounts>,
}

impl std::fmt::Debug for QemuApicTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QemuApicTrace({})", self.fifo.display())
    }
}

impl QemuApicTrace {
    /// Makes the FIFO and starts draining it into `counts`.
    pub fn start(counts: Arc<MessageCounts>) -> Result<QemuApicTrace, String> {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let fifo = std::env::temp_dir().join(format!(
            "rvscsi-apic-{}-{}.fifo",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes())
            .map_err(|_| "FIFO path with a NUL".to_string())?;
        // SAFETY: `c` is a NUL-terminated path that lives across the call;
        // mkfifo(3) only reads it.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(format!(
                "mkfifo {}: {}",
                fifo.display(),
                std::io::Error::last_os_error()
            ));
        }
        // Linux opens a FIFO read-write without waiting for a peer (fifo(7)).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .map_err(|e| format!("open {}: {e}", fifo.display()))?;
        let file = Arc::new(file);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (file, stop, counts) = (file.clone(), stop.clone(), counts.clone());
            std::thread::Builder::new()
                .name("emu-apic-trace".into())
                .spawn(move || drain(&file, &stop, &counts))
                .map_err(|e| format!("cannot start the trace reader: {e}"))?
        };
        Ok(QemuApicTrace {
            fifo,
            file,
            stop,
            thread: Some(thread),
            counts,
        })
    }

    /// The QEMU arguments that send the events here.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-trace".into(),
            "enable=apic_deliver_irq".into(),
            "-D".into(),
            self.fifo.display().to_string(),
        ]
    }

    /// Sends one message to the probe vector through `bus` and waits for
    /// its event: an error if the trace does not work (a QEMU without the
    /// `log` trace backend, or one that refuses the write).
    pub fn verify(&self, bus: &dyn rvscsi_qtest::Bus) -> Result<(), String> {
        let before = self.counts.sent(PROBE_VECTOR);
        bus.writel(MSI_WINDOW, u32::from(PROBE_VECTOR))
            .map_err(|e| format!("probe message: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.counts.sent(PROBE_VECTOR) == before {
            if Instant::now() > deadline {
                return Err(
                    "QEMU's apic_deliver_irq trace events do not arrive: the test bed counts \
                     MSI/MSI-X messages with them and needs a QEMU built with the `log` trace \
                     backend"
                        .into(),
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // QEMU has the FIFO open now; the name is no longer needed.
        let _ = std::fs::remove_file(&self.fifo);
        Ok(())
    }
}

impl Drop for QemuApicTrace {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the reader out of its read(2).
        let _ = (&*self.file).write_all(b"\n");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.fifo);
    }
}

/// The reader thread: counts every `apic_deliver_irq` line by vector.
fn drain(file: &std::fs::File, stop: &AtomicBool, counts: &MessageCounts) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = match (&*file).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("rvscsi-emu: the APIC trace FIFO failed: {e}");
                return;
            }
        };
        if stop.load(Ordering::Acquire) {
            return;
        }
        partial.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(nl) = partial[start..].iter().position(|&b| b == b'\n') {
            if let Some(v) = apic_vector_of_line(&partial[start..start + nl]) {
                counts.record(v);
            }
            start += nl + 1;
        }
        partial.drain(..start);
    }
}

/// The vector of one `apic_deliver_irq` log line (hw/intc/trace-events:
/// "dest %d dest_mode %d delivery_mode %d vector %d trigger_mode %d",
/// possibly after a `pid@time:` prefix), if it is one.
fn apic_vector_of_line(line: &[u8]) -> Option<u8> {
    let line = std::str::from_utf8(line).ok()?;
    let at = line.find("apic_deliver_irq ")?;
    let rest = &line[at..];
    let v = rest.split(" vector ").nth(1)?;
    v.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_line_gives_its_vector_and_nothing_else_does() {
        assert_eq!(
            apic_vector_of_line(
                b"apic_deliver_irq dest 0 dest_mode 0 delivery_mode 0 vector 49 trigger_mode 0"
            ),
            Some(49)
        );
        assert_eq!(
            apic_vector_of_line(
                b"1234@1700000000.000001:apic_deliver_irq dest 0 dest_mode 0 delivery_mode 0 vector 255 trigger_mode 0"
            ),
            Some(255)
        );
        assert_eq!(
            apic_vector_of_line(b"apic_local_deliver vector 3 delivery mode 0"),
            None
        );
        assert_eq!(apic_vector_of_line(b""), None);
    }

    #[test]
    fn inums_map_to_apic_vectors_and_back() {
        assert_eq!(message_for(0), Some((MSI_WINDOW, 0x30)));
        assert_eq!(inum_of(0x31), Some(1));
        assert_eq!(inum_of(0x2f), None);
        assert_eq!(message_for(MAX_VECTORS), None);
        assert_eq!(inum_of(0xff), None, "the probe vector is no device's");
    }
}
