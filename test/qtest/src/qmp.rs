//! A small QMP (QEMU Machine Protocol) client: JSON objects, one per line.

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::Error;
use crate::line::{LineRead, LineReader};
use crate::qtest::Diagnostics;

/// One QMP connection. Not shared directly: [`crate::Qemu`] wraps it in a mutex.
pub(crate) struct Qmp {
    reader: LineReader,
    writer: UnixStream,
    /// Events received while waiting for replies, oldest first.
    events: VecDeque<Value>,
    timeout: Duration,
    next_id: u64,
    dead: bool,
    diagnostics: Diagnostics,
}

/// What one read from the socket produced.
enum Msg {
    Reply(Value),
    Event,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities.
    pub(crate) fn handshake(
        stream: UnixStream,
        timeout: Duration,
        diagnostics: Diagnostics,
    ) -> Result<Qmp, Error> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: LineReader::new(stream),
            writer,
            events: VecDeque::new(),
            timeout,
            next_id: 1,
            dead: false,
            diagnostics,
        };
        let deadline = Instant::now() + timeout;
        let greeting = loop {
            if let Msg::Reply(v) = qmp.read_msg("QMP greeting", deadline)? {
                break v;
            }
        };
        if greeting.get("QMP").is_none() {
            return Err(Error::Protocol(format!(
                "unexpected QMP greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn fail_closed(&mut self, what: &str) -> Error {
        self.dead = true;
        Error::Closed {
            command: what.to_string(),
            detail: (self.diagnostics)(),
        }
    }

    /// Reads one message; events are queued. `deadline` bounds the whole wait.
    fn read_msg(&mut self, what: &str, deadline: Instant) -> Result<Msg, Error> {
        loop {
            let line = match self.reader.read_line() {
                Ok(LineRead::Line(l)) => l,
                Ok(LineRead::Eof) => return Err(self.fail_closed(what)),
                Ok(LineRead::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            command: what.to_string(),
                            waited: self.timeout,
                        });
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(self.fail_closed(what));
                }
                Err(e) => {
                    self.dead = true;
                    return Err(Error::Io(e));
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| Error::Protocol(format!("bad QMP JSON `{line}`: {e}")))?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                return Ok(Msg::Event);
            }
            return Ok(Msg::Reply(v));
        }
    }

    /// Runs one command and returns its `return` value.
    pub(crate) fn execute(&mut self, execute: &str, args: Value) -> Result<Value, Error> {
        if self.dead {
            return Err(Error::Dead);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": execute, "id": id });
        match args {
            Value::Null => {}
            Value::Object(ref m) if m.is_empty() => {}
            Value::Object(_) => msg["arguments"] = args,
            other => {
                return Err(Error::Protocol(format!(
                    "QMP arguments must be a JSON object, got {other}"
                )));
            }
        }
        let what = format!("QMP {execute}");
        let mut text = msg.to_string();
        text.push('\n');
        self.reader.socket().set_read_timeout(Some(self.timeout))?;
        if let Err(e) = self.writer.write_all(text.as_bytes()) {
            self.dead = true;
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
                    command: what,
                    waited: self.timeout,
                },
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    self.fail_closed(&what)
                }
                _ => Error::Io(e),
            });
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = match self.read_msg(&what, deadline) {
                Ok(Msg::Event) => continue,
                Ok(Msg::Reply(v)) => v,
                Err(e) => {
                    // A reply may still come later: the stream is no longer in step.
                    self.dead = true;
                    return Err(e);
                }
            };
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                // A stray reply (e.g. to a command that timed out): not ours.
                continue;
            }
            if let Some(err) = v.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(Error::Qmp {
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(Error::Protocol(format!("QMP reply without `return`: {v}"))),
            };
        }
    }

    /// Removes and returns the first queued event called `name`.
    fn take_event(&mut self, name: &str) -> Option<Value> {
        let pos = self
            .events
            .iter()
            .position(|e| e.get("event").and_then(Value::as_str) == Some(name))?;
        self.events.remove(pos)
    }

    /// Waits up to `timeout` for an event called `name` (queued ones count).
    pub(crate) fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, Error> {
        if let Some(e) = self.take_event(name) {
            return Ok(e);
        }
        if self.dead {
            return Err(Error::Dead);
        }
        let what = format!("QMP event {name}");
        let deadline = Instant::now() + timeout;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(Error::Timeout {
                    command: what,
                    waited: timeout,
                });
            }
            // Partial lines survive a timeout (see LineReader), so short waits are safe.
            if let Err(e) = self.reader.socket().set_read_timeout(Some(left)) {
                break Err(Error::Io(e));
            }
            match self.read_msg(&what, deadline) {
                Ok(Msg::Event) => {
                    if let Some(e) = self.take_event(name) {
                        break Ok(e);
                    }
                }
                // A reply nobody waits for (stray, after a timeout): drop it.
                Ok(Msg::Reply(_)) => {}
                Err(Error::Timeout { .. }) => {
                    break Err(Error::Timeout {
                        command: what,
                        waited: timeout,
                    });
                }
                Err(e) => break Err(e),
            }
        };
        let _ = self.reader.socket().set_read_timeout(Some(self.timeout));
        result
    }

    /// Returns all events received so far, including those already waiting in the socket.
    pub(crate) fn take_events(&mut self) -> Vec<Value> {
        if !self.dead && self.reader.socket().set_nonblocking(true).is_ok() {
            // Drain what is readable now: with a deadline already passed, the first
            // would-block ends the loop as a "timeout".
            while let Ok(Msg::Event | Msg::Reply(_)) = self.read_msg("QMP events", Instant::now()) {
            }
            let _ = self.reader.socket().set_nonblocking(false);
        }
        self.events.drain(..).collect()
    }

    /// Sends `quit` and waits at most `bound` for the reply or the socket to close.
    pub(crate) fn quit(&mut self, bound: Duration) {
        if self.dead {
            return;
        }
        let _ = self.writer.set_write_timeout(Some(bound));
        let _ = self.reader.socket().set_read_timeout(Some(bound));
        self.timeout = bound;
        let _ = self.execute("quit", Value::Null);
        self.dead = true;
    }
}
