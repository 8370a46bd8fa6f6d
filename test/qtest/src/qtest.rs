//! The qtest protocol client.
//!
//! qtest is a line protocol: the client sends one command per line (`inl 0xc000`,
//! `writeq 0x1000 0x5`, `b64read 0x1000 0x200`...) and QEMU answers each with one line,
//! `OK [value]`, or `FAIL ...` / `ERR ...`. Once `irq_intercept_in` is active, QEMU also
//! sends asynchronous `IRQ raise N` / `IRQ lower N` lines whenever an intercepted
//! interrupt line changes; they may arrive before any reply, so the reader absorbs them
//! while it waits and keeps a per-line level and raise counter.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::error::{Error, shorten};
use crate::line::{LineRead, LineReader};

/// Replies per socket round trip in [`QTest::batch`]. Bounded so that QEMU's replies
/// (a few dozen bytes each) always fit in the socket buffer: QEMU never blocks writing a
/// reply while we are still writing commands, so a batch cannot deadlock.
const BATCH_CHUNK: usize = 1024;

/// One scalar (or bulk write) operation for [`QTest::batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// `inb port`: 8-bit port read.
    Inb(u16),
    /// `inw port`: 16-bit port read.
    Inw(u16),
    /// `inl port`: 32-bit port read.
    Inl(u16),
    /// `outb port value`.
    Outb(u16, u8),
    /// `outw port value`.
    Outw(u16, u16),
    /// `outl port value`.
    Outl(u16, u32),
    /// `readb addr`: 8-bit guest-physical read.
    Readb(u64),
    /// `readw addr`.
    Readw(u64),
    /// `readl addr`.
    Readl(u64),
    /// `readq addr`.
    Readq(u64),
    /// `writeb addr value`.
    Writeb(u64, u8),
    /// `writew addr value`.
    Writew(u64, u16),
    /// `writel addr value`.
    Writel(u64, u32),
    /// `writeq addr value`.
    Writeq(u64, u64),
    /// `b64write addr len data` (an empty slice sends nothing).
    WriteMem(u64, &'a [u8]),
    /// `memset addr len byte` (a zero length sends nothing).
    Memset(u64, u64, u8),
}

/// What an [`Op`] counts as in [`QtestStats`].
#[derive(Clone, Copy)]
enum Kind {
    PortRead,
    PortWrite,
    MemRead,
    MemWrite,
    BulkRead(u64),
    BulkWrite(u64),
    Memset,
    Other,
}

