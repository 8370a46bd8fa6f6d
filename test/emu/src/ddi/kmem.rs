//! `kmem_alloc(9F)`, `kmem_zalloc(9F)`, `kmem_free(9F)`: checked (the size
//! given to `kmem_free` must be the size allocated; `KM_SLEEP` is not for
//! interrupt context: kmem_alloc(9F) CONTEXT, "can be called from
//! interrupt context only if the KM_NOSLEEP flag is set"; interrupt
//! context is what `servicing_interrupt()` reports, see `cpu.rs`), and the
//! DEBUG-kernel allocator's rules.
//!
//! # DEBUG kmem
//!
//! An illumos DEBUG kernel runs with `kmem_flags = KMF_AUDIT | KMF_DEADBEEF
//! | KMF_REDZONE | KMF_CONTENTS` (usr/src/uts/common/os/kmem.c, the
//! `#ifdef DEBUG` definition of `kmem_flags`); non-DEBUG with 0. For a cache
//! with `KMF_BUFTAG` (= `KMF_DEADBEEF | KMF_REDZONE`, sys/kmem_impl.h):
//! - `kmem_cache_free_debug` runs the cache's destructor on *every* free
//!   and fills the buffer with `KMEM_FREE_PATTERN` (0xdeadbeefdeadbeef);
//! - `kmem_cache_alloc_debug` checks on the next allocation that the
//!   pattern is intact (`verify_and_copy_pattern`; a change is
//!   `KMERR_MODIFIED`, "buffer modified after being freed"), refills it
//!   with `KMEM_UNINITIALIZED_PATTERN` (0xbaddcafebaddcafe) and runs the
//!   constructor on *every* allocation (`construct = 1` under
//!   `KMF_DEADBEEF`);
//! - `kmem_magazine_destroy` (what a reap does with cached buffers)
//!   verifies the pattern again, then frees the buffer to the slab layer;
//!   without `KMF_DEADBEEF` it runs the destructor of each cached
//!   (constructed) buffer instead.
//!
//! `kmem_cache_create` turns `KMF_BUFTAG` into `KMF_FIREWALL` for buffers of
//! `kmem_minfirewall` (PAGESIZE / 2 on amd64, `kmem_init`) bytes or more;
//! the packet cache's objects are smaller, so the pattern rules are the ones
//! that apply.
//!
//! Any cache can be reaped at any time: `kmem_reap` (from the VM system
//! under memory pressure) dispatches `kmem_cache_reap` for every cache on
//! `kmem_taskq`, which destroys the depot's magazines
//! (`kmem_depot_ws_reap` -> `kmem_magazine_destroy`), so a constructed,
//! cached object's destructor runs on another thread whenever the kernel
//! likes, DEBUG or not.
//!
//! For `kmem_alloc` memory (the `kmem_alloc_<size>` caches, no constructor)
//! a DEBUG kernel fills a new buffer with the uninitialized pattern, puts a
//! redzone byte (`KMEM_REDZONE_BYTE`, 0xbb) right after the requested size
//! and checks it in `kmem_free` ("redzone violation: write past end of
//! buffer"), and poisons the freed buffer, checked on its next allocation.
//!
//! The test bed's DEBUG mode does the same: selected for the whole process
//! by `RVSCSI_KMEM_DEBUG=1` (or by a test with [`force_debug`]), with
//! caches reaped at random points drawn from a seeded generator
//! (`RVSCSI_KMEM_SEED`, default [`DEFAULT_SEED`]; `RVSCSI_KMEM_REAP=N`: one
//! reap in N cache operations, 0 never). `RVSCSI_KMEM_REAP` alone (without
//! `RVSCSI_KMEM_DEBUG`) gives a non-DEBUG kernel under memory pressure:
//! objects cached constructed, destroyed by random reaps. Without either,
//! a non-DEBUG kernel with plenty of memory: objects constructed once,
//! cached, never reaped. Freed `kmem_alloc` buffers are not reused by the
//! bed; they wait poisoned in a bounded quarantine and are checked when
//! they leave it (or by [`verify_freed`]).

