//! The one error type of this crate.

use std::fmt;
use std::io;
use std::time::Duration;

/// Everything that can go wrong while launching or talking to QEMU.
///
/// Errors that mean "the connection can no longer be trusted" ([`Error::Timeout`],
/// [`Error::Closed`], [`Error::Io`] on the socket) mark the connection dead: every
/// later call on it returns [`Error::Dead`] at once instead of waiting again.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// QEMU could not be started (binary missing, temp dir or socket setup failed).
    Spawn(String),
    /// QEMU started but did not connect its qtest/QMP sockets, or died while starting;
    /// the message carries its exit status and the tail of its stderr.
    Connect(String),
    /// No reply within the reply timeout: QEMU is wedged (or far too slow).
    Timeout {
        /// The command that got no reply (shortened if long).
        command: String,
        /// How long we waited.
        waited: Duration,
    },
    /// QEMU closed the connection (it exited or crashed) while we waited for a reply.
    Closed {
        /// The command that got no reply (shortened if long).
        command: String,
        /// Exit status and stderr tail of QEMU, when known.
        detail: String,
    },
    /// The connection was already declared dead by an earlier timeout or close.
    Dead,
    /// The qtest server answered `FAIL ...` or `ERR ...` (the whole line is kept).
    Qtest(String),
    /// A QMP command returned an error object.
    Qmp {
        /// QMP error class, e.g. `CommandNotFound`, `GenericError`.
        class: String,
        /// Human readable description from QEMU.
        desc: String,
    },
    /// An I/O error on a socket or file.
    Io(io::Error),
    /// A reply that does not follow the protocol (bad number, bad JSON, wrong length...).
    Protocol(String),
    /// A PCI resource request that cannot be satisfied (BAR does not fit, bad index...).
    Pci(String),
    /// `Qemu::shutdown` found QEMU already dead before it was asked to quit, or could
    /// only stop it with SIGKILL (or not at all).
    Shutdown(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn(m) => write!(f, "cannot start QEMU: {m}"),
            Error::Connect(m) => write!(f, "QEMU did not come up: {m}"),
            Error::Timeout { command, waited } => write!(
                f,
                "no reply from QEMU within {:.1} s to `{command}` (QEMU wedged?); \
                 the connection is now dead",
                waited.as_secs_f64()
            ),
            Error::Closed { command, detail } => {
                write!(
                    f,
                    "QEMU closed the connection while we waited for `{command}`"
                )?;
                if !detail.is_empty() {
                    write!(f, ": {detail}")?;
                }
                Ok(())
            }
            Error::Dead => write!(
                f,
                "the QEMU connection is dead (an earlier reply timed out or QEMU exited)"
            ),
            Error::Qtest(line) => write!(f, "qtest command failed: {line}"),
            Error::Qmp { class, desc } => write!(f, "QMP error {class}: {desc}"),
            Error::Io(e) => write!(f, "I/O error talking to QEMU: {e}"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::Pci(m) => write!(f, "PCI: {m}"),
            Error::Shutdown(m) => write!(f, "QEMU shutdown: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Shortens a command for an error message (a `b64write` line can be 100 KiB long).
pub(crate) fn shorten(cmd: &str) -> String {
    const MAX: usize = 96;
    let cmd = cmd.trim_end();
    if cmd.len() <= MAX {
        return cmd.to_string();
    }
    let mut end = MAX;
    while !cmd.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &cmd[..end], cmd.len())
}