impl Op<'_> {
    /// Width in bits of the value the reply carries, or `None` for a plain `OK`.
    fn reply_bits(&self) -> Option<u32> {
        match self {
            Op::Inb(_) | Op::Readb(_) => Some(8),
            Op::Inw(_) | Op::Readw(_) => Some(16),
            Op::Inl(_) | Op::Readl(_) => Some(32),
            Op::Readq(_) => Some(64),
            _ => None,
        }
    }

    /// True if the op needs no command at all (empty bulk write / memset).
    fn is_noop(&self) -> bool {
        matches!(self, Op::WriteMem(_, d) if d.is_empty()) || matches!(self, Op::Memset(_, 0, _))
    }

    fn kind(&self) -> Kind {
        match self {
            Op::Inb(_) | Op::Inw(_) | Op::Inl(_) => Kind::PortRead,
            Op::Outb(..) | Op::Outw(..) | Op::Outl(..) => Kind::PortWrite,
            Op::Readb(_) | Op::Readw(_) | Op::Readl(_) | Op::Readq(_) => Kind::MemRead,
            Op::Writeb(..) | Op::Writew(..) | Op::Writel(..) | Op::Writeq(..) => Kind::MemWrite,
            Op::WriteMem(_, d) => Kind::BulkWrite(d.len() as u64),
            Op::Memset(..) => Kind::Memset,
        }
    }

    /// Appends the command line (with its `\n`) to `out`.
    fn format(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = match *self {
            Op::Inb(p) => writeln!(out, "inb 0x{p:x}"),
            Op::Inw(p) => writeln!(out, "inw 0x{p:x}"),
            Op::Inl(p) => writeln!(out, "inl 0x{p:x}"),
            Op::Outb(p, v) => writeln!(out, "outb 0x{p:x} 0x{v:x}"),
            Op::Outw(p, v) => writeln!(out, "outw 0x{p:x} 0x{v:x}"),
            Op::Outl(p, v) => writeln!(out, "outl 0x{p:x} 0x{v:x}"),
            Op::Readb(a) => writeln!(out, "readb 0x{a:x}"),
            Op::Readw(a) => writeln!(out, "readw 0x{a:x}"),
            Op::Readl(a) => writeln!(out, "readl 0x{a:x}"),
            Op::Readq(a) => writeln!(out, "readq 0x{a:x}"),
            Op::Writeb(a, v) => writeln!(out, "writeb 0x{a:x} 0x{v:x}"),
            Op::Writew(a, v) => writeln!(out, "writew 0x{a:x} 0x{v:x}"),
            Op::Writel(a, v) => writeln!(out, "writel 0x{a:x} 0x{v:x}"),
            Op::Writeq(a, v) => writeln!(out, "writeq 0x{a:x} 0x{v:x}"),
            Op::WriteMem(a, d) => {
                let _ = write!(out, "b64write 0x{a:x} 0x{:x} ", d.len());
                B64.encode_string(d, out);
                writeln!(out)
            }
            Op::Memset(a, n, b) => writeln!(out, "memset 0x{a:x} 0x{n:x} 0x{b:x}"),
        };
    }

    /// Interprets the text after `OK` in this op's reply.
    fn parse_reply(&self, rest: &str) -> Result<u64, Error> {
        let Some(bits) = self.reply_bits() else {
            return Ok(0);
        };
        let tok = rest.split_whitespace().next().unwrap_or("");
        let v = parse_number(tok).ok_or_else(|| {
            Error::Protocol(format!("expected a number in reply, got `OK {rest}`"))
        })?;
        if bits < 64 && v >> bits != 0 {
            return Err(Error::Protocol(format!(
                "reply value {v:#x} does not fit in {bits} bits"
            )));
        }
        Ok(v)
    }
}

/// Parses a number the way libqtest does (`strtoull` base 0): `0x` prefix means hex,
/// a leading `0` octal, otherwise decimal. Any digit count is accepted.
pub(crate) fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.is_empty() {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else if s.is_empty() {
        None
    } else {
        s.parse().ok()
    }
}

/// Counters of the traffic a [`QTest`] generated, as returned by [`QTest::stats`].
///
/// When the harness drives a driver, port and MMIO accesses are what would be VM exits
/// on real hardware, so their deltas per I/O are a meaningful cost figure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QtestStats {
    /// Socket round trips (one per command, one per chunk of a [`QTest::batch`]).
    pub round_trips: u64,
    /// `inb`/`inw`/`inl` commands.
    pub port_reads: u64,
    /// `outb`/`outw`/`outl` commands.
    pub port_writes: u64,
    /// `readb`/`readw`/`readl`/`readq` commands.
    pub mem_reads: u64,
    /// `writeb`/`writew`/`writel`/`writeq` commands.
    pub mem_writes: u64,
    /// `b64read` commands.
    pub bulk_reads: u64,
    /// Bytes read by `b64read`.
    pub bulk_read_bytes: u64,
    /// `b64write` commands.
    pub bulk_writes: u64,
    /// Bytes written by `b64write`.
    pub bulk_write_bytes: u64,
    /// `memset` commands.
    pub memsets: u64,
    /// Anything else (`endianness`, `irq_intercept_in`, raw commands).
    pub other_commands: u64,
    /// Asynchronous `IRQ raise`/`IRQ lower` lines received.
    pub irq_events: u64,
}

impl QtestStats {
    /// Total number of commands sent.
    pub fn commands(&self) -> u64 {
        self.port_reads
            + self.port_writes
            + self.mem_reads
            + self.mem_writes
            + self.bulk_reads
            + self.bulk_writes
            + self.memsets
            + self.other_commands
    }