use super::sync::check_may_sleep;
use super::violation;
use crate::machine::lock;
use rvscsi::ffi;
use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// `KMEM_FREE_PATTERN` (sys/kmem_impl.h): what a freed buffer holds.
pub const FREE_PATTERN: u64 = 0xdead_beef_dead_beef;
/// `KMEM_UNINITIALIZED_PATTERN` (sys/kmem_impl.h): what a new buffer holds
/// before its constructor (or its user) writes it.
pub const UNINITIALIZED_PATTERN: u64 = 0xbadd_cafe_badd_cafe;
/// `KMEM_REDZONE_BYTE` (sys/kmem_impl.h): the byte after a `kmem_alloc`
/// buffer's requested size.
pub const REDZONE_BYTE: u8 = 0xbb;
/// The seed when `RVSCSI_KMEM_SEED` is not set.
pub const DEFAULT_SEED: u64 = 0x6b6d_656d_0000_0011;
/// Cache operations per random reap in DEBUG mode, unless
/// `RVSCSI_KMEM_REAP` says otherwise.
pub const DEFAULT_REAP_ONE_IN: u32 = 64;

/// How the emulated allocator behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KmemMode {
    /// DEBUG kernel (`KMF_DEADBEEF | KMF_REDZONE`): a cache's constructor
    /// and destructor on every allocation and free, freed buffers
    /// poisoned and checked, `kmem_alloc` redzones.
    pub debug: bool,
    /// One random reap in this many cache operations (0: never).
    pub reap_one_in: u32,
    /// Seed of the reap points.
    pub seed: u64,
}

impl KmemMode {
    /// A non-DEBUG kernel with memory to spare (kmem_flags 0, no reaps).
    pub const NORMAL: KmemMode = KmemMode {
        debug: false,
        reap_one_in: 0,
        seed: DEFAULT_SEED,
    };

    /// A DEBUG kernel whose caches are reaped at random.
    pub fn debug(seed: u64) -> KmemMode {
        KmemMode {
            debug: true,
            reap_one_in: DEFAULT_REAP_ONE_IN,
            seed,
        }
    }

    fn from_env() -> KmemMode {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let debug = match var("RVSCSI_KMEM_DEBUG").as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                panic!("RVSCSI_KMEM_DEBUG={other:?}: expected 0 or 1")
            }
        };
        let seed = match var("RVSCSI_KMEM_SEED") {
            None => DEFAULT_SEED,
            Some(s) => parse_u64(&s).unwrap_or_else(|| {
                panic!("RVSCSI_KMEM_SEED={s:?}: expected a decimal or 0x-hex number")
            }),
        };
        let reap_one_in = match var("RVSCSI_KMEM_REAP") {
            None if debug => DEFAULT_REAP_ONE_IN,
            None => 0,
            Some(s) => parse_u64(&s)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or_else(|| {
                    panic!("RVSCSI_KMEM_REAP={s:?}: expected a number (one reap in N operations)")
                }),
        };
        // Nothing printed: rvscsi-sim's own output (its stderr is checked
        // by the CLI tests) must stay as it is; the seed is in every
        // violation the mode finds.
        KmemMode {
            debug,
            reap_one_in,
            seed,
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

static FORCED: Mutex<Option<KmemMode>> = Mutex::new(None);
static FROM_ENV: OnceLock<KmemMode> = OnceLock::new();

/// The mode in effect: [`force_debug`]'s, else the environment's.
pub fn mode() -> KmemMode {
    let forced = *lock(&FORCED);
    let m = forced.unwrap_or_else(|| *FROM_ENV.get_or_init(KmemMode::from_env));
    if m.debug {
        install_fault_hint();
    }
    m
}

/// The signal actions the hint replaced (SIGSEGV, SIGBUS).
static PREVIOUS_ACTIONS: OnceLock<[(c_int, libc::sigaction); 2]> = OnceLock::new();

/// In DEBUG mode a pointer read from freed memory is 0xdeadbeefdeadbeef,
/// a non-canonical amd64 address: using it faults, where a DEBUG kernel
/// panics ("BAD TRAP ... #gp"). The process dies of that fault as it
/// would without the hint; the hint only says first what it most likely
/// is.
fn install_fault_hint() {
    PREVIOUS_ACTIONS.get_or_init(|| {
        // SAFETY: sigaction with a zeroed (then filled) action struct and
        // valid out-pointers; the handler only calls async-signal-safe
        // functions (write, sigaction).
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = fault_hint as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old = [
                (libc::SIGSEGV, std::mem::zeroed()),
                (libc::SIGBUS, std::mem::zeroed()),
            ];
            for (sig, prev) in old.iter_mut() {
                if libc::sigaction(*sig, &new, prev) != 0 {
                    prev.sa_sigaction = libc::SIG_DFL;
                }
            }
            old
        }
    });
}

