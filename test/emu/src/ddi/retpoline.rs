//! `__x86_indirect_thunk_r11`: the kernel's retpoline thunk that the
//! module's indirect calls go through (the kernel target enables
//! `retpoline-external-thunk`, as illumos builds its own C with
//! `-mindirect-branch=thunk-extern`; illumos `uts/intel/ml/retpoline.S`).
//! The test bed's version is a plain indirect jump: speculation hardening
//! is the kernel's business, the control flow is the same.

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".globl __x86_indirect_thunk_r11",
    ".type __x86_indirect_thunk_r11, @function",
    "__x86_indirect_thunk_r11:",
    "    jmp *%r11",
    ".size __x86_indirect_thunk_r11, . - __x86_indirect_thunk_r11",
    options(att_syntax)
);