    /// The counts accumulated since `earlier` (a snapshot taken before).
    pub fn since(&self, earlier: &QtestStats) -> QtestStats {
        QtestStats {
            round_trips: self.round_trips.saturating_sub(earlier.round_trips),
            port_reads: self.port_reads.saturating_sub(earlier.port_reads),
            port_writes: self.port_writes.saturating_sub(earlier.port_writes),
            mem_reads: self.mem_reads.saturating_sub(earlier.mem_reads),
            mem_writes: self.mem_writes.saturating_sub(earlier.mem_writes),
            bulk_reads: self.bulk_reads.saturating_sub(earlier.bulk_reads),
            bulk_read_bytes: self.bulk_read_bytes.saturating_sub(earlier.bulk_read_bytes),
            bulk_writes: self.bulk_writes.saturating_sub(earlier.bulk_writes),
            bulk_write_bytes: self
                .bulk_write_bytes
                .saturating_sub(earlier.bulk_write_bytes),
            memsets: self.memsets.saturating_sub(earlier.memsets),
            other_commands: self.other_commands.saturating_sub(earlier.other_commands),
            irq_events: self.irq_events.saturating_sub(earlier.irq_events),
        }
    }
}

/// Lock-free counters behind [`QtestStats`].
#[derive(Default)]
struct Counters {
    round_trips: AtomicU64,
    port_reads: AtomicU64,
    port_writes: AtomicU64,
    mem_reads: AtomicU64,
    mem_writes: AtomicU64,
    bulk_reads: AtomicU64,
    bulk_read_bytes: AtomicU64,
    bulk_writes: AtomicU64,
    bulk_write_bytes: AtomicU64,
    memsets: AtomicU64,
    other_commands: AtomicU64,
    irq_events: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn count(&self, kind: Kind) {
        match kind {
            Kind::PortRead => bump(&self.port_reads, 1),
            Kind::PortWrite => bump(&self.port_writes, 1),
            Kind::MemRead => bump(&self.mem_reads, 1),
            Kind::MemWrite => bump(&self.mem_writes, 1),
            Kind::BulkRead(n) => {
                bump(&self.bulk_reads, 1);
                bump(&self.bulk_read_bytes, n);
            }
            Kind::BulkWrite(n) => {
                bump(&self.bulk_writes, 1);
                bump(&self.bulk_write_bytes, n);
            }
            Kind::Memset => bump(&self.memsets, 1),
            Kind::Other => bump(&self.other_commands, 1),
        }
    }

    fn snapshot(&self) -> QtestStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QtestStats {
            round_trips: g(&self.round_trips),
            port_reads: g(&self.port_reads),
            port_writes: g(&self.port_writes),
            mem_reads: g(&self.mem_reads),
            mem_writes: g(&self.mem_writes),
            bulk_reads: g(&self.bulk_reads),
            bulk_read_bytes: g(&self.bulk_read_bytes),
            bulk_writes: g(&self.bulk_writes),
            bulk_write_bytes: g(&self.bulk_write_bytes),
            memsets: g(&self.memsets),
            other_commands: g(&self.other_commands),
            irq_events: g(&self.irq_events),
        }
    }
}

/// State of one intercepted interrupt line.
#[derive(Clone, Copy, Default)]
struct IrqLine {
    level: bool,
    raises: u64,
}

/// The socket half that is only touched under the connection lock.
struct Conn {
    reader: LineReader,
    writer: UnixStream,
    /// Reused command buffer.
    text: String,
}

/// Produces a description of QEMU's state (exit status, stderr tail) for error messages.
pub(crate) type Diagnostics = Arc<dyn Fn() -> String + Send + Sync>;

