//! Kernel logging through `dev_err(9F)` / `cmn_err(9F)`.
//!
//! Messages are formatted by `core::fmt` into a fixed stack buffer (no heap,
//! usable in interrupt context) and handed to the kernel as one `%s`
//! argument, so no format string of ours is ever interpreted by the kernel.

use super::Dip;
use crate::ffi;
use core::fmt::{self, Write};

/// Longest message kept; longer ones are cut (and end in "...").
pub const MAX_MESSAGE: usize = 200;

/// Severity of a message (the `CE_*` level).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// `CE_NOTE`
    Note,
    /// `CE_WARN`
    Warn,
}

/// A NUL-terminated message under construction.
pub struct MessageBuf {
    buf: [u8; MAX_MESSAGE + 1],
    len: usize,
    truncated: bool,
}

impl MessageBuf {
    /// An empty message.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_MESSAGE + 1],
            len: 0,
            truncated: false,
        }
    }

    /// Formats `args`, cutting what does not fit.
    pub fn format(args: fmt::Arguments<'_>) -> Self {
        let mut m = Self::new();
        let _ = m.write_fmt(args);
        if m.truncated {
            let end = MAX_MESSAGE;
            m.buf[end - 3..end].copy_from_slice(b"...");
            m.len = end;
        }
        m.buf[m.len] = 0;
        m
    }

    /// The text without the terminating NUL.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Pointer to the NUL-terminated text.
    pub fn as_c_ptr(&self) -> *const core::ffi::c_char {
        self.buf.as_ptr().cast()
    }
}

impl Default for MessageBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for MessageBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            // A NUL inside the message would end it early in C.
            let b = if b == 0 { b'?' } else { b };
            if self.len < MAX_MESSAGE {
                self.buf[self.len] = b;
                self.len += 1;
            } else {
                self.truncated = true;
            }
        }
        Ok(())
    }
}

fn ce(level: Level) -> core::ffi::c_int {
    match level {
        Level::Note => ffi::CE_NOTE,
        Level::Warn => ffi::CE_WARN,
    }
}

/// Logs `args` against device node `dip` (`dev_err(9F)`).
pub fn dev_log(dip: Dip, level: Level, args: fmt::Arguments<'_>) {
    let msg = MessageBuf::format(args);
    // SAFETY: valid node; "%s" with one NUL-terminated string argument.
    unsafe {
        ffi::dev_err(
            dip.as_ptr(),
            ce(level),
            c"%s".as_ptr().cast_mut(),
            msg.as_c_ptr(),
        )
    }
}

/// Logs `args` without a device (`cmn_err(9F)`).
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    let msg = MessageBuf::format(args);
    // SAFETY: "rvscsi: %s" with one NUL-terminated string argument.
    unsafe { ffi::cmn_err(ce(level), c"rvscsi: %s".as_ptr(), msg.as_c_ptr()) }
}

/// `dev_warn!(dip, "fmt", args...)`: a `CE_WARN` message about a device.
#[macro_export]
macro_rules! dev_warn {
    ($dip:expr, $($arg:tt)*) => {
        $crate::ddi::log::dev_log($dip, $crate::ddi::log::Level::Warn, format_args!($($arg)*))
    };
}

/// `dev_note!(dip, "fmt", args...)`: a `CE_NOTE` message about a device.
#[macro_export]
macro_rules! dev_note {
    ($dip:expr, $($arg:tt)*) => {
        $crate::ddi::log::dev_log($dip, $crate::ddi::log::Level::Note, format_args!($($arg)*))
    };
}