extern "C" fn fault_hint(sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    const MSG: &[u8] = b"rvscsi-emu: fatal memory fault under DEBUG kmem (RVSCSI_KMEM_DEBUG): a pointer such as 0xdeadbeefdeadbeef (freed) or 0xbaddcafebaddcafe (not yet constructed) read from kmem memory is a use after free; a DEBUG illumos kernel panics here too\n";
    // SAFETY: write(2) and sigaction(2) are async-signal-safe; MSG is
    // static; the previous action was saved before this handler could run.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        // The previous handler (Rust's stack-overflow check, or the
        // default) sees the fault again when the access is retried.
        if let Some(prev) = PREVIOUS_ACTIONS.get() {
            for (s, a) in prev {
                if *s == sig {
                    libc::sigaction(sig, a, std::ptr::null_mut());
                }
            }
        }
    }
}

/// Sets the mode of this process from now on (`None`: back to the
/// environment's). Caches take the mode in effect when they are created
/// (`kmem_cache_create` copies `kmem_flags`); `kmem_alloc` the mode in
/// effect at each call. For tests that need DEBUG kmem whatever the
/// environment says (a test binary of their own, since the setting is
/// process-wide).
pub fn force_debug(m: Option<KmemMode>) {
    *lock(&FORCED) = m;
}

/// A small seeded generator (splitmix64): the same seed and the same
/// sequence of operations give the same reap points.
#[derive(Clone, Debug)]
pub struct Rng(u64);

static STREAMS: AtomicU64 = AtomicU64::new(0);