/// A qtest protocol client, safe to share between threads (`&self` everywhere).
///
/// All commands are serialised by an internal lock; a [`batch`](QTest::batch) holds the
/// lock for its whole duration, so a multi-command sequence such as a PCI config access
/// (`outl 0xcf8` then `inl 0xcfc`) is atomic with respect to other threads.
///
/// Every wait for a reply is bounded by the reply timeout. A timeout, or QEMU closing the
/// socket, marks the client dead: from then on every call fails at once with
/// [`Error::Dead`].
pub struct QTest {
    conn: Mutex<Conn>,
    dead: AtomicBool,
    irqs: Mutex<BTreeMap<u32, IrqLine>>,
    counters: Counters,
    timeout: Duration,
    diagnostics: Option<Diagnostics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the data consistent enough for our use
    // (counters, a socket): never propagate the poison.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for QTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QTest")
            .field("dead", &self.is_dead())
            .field("timeout", &self.timeout)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl QTest {
    /// Wraps a connected qtest socket. Every reply slower than `reply_timeout` is an
    /// error ([`Error::Timeout`]). [`Qemu::launch`](crate::Qemu::launch) does this for
    /// you; this constructor is for custom setups and protocol tests.
    pub fn new(stream: UnixStream, reply_timeout: Duration) -> Result<QTest, Error> {
        let reply_timeout = reply_timeout.max(Duration::from_millis(1));
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(reply_timeout))?;
        stream.set_write_timeout(Some(reply_timeout))?;
        let writer = stream.try_clone()?;
        Ok(QTest {
            conn: Mutex::new(Conn {
                reader: LineReader::new(stream),
                writer,
                text: String::with_capacity(256),
            }),
            dead: AtomicBool::new(false),
            irqs: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
            timeout: reply_timeout,
            diagnostics: None,
        })
    }

    /// Installs the hook that describes QEMU's state when the connection closes.
    pub(crate) fn set_diagnostics(&mut self, d: Diagnostics) {
        self.diagnostics = Some(d);
    }

    /// The reply timeout.
    pub fn reply_timeout(&self) -> Duration {
        self.timeout
    }

    /// True once a reply timed out or the connection closed; every later call then
    /// fails fast with [`Error::Dead`].
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// A snapshot of the traffic counters.
    pub fn stats(&self) -> QtestStats {
        self.counters.snapshot()
    }

    // ---- core -------------------------------------------------------------------

    fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    fn closed(&self, command: &str) -> Error {
        self.mark_dead();
        Error::Closed {
            command: shorten(command),
            detail: self.diagnostics.as_ref().map(|d| d()).unwrap_or_default(),
        }
    }

    fn timed_out(&self, command: &str) -> Error {
        self.mark_dead();
        Error::Timeout {
            command: shorten(command),
            waited: self.timeout,
        }
    }

