//! `cmn_err(9F)`, `dev_err(9F)`, `scsi_log(9F)`, `panic(9F)`: the variadic
//! entry points are in `csrc/variadic.c`; they format and call these.

use super::devinfo::node;
use crate::machine;
use rvscsi::ffi::dev_info_t;
use std::ffi::{CStr, c_char, c_int, c_void};

/// Where the C side hands a formatted message.
///
/// # Safety
/// `msg` is a NUL-terminated string (the C side's buffer).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_emu_log(dip: *mut c_void, level: c_int, msg: *const c_char) {
    let _kernel = crate::meter::kernel();
    // SAFETY: NUL-terminated by vsnprintf.
    let text = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned();
    let m = if dip.is_null() {
        machine::current()
    } else {
        node(dip.cast::<dev_info_t>(), "dev_err").map(|n| n.machine.clone())
    };
    match m {
        Some(m) => {
            if level == rvscsi::ffi::CE_PANIC {
                m.violation(format!("cmn_err(CE_PANIC): {text}"));
            }
            m.log_line(level, &text);
        }
        None => eprintln!("rvscsi[{level}] (no machine): {text}"),
    }
}

/// `panic(9F)`: the driver's panic handler ends here. In the test bed that
/// is a bug in the driver: report it and abort the process (unwinding
/// through the driver's `extern "C"` frames is not possible).
///
/// # Safety
/// `msg` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rvscsi_emu_panic(msg: *const c_char) -> ! {
    let _kernel = crate::meter::kernel();
    // SAFETY: NUL-terminated by vsnprintf.
    let text = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned();
    eprintln!("rvscsi-emu: kernel panic from the driver: {text}");
    std::process::abort()
}