impl Rng {
    /// A generator for one more cache of this process (each cache its own
    /// stream, derived from the seed and the order of creation).
    pub fn for_new_cache(seed: u64) -> Rng {
        let n = STREAMS.fetch_add(1, Ordering::Relaxed);
        Rng(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True once in `n` calls on average (never for 0).
    pub fn one_in(&mut self, n: u32) -> bool {
        n != 0 && self.next_u64().is_multiple_of(u64::from(n))
    }
}

/// Fills `len` bytes at `p` with `pattern`, word by word in memory order
/// (`copy_pattern` in kmem.c; a tail shorter than a word gets the word's
/// first bytes).
///
/// # Safety
/// `p` must be valid for writes of `len` bytes.
pub unsafe fn fill_pattern(p: *mut u8, len: usize, pattern: u64) {
    let bytes = pattern.to_ne_bytes();
    for i in 0..len {
        // SAFETY: i < len (caller's bound).
        unsafe { p.add(i).write(bytes[i % 8]) };
    }
}

/// The first offset at which the `len` bytes at `p` differ from
/// `pattern`, with the word found there (`verify_pattern` in kmem.c).
///
/// # Safety
/// `p` must be valid for reads of `len` bytes.
pub unsafe fn find_modified(p: *const u8, len: usize, pattern: u64) -> Option<(usize, u64)> {
    let bytes = pattern.to_ne_bytes();
    // SAFETY: the caller's bound.
    let s = unsafe { std::slice::from_raw_parts(p, len) };
    let off = s.iter().enumerate().position(|(i, &b)| b != bytes[i % 8])?;
    let word = off & !7;
    let mut w = [0u8; 8];
    for (i, b) in w.iter_mut().enumerate() {
        *b = s.get(word + i).copied().unwrap_or(0);
    }
    Some((off, u64::from_ne_bytes(w)))
}

/// A buffer handed out by `kmem_alloc`.
#[derive(Clone, Copy)]
struct Alloc {
    /// The size asked for.
    size: usize,
    /// Allocated in DEBUG mode (with a redzone).
    debug: bool,
}

static ALLOCS: Mutex<Option<HashMap<usize, Alloc>>> = Mutex::new(None);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Freed DEBUG-mode buffers, poisoned, oldest first: (address, allocated
/// length, size asked for).
static QUARANTINE: Mutex<VecDeque<(usize, usize, usize)>> = Mutex::new(VecDeque::new());
/// Buffers the quarantine holds at most.
const QUARANTINE_MAX: usize = 4096;

/// `kmem_alloc`/`kmem_zalloc` calls so far (all machines): a loaded
/// module's every heap allocation, its Rust allocator included.
pub fn alloc_calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Bytes really allocated for a buffer of `size`: in DEBUG mode the
/// redzone follows (at least one byte, up to the next 8-byte boundary and
/// one word more, as the buftag follows a kmem_alloc cache's buffer).
fn alloc_len(size: usize, debug: bool) -> usize {
    if debug {
        size.next_multiple_of(8) + 8
    } else {
        size.max(1)
    }
}

fn layout(size: usize, debug: bool) -> Option<Layout> {
    Layout::from_size_align(alloc_len(size, debug), 8).ok()
}

fn kalloc(size: usize, kmflag: c_int, zero: bool) -> *mut c_void {
    if kmflag & ffi::KM_NOSLEEP == 0 {
        check_may_sleep("kmem_alloc(KM_SLEEP)");
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    let debug = mode().debug;
    let Some(l) = layout(size, debug) else {
        return std::ptr::null_mut();
    };
    // SAFETY: non-zero size layout.
    let p = unsafe { if zero { alloc_zeroed(l) } else { alloc(l) } };
    if p.is_null() {
        return std::ptr::null_mut();
    }
    if debug {
        // SAFETY: p has l.size() bytes, size of them the caller's.
        unsafe {
            if !zero {
                fill_pattern(p, size, UNINITIALIZED_PATTERN);
            }
            std::ptr::write_bytes(p.add(size), REDZONE_BYTE, l.size() - size);
        }
    }
    lock(&ALLOCS)
        .get_or_insert_with(HashMap::new)
        .insert(p as usize, Alloc { size, debug });
    p.cast()
}

/// `kmem_alloc(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn kmem_alloc(size: usize, kmflag: c_int) -> *mut c_void {
    let _kernel = crate::meter::kernel();
    kalloc(size, kmflag, false)
}

/// `kmem_zalloc(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn kmem_zalloc(size: usize, kmflag: c_int) -> *mut c_void {
    let _kernel = crate::meter::kernel();
    kalloc(size, kmflag, true)
}

/// Gives a buffer back: in DEBUG mode checks its redzone, poisons it and
/// quarantines it.
fn release(buf: *mut c_void, a: Alloc) {
    let Some(l) = layout(a.size, a.debug) else {
        return;
    };
    let p = buf.cast::<u8>();
    if !a.debug {
        // SAFETY: allocated by kalloc with this layout.
        unsafe { dealloc(p, l) };
        return;
    }
    // SAFETY: the redzone is inside the allocation.
    let redzone = unsafe { find_modified_bytes(p.add(a.size), l.size() - a.size, REDZONE_BYTE) };
    if let Some(off) = redzone {
        violation(format!(
            "kmem_free: redzone violation: write past the end of the {}-byte buffer {buf:p} \
             (at offset {})",
            a.size,
            a.size + off
        ));
    }
    // SAFETY: the whole allocation is ours again.
    unsafe { fill_pattern(p, l.size(), FREE_PATTERN) };
    let evicted = {
        let mut q = lock(&QUARANTINE);
        q.push_back((p as usize, l.size(), a.size));
        if q.len() > QUARANTINE_MAX {
            q.pop_front()
        } else {
            None
        }
    };
    if let Some(e) = evicted {
        check_and_free(e);
    }
}

/// The first offset at which `len` bytes at `p` are not `byte`.
///
/// # Safety
/// `p` must be valid for reads of `len` bytes.
unsafe fn find_modified_bytes(p: *const u8, len: usize, byte: u8) -> Option<usize> {
    // SAFETY: the caller's bound.
    unsafe { std::slice::from_raw_parts(p, len) }
        .iter()
        .position(|&b| b != byte)
}

/// Checks a quarantined buffer's pattern and frees it; true if it was
/// modified after kmem_free.
fn check_and_free((addr, len, size): (usize, usize, usize)) -> bool {
    let p = addr as *mut u8;
    // SAFETY: a quarantined allocation of len bytes, owned by the
    // quarantine.
    let modified = unsafe { find_modified(p, len, FREE_PATTERN) };
    if let Some((off, found)) = modified {
        violation(format!(
            "kmem: the {size}-byte buffer {p:p} was modified after kmem_free: offset {off:#x} \
             holds {found:#018x} instead of {FREE_PATTERN:#018x} (KMERR_MODIFIED)"
        ));
    }
    if let Ok(l) = Layout::from_size_align(len, 8) {
        // SAFETY: allocated by kalloc with this layout.
        unsafe { dealloc(p, l) };
    }
    modified.is_some()
}

/// Checks and frees every quarantined buffer (DEBUG mode); the number
/// that were written after `kmem_free` (each also a violation).
pub fn verify_freed() -> usize {
    let all: Vec<_> = lock(&QUARANTINE).drain(..).collect();
    all.into_iter().filter(|&e| check_and_free(e)).count()
}

/// `kmem_free(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn kmem_free(buf: *mut c_void, size: usize) {
    let _kernel = crate::meter::kernel();
    let found = lock(&ALLOCS)
        .get_or_insert_with(HashMap::new)
        .remove(&(buf as usize));
    match found {
        Some(a) if a.size == size => release(buf, a),
        Some(a) => {
            violation(format!(
                "kmem_free of {size} bytes, allocated as {}",
                a.size
            ));
            release(buf, a);
        }
        None => violation(format!(
            "kmem_free of {buf:p}, which kmem_alloc did not return"
        )),
    }
}

/// Bytes allocated with `kmem_alloc` and not freed (all machines).
pub fn outstanding_bytes() -> usize {
    lock(&ALLOCS)
        .get_or_insert_with(HashMap::new)
        .values()
        .map(|a| a.size)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_found_where_they_were_broken() {
        let mut b = [0u8; 37];
        // SAFETY: b has 37 bytes.
        unsafe { fill_pattern(b.as_mut_ptr(), b.len(), FREE_PATTERN) };
        // SAFETY: reads b's 37 bytes, which the slice owns.
        let intact = unsafe { find_modified(b.as_ptr(), b.len(), FREE_PATTERN) };
        assert_eq!(intact, None);
        assert_eq!(&b[..4], &0xdeadbeef_u32.to_ne_bytes());
        b[19] = 0;
        // SAFETY: reads b's 37 bytes again (no borrow of b is live).
        let (off, word) = unsafe { find_modified(b.as_ptr(), b.len(), FREE_PATTERN) }.unwrap();
        assert_eq!(off, 19);
        assert_ne!(word, FREE_PATTERN);
    }

    #[test]
    fn the_generator_is_reproducible() {
        let mut a = Rng(7);
        let mut b = Rng(7);
        let x: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let y: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(x, y);
        assert!(!Rng(1).one_in(0));
    }

    fn orphan_violations_about(p: *mut c_void) -> Vec<String> {
        let at = format!("{p:p}");
        lock(&crate::ddi::ORPHAN_VIOLATIONS)
            .iter()
            .filter(|v| v.contains(&at))
            .cloned()
            .collect()
    }

    #[test]
    fn debug_kmem_alloc_is_uninitialized_redzoned_and_poisoned_after_free() {
        force_debug(Some(KmemMode::debug(DEFAULT_SEED)));
        let p = kmem_alloc(13, ffi::KM_NOSLEEP);
        assert!(!p.is_null());
        // SAFETY: 13 bytes allocated.
        let head = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 13) }.to_vec();
        assert_eq!(&head[..8], &UNINITIALIZED_PATTERN.to_ne_bytes());
        // A write one past the end: the redzone.
        // SAFETY: the allocation has a redzone after the 13 bytes.
        unsafe { p.cast::<u8>().add(13).write(0) };
        kmem_free(p, 13);
        let v = orphan_violations_about(p);
        assert!(v.iter().any(|v| v.contains("redzone violation")), "{v:?}");
        // Then poisoned.
        // SAFETY: quarantined, still allocated (redzone included).
        let freed = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 8) }.to_vec();
        assert_eq!(&freed[..], &FREE_PATTERN.to_ne_bytes());

        let q = kmem_zalloc(16, ffi::KM_NOSLEEP);
        kmem_free(q, 16);
        // A write after the free: the buffer waits in the quarantine (still
        // allocated), poisoned.
        // SAFETY: quarantined memory is not freed before verify_freed.
        unsafe { q.cast::<u8>().add(3).write(7) };
        assert!(verify_freed() >= 1);
        let v = orphan_violations_about(q);
        assert!(
            v.iter().any(|v| v.contains("modified after kmem_free")),
            "{v:?}"
        );
        force_debug(None);
    }

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_u64("17"), Some(17));
        assert_eq!(parse_u64("0x11"), Some(17));
        assert_eq!(parse_u64("x"), None);
    }
}