    fn write_error(&self, e: io::Error, command: &str) -> Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timed_out(command),
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => self.closed(command),
            _ => {
                self.mark_dead();
                Error::Io(e)
            }
        }
    }

    fn on_irq_line(&self, words: &[&str]) -> Result<(), Error> {
        let (raise, line) = match words {
            ["IRQ", "raise", n] => (true, *n),
            ["IRQ", "lower", n] => (false, *n),
            _ => {
                return Err(Error::Protocol(format!(
                    "bad IRQ line `{}`",
                    words.join(" ")
                )));
            }
        };
        let line = parse_number(line)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::Protocol(format!("bad IRQ number in `{}`", words.join(" "))))?;
        bump(&self.counters.irq_events, 1);
        let mut irqs = lock(&self.irqs);
        let st = irqs.entry(line).or_default();
        st.level = raise;
        if raise {
            st.raises += 1;
        }
        Ok(())
    }

    /// Reads lines until a reply (absorbing IRQ lines). Returns the text after `OK`,
    /// or `Err(Error::Qtest)` for a FAIL/ERR reply. Connection-level failures also come
    /// back as `Err`, and mark the client dead.
    fn read_reply(&self, conn: &mut Conn, command: &str) -> Result<Result<String, Error>, Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let line = match conn.reader.read_line() {
                Ok(LineRead::Line(l)) => l,
                Ok(LineRead::Eof) => return Err(self.closed(command)),
                Ok(LineRead::TimedOut) => return Err(self.timed_out(command)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(self.closed(command));
                }
                Err(e) => {
                    self.mark_dead();
                    return Err(Error::Io(e));
                }
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("OK") => {
                    let rest = line.trim_start().strip_prefix("OK").unwrap_or("").trim();
                    return Ok(Ok(rest.to_string()));
                }
                Some("FAIL" | "ERR") => return Ok(Err(Error::Qtest(line.clone()))),
                Some("IRQ") => {
                    // An unparsable IRQ line is odd but not a reply: ignore its content.
                    let _ = self.on_irq_line(&words);
                }
                _ => {
                    return Ok(Err(Error::Protocol(format!(
                        "unexpected line `{}` in reply to `{}`",
                        shorten(&line),
                        shorten(command)
                    ))));
                }
            }
            // Only IRQ lines loop; a flood of them must not extend the wait forever.
            if Instant::now() > deadline {
                return Err(self.timed_out(command));
            }
        }
    }

    /// Sends a single command line (no `\n`) and returns the text after `OK`.
    fn exchange(&self, kind: Kind, build: impl FnOnce(&mut String)) -> Result<String, Error> {
        if self.is_dead() {
            return Err(Error::Dead);
        }
        let mut guard = lock(&self.conn);
        if self.is_dead() {
            return Err(Error::Dead);
        }
        let conn = &mut *guard;
        conn.text.clear();
        build(&mut conn.text);
        if !conn.text.ends_with('\n') {
            conn.text.push('\n');
        }
        self.counters.count(kind);
        bump(&self.counters.round_trips, 1);
        let text = std::mem::take(&mut conn.text);
        let result = match conn.writer.write_all(text.as_bytes()) {
            Err(e) => Err(self.write_error(e, &text)),
            Ok(()) => self.read_reply(conn, &text).and_then(|r| r),
        };
        conn.text = text;
        result
    }

    pub(crate) fn op(&self, op: Op<'_>) -> Result<u64, Error> {
        if op.is_noop() {
            return Ok(0);
        }
        let rest = self.exchange(op.kind(), |t| op.format(t))?;
        op.parse_reply(&rest)
    }

    // ---- raw --------------------------------------------------------------------

    /// Sends any qtest command line (without the newline) and returns the text after
    /// `OK`. For commands this crate has no method for (`irq_intercept_out`,
    /// `set_irq_in`, `module_load`...).
    pub fn raw(&self, command: &str) -> Result<String, Error> {
        if command.contains('\n') {
            return Err(Error::Protocol(
                "a qtest command must be a single line".to_string(),
            ));
        }
        self.exchange(Kind::Other, |t| t.push_str(command))
    }

    // ---- port I/O ---------------------------------------------------------------

    /// 8-bit port read.
    pub fn inb(&self, port: u16) -> Result<u8, Error> {
        Ok(self.op(Op::Inb(port))? as u8)
    }
    /// 16-bit port read.
    pub fn inw(&self, port: u16) -> Result<u16, Error> {
        Ok(self.op(Op::Inw(port))? as u16)
    }
    /// 32-bit port read.
    pub fn inl(&self, port: u16) -> Result<u32, Error> {
        Ok(self.op(Op::Inl(port))? as u32)
    }
    /// 8-bit port write.
    pub fn outb(&self, port: u16, v: u8) -> Result<(), Error> {
        self.op(Op::Outb(port, v)).map(drop)
    }
    /// 16-bit port write.
    pub fn outw(&self, port: u16, v: u16) -> Result<(), Error> {
        self.op(Op::Outw(port, v)).map(drop)
    }
    /// 32-bit port write.
    pub fn outl(&self, port: u16, v: u32) -> Result<(), Error> {
        self.op(Op::Outl(port, v)).map(drop)
    }

    // ---- memory (guest-physical: RAM or MMIO) -----------------------------------

    /// 8-bit guest-physical read.
    pub fn readb(&self, addr: u64) -> Result<u8, Error> {
        Ok(self.op(Op::Readb(addr))? as u8)
    }
    /// 16-bit guest-physical read (little-endian guest).
    pub fn readw(&self, addr: u64) -> Result<u16, Error> {
        Ok(self.op(Op::Readw(addr))? as u16)
    }
    /// 32-bit guest-physical read.
    pub fn readl(&self, addr: u64) -> Result<u32, Error> {
        Ok(self.op(Op::Readl(addr))? as u32)
    }
    /// 64-bit guest-physical read.
    pub fn readq(&self, addr: u64) -> Result<u64, Error> {
        self.op(Op::Readq(addr))
    }
    /// 8-bit guest-physical write.
    pub fn writeb(&self, addr: u64, v: u8) -> Result<(), Error> {
        self.op(Op::Writeb(addr, v)).map(drop)
    }
    /// 16-bit guest-physical write.
    pub fn writew(&self, addr: u64, v: u16) -> Result<(), Error> {
        self.op(Op::Writew(addr, v)).map(drop)
    }
    /// 32-bit guest-physical write.
    pub fn writel(&self, addr: u64, v: u32) -> Result<(), Error> {
        self.op(Op::Writel(addr, v)).map(drop)
    }
    /// 64-bit guest-physical write.
    pub fn writeq(&self, addr: u64, v: u64) -> Result<(), Error> {
        self.op(Op::Writeq(addr, v)).map(drop)
    }

    /// Reads `buf.len()` bytes of guest memory at `addr` (`b64read`); empty is a no-op.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        let rest = self.exchange(Kind::BulkRead(len as u64), |t| {
            let _ = write!(t, "b64read 0x{addr:x} 0x{len:x}");
        })?;
        let data = B64
            .decode(rest.split_whitespace().next().unwrap_or(""))
            .map_err(|e| Error::Protocol(format!("bad base64 in b64read reply: {e}")))?;
        if data.len() != len {
            return Err(Error::Protocol(format!(
                "b64read of {len} bytes returned {} bytes",
                data.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `data` to guest memory at `addr` (`b64write`); empty is a no-op.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.op(Op::WriteMem(addr, data)).map(drop)
    }

    /// Fills `len` bytes of guest memory at `addr` with `byte`; zero length is a no-op.
    pub fn memset(&self, addr: u64, len: u64, byte: u8) -> Result<(), Error> {
        self.op(Op::Memset(addr, len, byte)).map(drop)
    }

    /// Runs `ops` pipelined: all commands are written, then all replies read, in one
    /// socket round trip (per 1024 ops). Returns one value per op: the value read, or 0
    /// for writes. The whole batch runs under the connection lock, so it is atomic with
    /// respect to other threads.
    ///
    /// If some op fails with a `FAIL` reply, the remaining replies are still consumed
    /// (the stream stays in sync) and the first such error is returned.
    pub fn batch(&self, ops: &[Op<'_>]) -> Result<Vec<u64>, Error> {
        let mut values = vec![0u64; ops.len()];
        if self.is_dead() {
            return Err(Error::Dead);
        }
        let mut guard = lock(&self.conn);
        let conn = &mut *guard;
        let mut first_err: Option<Error> = None;
        let mut text = std::mem::take(&mut conn.text);
        let mut sent: Vec<(usize, usize, usize)> = Vec::new(); // (op index, start, end)
        let mut result = Ok(());
        for (chunk_no, chunk) in ops.chunks(BATCH_CHUNK).enumerate() {
            if self.is_dead() {
                result = Err(Error::Dead);
                break;
            }
            let base = chunk_no * BATCH_CHUNK;
            text.clear();
            sent.clear();
            for (i, op) in chunk.iter().enumerate() {
                if op.is_noop() {
                    continue;
                }
                let start = text.len();
                op.format(&mut text);
                sent.push((base + i, start, text.len()));
                self.counters.count(op.kind());
            }
            if sent.is_empty() {
                continue;
            }
            bump(&self.counters.round_trips, 1);
            if let Err(e) = conn.writer.write_all(text.as_bytes()) {
                let cmd = &text[sent[0].1..sent[0].2];
                result = Err(self.write_error(e, cmd));
                break;
            }
            for &(idx, start, end) in &sent {
                let cmd = &text[start..end];
                match self.read_reply(conn, cmd) {
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Ok(Ok(rest)) => match ops[idx].parse_reply(&rest) {
                        Ok(v) => values[idx] = v,
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    },
                }
            }
            if result.is_err() {
                break;
            }
        }
        text.clear();
        conn.text = text;
        result?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(values),
        }
    }

    // ---- interrupts -------------------------------------------------------------

    /// Intercepts the GPIO inputs of the QOM object `qom_path` (e.g. `"ioapic"`): QEMU
    /// then reports their changes as `IRQ raise/lower N` lines. QEMU allows one
    /// intercept per process.
    pub fn irq_intercept_in(&self, qom_path: &str) -> Result<(), Error> {
        if qom_path.contains(char::is_whitespace) {
            return Err(Error::Protocol(format!("bad QOM path `{qom_path}`")));
        }
        self.exchange(Kind::Other, |t| {
            t.push_str("irq_intercept_in ");
            t.push_str(qom_path);
        })
        .map(drop)
    }

    /// The level of interrupt line `line` as last reported by QEMU (no I/O: call
    /// [`sync_irqs`](QTest::sync_irqs) first to absorb lines not read yet).
    pub fn irq_level(&self, line: u32) -> bool {
        lock(&self.irqs).get(&line).is_some_and(|l| l.level)
    }

    /// How many `IRQ raise` events were seen for `line` so far (no I/O).
    pub fn irq_raises(&self, line: u32) -> u64 {
        lock(&self.irqs).get(&line).map_or(0, |l| l.raises)
    }

    /// One cheap round trip (`endianness`) that absorbs any IRQ lines QEMU already sent.
    pub fn sync_irqs(&self) -> Result<(), Error> {
        self.exchange(Kind::Other, |t| t.push_str("endianness"))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::thread;

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0x1f"), Some(0x1f));
        assert_eq!(parse_number("0x00000000000000ff"), Some(0xff));
        assert_eq!(parse_number("0XAB"), Some(0xab));
        assert_eq!(parse_number("42"), Some(42));
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("010"), Some(8));
        assert_eq!(parse_number("0xffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("zz"), None);
    }

    #[test]
    fn formats() {
        let mut s = String::new();
        Op::Outl(0xcf8, 0x8000_0800).format(&mut s);
        Op::Writeq(0x1000, u64::MAX).format(&mut s);
        Op::WriteMem(0x10, b"abc").format(&mut s);
        Op::Memset(0x20, 16, 0xaa).format(&mut s);
        assert_eq!(
            s,
            "outl 0xcf8 0x80000800\nwriteq 0x1000 0xffffffffffffffff\n\
             b64write 0x10 0x3 YWJj\nmemset 0x20 0x10 0xaa\n"
        );
    }

    /// A scripted fake QEMU: answers each received line with `f(line)` (several lines
    /// allowed, or none to stay silent).
    fn fake(
        f: impl Fn(&str) -> Option<String> + Send + 'static,
        timeout: Duration,
    ) -> (QTest, thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let h = thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let r = BufReader::new(b);
            for line in r.lines() {
                let Ok(line) = line else { break };
                match f(&line) {
                    Some(reply) => {
                        if w.write_all(reply.as_bytes()).is_err() {
                            break;
                        }
                    }
                    None => thread::sleep(Duration::from_secs(5)),
                }
            }
        });
        (QTest::new(a, timeout).unwrap(), h)
    }

    #[test]
    fn irq_lines_interleaved_and_widths() {
        let (qt, _h) = fake(
            |l| {
                Some(match l {
                    "inb 0x10" => "IRQ raise 21\nOK 0x7\n".into(),
                    "inw 0x10" => "IRQ lower 21\nIRQ raise 5\nOK 0x0000beef\n".into(),
                    "readq 0x0" => "OK 0x0123456789abcdef\n".into(),
                    "inl 0x10" => "OK 0x1ff\n".into(),
                    "readb 0x0" => "OK 0x1ff\n".into(),
                    "endianness" => "IRQ raise 21\nOK little\n".into(),
                    "bogus" => "FAIL Unknown command 'bogus'\n".into(),
                    _ => "OK\n".into(),
                })
            },
            Duration::from_secs(5),
        );
        assert_eq!(qt.inb(0x10).unwrap(), 7);
        assert!(qt.irq_level(21));
        assert_eq!(qt.irq_raises(21), 1);
        assert_eq!(qt.inw(0x10).unwrap(), 0xbeef);
        assert!(!qt.irq_level(21));
        assert!(qt.irq_level(5));
        assert_eq!(qt.readq(0).unwrap(), 0x0123_4567_89ab_cdef);
        assert_eq!(qt.inl(0x10).unwrap(), 0x1ff);
        assert!(matches!(qt.readb(0), Err(Error::Protocol(_))));
        qt.sync_irqs().unwrap();
        assert_eq!(qt.irq_raises(21), 2);
        assert!(matches!(qt.raw("bogus"), Err(Error::Qtest(l)) if l.starts_with("FAIL")));
        assert!(!qt.is_dead());
        let s = qt.stats();
        assert_eq!(s.port_reads, 3);
        assert_eq!(s.irq_events, 4);
        assert_eq!(s.round_trips, s.commands());
    }

    #[test]
    fn batch_keeps_sync_after_fail() {
        let (qt, _h) = fake(
            |l| {
                Some(match l {
                    "readl 0x0" => "OK 0x11\n".into(),
                    "readl 0x4" => "FAIL nope\n".into(),
                    "readl 0x8" => "OK 0x33\n".into(),
                    _ => "OK\n".into(),
                })
            },
            Duration::from_secs(5),
        );
        let e = qt
            .batch(&[Op::Readl(0), Op::Readl(4), Op::Readl(8)])
            .unwrap_err();
        assert!(matches!(e, Error::Qtest(_)));
        // The stream is still in sync: the next command gets its own reply.
        assert_eq!(qt.readl(8).unwrap(), 0x33);
        let v = qt
            .batch(&[
                Op::Readl(0),
                Op::WriteMem(0, &[]),
                Op::Writel(0, 1),
                Op::Readl(8),
            ])
            .unwrap();
        assert_eq!(v, vec![0x11, 0, 0, 0x33]);
    }

    #[test]
    fn timeout_marks_dead() {
        let (qt, _h) = fake(
            |l| (l != "inb 0x99").then(|| "OK 0x1\n".to_string()),
            Duration::from_millis(300),
        );
        assert_eq!(qt.inb(1).unwrap(), 1);
        let t0 = Instant::now();
        let e = qt.inb(0x99).unwrap_err();
        assert!(
            matches!(&e, Error::Timeout { command, .. } if command == "inb 0x99"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(qt.is_dead());
        let t0 = Instant::now();
        assert!(matches!(qt.inb(1), Err(Error::Dead)));
        assert!(matches!(qt.batch(&[Op::Inb(1)]), Err(Error::Dead)));
        assert!(t0.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn close_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let qt = QTest::new(a, Duration::from_secs(5)).unwrap();
        let e = qt.readl(0).unwrap_err();
        assert!(matches!(e, Error::Closed { .. }), "{e}");
        assert!(qt.is_dead());
        assert!(matches!(qt.readl(0), Err(Error::Dead)));
    }

    #[test]
    fn shared_between_threads() {
        let (qt, _h) = fake(
            |l| {
                let addr = l.split_whitespace().nth(1).unwrap_or("0x0");
                Some(format!("IRQ raise 3\nOK {addr}\n"))
            },
            Duration::from_secs(5),
        );
        thread::scope(|s| {
            for t in 0..4u64 {
                let qt = &qt;
                s.spawn(move || {
                    for i in 0..200u64 {
                        let a = (t << 16) | i;
                        assert_eq!(qt.readq(a).unwrap(), a);
                    }
                });
            }
        });
        assert_eq!(qt.irq_raises(3), 800);
        assert_eq!(qt.stats().mem_reads, 800);
    }
}
