//! DMA: handles, memory, binding, cookies, windows, synchronization
//! (`ddi_dma_alloc_handle(9F)`, `ddi_dma_mem_alloc(9F)`,
//! `ddi_dma_addr_bind_handle(9F)`, `ddi_dma_buf_bind_handle(9F)`,
//! `ddi_dma_sync(9F)`, `ddi_dma_getwin(9F)`, ...).
//!
//! The strict part: memory the driver gets from `ddi_dma_mem_alloc` is a
//! host buffer (the "kernel virtual address") backed by separate guest
//! pages that the device sees. Bytes move between the two only in
//! `ddi_dma_sync` (FORDEV: host to guest; FORCPU/FORKERNEL: guest to
//! host), so a missing or misplaced sync shows up as wrong data. Fresh
//! guest pages are filled with a poison pattern for the same reason.
//!
//! Buffers of SCSI commands (`ddi_dma_buf_bind_handle`) are mapped onto
//! deliberately scattered guest pages, cut into cookies and windows by the
//! handle's `ddi_dma_attr` (sgllen, count_max, segment boundary, maxxfer,
//! granularity), copied to the device at bind (writes) and back at unbind
//! (reads), as a copy-buffering nexus would.

use super::devinfo::node;
use super::violation;
use crate::machine::{Machine, PAGE, bump, lock};
use rvscsi::ffi::{
    self, caddr_t, ddi_acc_handle_t, ddi_callback_t, ddi_device_acc_attr_t, ddi_dma_attr_t,
    ddi_dma_cookie_t, ddi_dma_handle_t, dev_info_t, off_t,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// What fresh guest pages of DMA memory contain until the driver syncs.
pub const POISON: u8 = 0xa5;

/// DMA memory from `ddi_dma_mem_alloc`.
pub struct DmaMem {
    machine: Arc<Machine>,
    host: *mut u8,
    layout: std::alloc::Layout,
    /// Bytes usable.
    pub len: usize,
    /// Guest address of byte 0.
    pub gpa: u64,
    pages: usize,
}

// SAFETY: the host buffer is owned by this object and only copied by the
// emulation under the handle locks; the driver accesses it as it likes
// (that is its business, as in a kernel).
unsafe impl Send for DmaMem {}
// SAFETY: as above.
unsafe impl Sync for DmaMem {}

impl Drop for DmaMem {
    fn drop(&mut self) {
        quarantine(&self.machine, self.gpa, self.pages);
        self.machine.free_pages(self.gpa, self.pages);
        // SAFETY: allocated with this layout in ddi_dma_mem_alloc.
        unsafe { std::alloc::dealloc(self.host, self.layout) };
    }
}

/// What the guest pages of freed DMA memory hold until they are handed
/// out again. A device still using memory its driver freed (a ring it was
/// never told to stop using, a completion landing after detach) changes
/// it; the next allocation of the page, or [`check_freed`], sees the
/// change. In a kernel that write would land silently in whatever the
/// page became: the bed makes it a violation.
pub const FREED: u8 = 0xdf;

/// A freed guest page being watched.
struct Watched {
    /// The machine (a `Weak` keeps its address from being reused while
    /// the entry exists).
    machine: std::sync::Weak<Machine>,
    /// Byte length and guest address of the allocation it was part of.
    alloc: (usize, u64),
}

/// Freed `ddi_dma_mem_alloc` pages by (machine address, guest page).
static WATCHED: Mutex<BTreeMap<(usize, u64), Watched>> = Mutex::new(BTreeMap::new());

fn machine_key(m: &Arc<Machine>) -> usize {
    Arc::as_ptr(m) as usize
}

/// Fills freed pages with [`FREED`] and starts watching them.
fn quarantine(m: &Arc<Machine>, gpa: u64, pages: usize) {
    if m.dead.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = m.qt.memset(gpa, pages as u64 * PAGE, FREED) {
        m.device_failed("freed DMA memory fill", &e);
        return;
    }
    let mut w = lock(&WATCHED);
    for i in 0..pages as u64 {
        w.insert(
            (machine_key(m), gpa + i * PAGE),
            Watched {
                machine: Arc::downgrade(m),
                alloc: (pages * PAGE as usize, gpa),
            },
        );
    }
}

/// Checks watched pages of `m` in `[gpa, gpa + pages)` (all of them when
/// `range` is None): a byte that is not [`FREED`] is a device write into
/// freed memory. Pages handed out again (`reused`) are no longer watched;
/// the others are filled again, so that each write is reported once.
fn verify_freed(m: &Arc<Machine>, range: Option<(u64, usize)>, reused: bool) {
    let key = machine_key(m);
    let pages: Vec<(u64, (usize, u64))> = {
        let mut w = lock(&WATCHED);
        // Entries of machines that are gone can never be checked.
        w.retain(|_, e| e.machine.strong_count() > 0);
        let (lo, hi) = match range {
            Some((gpa, n)) => (gpa, gpa + n as u64 * PAGE),
            None => (0, u64::MAX),
        };
        let found: Vec<(u64, (usize, u64))> = w
            .range((key, lo)..(key, hi))
            .map(|(&(_, g), e)| (g, e.alloc))
            .collect();
        if reused {
            for (g, _) in &found {
                w.remove(&(key, *g));
            }
        }
        found
    };
    if m.dead.load(Ordering::Acquire) {
        return;
    }
    let mut buf = vec![0u8; PAGE as usize];
    for (g, (len, start)) in pages {
        if let Err(e) = m.qt.read_mem(g, &mut buf) {
            m.device_failed("freed DMA memory check", &e);
            return;
        }
        if let Some(at) = buf.iter().position(|&b| b != FREED) {
            let changed = buf.iter().filter(|&&b| b != FREED).count();
            m.violation(format!(
                "the device wrote into freed DMA memory: {changed} byte(s) of guest page {g:#x} \
                 (first at {:#x}) changed after ddi_dma_mem_free of the {len}-byte allocation at \
                 {start:#x}",
                g + at as u64
            ));
            if !reused && let Err(e) = m.qt.memset(g, PAGE, FREED) {
                m.device_failed("freed DMA memory fill", &e);
                return;
            }
        }
    }
}

/// Checks every freed DMA page of `m` still watched for device writes
/// since it was freed or last checked (a violation for each changed
/// page); they stay watched until handed out again. The bed calls it when
/// it reports (after detach or a failed attach).
pub fn check_freed(m: &Arc<Machine>) {
    verify_freed(m, None, false);
}

/// Whether memory `[gpa, gpa + pages)` holds a virtqueue the device still
/// uses: the rings the driver gave the device (followed by the fault layer
/// from the register writes, virtio 1.2 §4.1.4.3, §4.1.5.1) stay the
/// device's until a device reset (status 0) takes them back.
fn rings_in(m: &Machine, gpa: u64, pages: usize) -> Option<u16> {
    let end = gpa + pages as u64 * PAGE;
    m.faults
        .queues()
        .into_iter()
        .find(|&(_, size, desc, avail, used, enabled)| {
            enabled && size > 0 && [desc, avail, used].iter().any(|&a| a >= gpa && a < end)
        })
        .map(|(q, ..)| q)
}

/// DMA memory by host start address.
static MEMS: Mutex<BTreeMap<usize, Arc<DmaMem>>> = Mutex::new(BTreeMap::new());
/// Access handles of DMA memory (what ddi_dma_mem_free takes).
static MEM_ACC: Mutex<Option<HashMap<usize, Arc<DmaMem>>>> = Mutex::new(None);

fn mem_containing(addr: usize, len: usize) -> Option<(Arc<DmaMem>, usize)> {
    let mems = lock(&MEMS);
    let (&start, m) = mems.range(..=addr).next_back()?;
    let off = addr - start;
    (off + len <= m.len).then(|| (m.clone(), off))
}

#[derive(Clone)]
struct Window {
    off: usize,
    len: usize,
    cookies: Vec<ddi_dma_cookie_t>,
}

enum Object {
    /// Part of a `ddi_dma_mem_alloc` allocation.
    Mem {
        mem: Arc<DmaMem>,
        off: usize,
        len: usize,
    },
    /// A `buf(9S)`: host bytes on scattered guest pages.
    Buf {
        host: usize,
        len: usize,
        first_off: usize,
        pages: Vec<u64>,
    },
}

impl Object {
    fn len(&self) -> usize {
        match self {
            Object::Mem { len, .. } | Object::Buf { len, .. } => *len,
        }
    }

    /// (guest address, host address, bytes) pieces of `[off, off+len)`.
    fn pieces(&self, off: usize, len: usize) -> Vec<(u64, usize, usize)> {
        match self {
            Object::Mem { mem, off: base, .. } => {
                vec![(
                    mem.gpa + (base + off) as u64,
                    mem.host as usize + base + off,
                    len,
                )]
            }
            Object::Buf {
                host,
                first_off,
                pages,
                ..
            } => {
                let mut out = Vec::new();
                let (mut at, end) = (off, off + len);
                while at < end {
                    let virt = first_off + at;
                    let page = virt / PAGE as usize;
                    let in_page = virt % PAGE as usize;
                    let n = (PAGE as usize - in_page).min(end - at);
                    out.push((pages[page] + in_page as u64, host + at, n));
                    at += n;
                }
                out
            }
        }
    }

    fn to_device(&self, m: &Machine, off: usize, len: usize) {
        for (gpa, host, n) in self.pieces(off, len) {
            // SAFETY: host..host+n lies in the bound object, which the
            // driver (or target driver) keeps alive while it is bound.
            let src = unsafe { std::slice::from_raw_parts(host as *const u8, n) };
            m.write_mem(gpa, src);
        }
    }

    fn to_cpu(&self, m: &Machine, off: usize, len: usize) {
        for (gpa, host, n) in self.pieces(off, len) {
            // SAFETY: as in to_device.
            let dst = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, n) };
            m.read_mem(gpa, dst);
        }
    }
}

struct Binding {
    flags: u32,
    object: Object,
    windows: Vec<Window>,
    cur_win: usize,
    next_cookie: usize,
}

/// A DMA handle.
pub struct DmaHandle {
    machine: Arc<Machine>,
    attr: ddi_dma_attr_t,
    binding: Mutex<Option<Binding>>,
}

static HANDLES: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

/// Whether live DMA handle `h` was allocated with `DDI_DMA_FLAGERR`: only
/// then does the nexus tie a DMA fault to it (ddifm.c: the driver "must set
/// the dma_attr_flags ... to DDI_DMA_FLAGERR"), and `ddi_fm_dma_err_get`
/// report it.
pub fn flags_errors(h: ddi_dma_handle_t) -> bool {
    is_live(h) && {
        // SAFETY: `h` is in HANDLES, so it is a box made by
        // ddi_dma_alloc_handle and not yet freed; the caller (the FM
        // emulation, on behalf of the driver's ddi_fm_dma_err_get) uses a
        // handle the driver still holds, and the DDI forbids freeing a
        // handle while it is in use, so the box outlives this read. Only a
        // shared reference is made.
        let d = unsafe { &*h.cast::<DmaHandle>() };
        d.attr.dma_attr_flags & ffi::DDI_DMA_FLAGERR != 0
    }
}

/// Every live DMA handle of machine `m` (to inject faults on, as the
/// nexus would find them).
pub fn handles(m: &Machine) -> Vec<ddi_dma_handle_t> {
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .iter()
        .map(|&h| h as ddi_dma_handle_t)
        .filter(|&h| {
            // SAFETY: HANDLES is locked while we iterate it, and
            // ddi_dma_free_handle takes a handle out of HANDLES (under this
            // lock) before it frees the box: every handle here is a live box
            // made by ddi_dma_alloc_handle. Only a shared reference is made.
            let d = unsafe { &*h.cast::<DmaHandle>() };
            std::ptr::eq(Arc::as_ptr(&d.machine), m)
        })
        .collect()
}

/// Whether `h` is a live DMA handle (no violation when it is not).
pub fn is_live(h: ddi_dma_handle_t) -> bool {
    !h.is_null()
        && lock(&HANDLES)
            .get_or_insert_with(HashSet::new)
            .contains(&(h as usize))
}

fn handle<'a>(h: ddi_dma_handle_t, func: &str) -> Option<&'a DmaHandle> {
    if h.is_null()
        || !lock(&HANDLES)
            .get_or_insert_with(HashSet::new)
            .contains(&(h as usize))
    {
        violation(format!("{func}: invalid DMA handle {h:p}"));
        return None;
    }
    // SAFETY: registered handles are live boxes.
    Some(unsafe { &*h.cast::<DmaHandle>() })
}

/// Whether `attr` is one the DDI accepts.
fn attr_ok(a: &ddi_dma_attr_t) -> Result<(), &'static str> {
    if a.dma_attr_version != ffi::DMA_ATTR_V0 {
        return Err("dma_attr_version is not DMA_ATTR_V0");
    }
    if a.dma_attr_sgllen < 1 {
        return Err("dma_attr_sgllen < 1");
    }
    if a.dma_attr_count_max == 0 || a.dma_attr_addr_hi <= a.dma_attr_addr_lo {
        return Err("empty address range or count_max");
    }
    if a.dma_attr_align == 0 || !a.dma_attr_align.is_power_of_two() {
        return Err("dma_attr_align is not a power of two");
    }
    if a.dma_attr_granular == 0 {
        return Err("dma_attr_granular is 0");
    }
    Ok(())
}

/// Cuts physical segments into cookies by `count_max` and the segment
/// boundary.
fn cookies_of(segs: &[(u64, usize)], a: &ddi_dma_attr_t) -> Vec<ddi_dma_cookie_t> {
    let max = a.dma_attr_count_max.saturating_add(1);
    let mut out: Vec<ddi_dma_cookie_t> = Vec::new();
    for &(gpa, len) in segs {
        let (mut at, mut left) = (gpa, len as u64);
        while left > 0 {
            let boundary = if a.dma_attr_seg == u64::MAX {
                u64::MAX
            } else {
                (at | a.dma_attr_seg).saturating_add(1)
            };
            let n = left.min(max).min(boundary - at);
            // Contiguous with the previous cookie and still within limits:
            // one cookie, as a nexus would do.
            if let Some(last) = out.last_mut() {
                let end = last.dmac_laddress + last.dmac_size as u64;
                let same_seg = a.dma_attr_seg == u64::MAX
                    || (last.dmac_laddress | a.dma_attr_seg) == (at | a.dma_attr_seg);
                if end == at && same_seg && last.dmac_size as u64 + n <= max {
                    last.dmac_size += n as usize;
                    at += n;
                    left -= n;
                    continue;
                }
            }
            out.push(ddi_dma_cookie_t {
                dmac_laddress: at,
                dmac_size: n as usize,
                dmac_type: 0,
            });
            at += n;
            left -= n;
        }
    }
    out
}

/// Splits cookies into windows of at most `sgllen` cookies and `maxxfer`
/// bytes, each but the last a multiple of `granular` bytes.
fn windows_of(cookies: Vec<ddi_dma_cookie_t>, a: &ddi_dma_attr_t) -> Option<Vec<Window>> {
    let sgllen = a.dma_attr_sgllen as usize;
    let maxxfer = a.dma_attr_maxxfer.max(1) as usize;
    let gran = a.dma_attr_granular as usize;
    let mut queue: VecDeque<ddi_dma_cookie_t> = cookies.into();
    let mut windows = Vec::new();
    let mut cur: Vec<ddi_dma_cookie_t> = Vec::new();
    let mut cur_len = 0usize;
    let mut off = 0usize;
    let mut close = |cur: &mut Vec<ddi_dma_cookie_t>,
                     cur_len: &mut usize,
                     queue: &mut VecDeque<ddi_dma_cookie_t>,
                     last: bool|
     -> bool {
        if !last {
            let mut excess = *cur_len % gran;
            while excess > 0 {
                let Some(c) = cur.pop() else { return false };
                if c.dmac_size > excess {
                    let keep = c.dmac_size - excess;
                    cur.push(ddi_dma_cookie_t {
                        dmac_size: keep,
                        ..c
                    });
                    queue.push_front(ddi_dma_cookie_t {
                        dmac_laddress: c.dmac_laddress + keep as u64,
                        dmac_size: excess,
                        dmac_type: 0,
                    });
                    excess = 0;
                } else {
                    excess -= c.dmac_size;
                    queue.push_front(c);
                }
            }
            *cur_len -= *cur_len % gran;
        }
        if cur.is_empty() {
            return false;
        }
        windows.push(Window {
            off,
            len: *cur_len,
            cookies: std::mem::take(cur),
        });
        off += *cur_len;
        *cur_len = 0;
        true
    };
    while let Some(c) = queue.pop_front() {
        if cur.len() == sgllen || cur_len == maxxfer {
            queue.push_front(c);
            if !close(&mut cur, &mut cur_len, &mut queue, false) {
                return None;
            }
            continue;
        }
        let take = c.dmac_size.min(maxxfer - cur_len);
        cur.push(ddi_dma_cookie_t {
            dmac_size: take,
            ..c
        });
        cur_len += take;
        if take < c.dmac_size {
            queue.push_front(ddi_dma_cookie_t {
                dmac_laddress: c.dmac_laddress + take as u64,
                dmac_size: c.dmac_size - take,
                dmac_type: 0,
            });
        }
    }
    if !cur.is_empty() && !close(&mut cur, &mut cur_len, &mut queue, true) {
        return None;
    }
    Some(windows)
}

/// `ddi_dma_alloc_handle(9F)`
///
/// # Safety
/// Pointers must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_alloc_handle(
    dip: *mut dev_info_t,
    attr: *const ddi_dma_attr_t,
    _waitfp: ddi_callback_t,
    _arg: caddr_t,
    handlep: *mut ddi_dma_handle_t,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_dma_alloc_handle") else {
        return ffi::DDI_FAILURE;
    };
    if attr.is_null() || handlep.is_null() {
        violation("ddi_dma_alloc_handle: null pointer argument");
        return ffi::DDI_FAILURE;
    }
    // SAFETY: checked non-null; the caller's attribute structure.
    let attr = unsafe { *attr };
    if let Err(why) = attr_ok(&attr) {
        violation(format!("ddi_dma_alloc_handle: bad attributes: {why}"));
        return -8; // DDI_DMA_BADATTR
    }
    let h = Box::new(DmaHandle {
        machine: n.machine.clone(),
        attr,
        binding: Mutex::new(None),
    });
    bump(&n.machine.live.dma_handles, 1);
    let p = Box::into_raw(h);
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .insert(p as usize);
    // SAFETY: checked non-null.
    unsafe { *handlep = p.cast() };
    ffi::DDI_SUCCESS
}

/// `ddi_dma_free_handle(9F)`
///
/// # Safety
/// `handlep` must point at the caller's handle variable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_free_handle(handlep: *mut ddi_dma_handle_t) {
    let _kernel = crate::meter::kernel();
    if handlep.is_null() {
        violation("ddi_dma_free_handle(NULL)");
        return;
    }
    // SAFETY: the driver's handle variable.
    let h = unsafe { *handlep };
    let Some(d) = handle(h, "ddi_dma_free_handle") else {
        return;
    };
    if lock(&d.binding).is_some() {
        violation("ddi_dma_free_handle of a bound handle");
        return;
    }
    lock(&HANDLES)
        .get_or_insert_with(HashSet::new)
        .remove(&(h as usize));
    // SAFETY: registered, made by Box::into_raw.
    let b = unsafe { Box::from_raw(h.cast::<DmaHandle>()) };
    bump(&b.machine.live.dma_handles, -1);
    // SAFETY: the driver's handle variable.
    unsafe { *handlep = std::ptr::null_mut() };
}

/// `ddi_dma_mem_alloc(9F)`: physically contiguous guest pages (poisoned)
/// behind a zeroed host buffer.
///
/// # Safety
/// Pointers must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_mem_alloc(
    h: ddi_dma_handle_t,
    length: usize,
    accattrp: *const ddi_device_acc_attr_t,
    _flags: c_uint,
    _waitfp: ddi_callback_t,
    _arg: caddr_t,
    kaddrp: *mut caddr_t,
    real_length: *mut usize,
    handlep: *mut ddi_acc_handle_t,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_mem_alloc") else {
        return ffi::DDI_FAILURE;
    };
    if accattrp.is_null() || kaddrp.is_null() || handlep.is_null() || length == 0 {
        violation("ddi_dma_mem_alloc: null pointer argument or zero length");
        return ffi::DDI_FAILURE;
    }
    let m = &d.machine;
    let pages = length.div_ceil(PAGE as usize);
    let align = d.attr.dma_attr_align.max(1);
    let align_pages = (align / PAGE).max(1) as usize;
    let Some(gpa) = m.alloc_contig(pages, align_pages) else {
        return ffi::DDI_FAILURE;
    };
    verify_freed(m, Some((gpa, pages)), true);
    if gpa + (pages as u64 * PAGE) - 1 > d.attr.dma_attr_addr_hi {
        m.free_pages(gpa, pages);
        return ffi::DDI_FAILURE;
    }
    let Ok(layout) = std::alloc::Layout::from_size_align(
        pages * PAGE as usize,
        (align.max(64) as usize).min(PAGE as usize),
    ) else {
        m.free_pages(gpa, pages);
        return ffi::DDI_FAILURE;
    };
    // SAFETY: non-zero size.
    let host = unsafe { std::alloc::alloc_zeroed(layout) };
    if host.is_null() {
        m.free_pages(gpa, pages);
        return ffi::DDI_FAILURE;
    }
    if let Err(e) = m.qt.memset(gpa, pages as u64 * PAGE, POISON) {
        m.device_failed("ddi_dma_mem_alloc poison", &e);
    }
    let mem = Arc::new(DmaMem {
        machine: m.clone(),
        host,
        layout,
        len: length,
        gpa,
        pages,
    });
    lock(&MEMS).insert(host as usize, mem.clone());
    // The access handle is a unique token naming this allocation.
    let acc = Box::into_raw(Box::new(0u64)) as usize;
    lock(&MEM_ACC)
        .get_or_insert_with(HashMap::new)
        .insert(acc, mem);
    bump(&m.live.dma_mem, 1);
    // SAFETY: checked non-null.
    unsafe {
        *kaddrp = host.cast();
        if !real_length.is_null() {
            *real_length = length;
        }
        *handlep = acc as ddi_acc_handle_t;
    }
    ffi::DDI_SUCCESS
}

/// `ddi_dma_mem_free(9F)`
///
/// # Safety
/// `handlep` must point at the caller's handle variable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_mem_free(handlep: *mut ddi_acc_handle_t) {
    let _kernel = crate::meter::kernel();
    if handlep.is_null() {
        violation("ddi_dma_mem_free(NULL)");
        return;
    }
    // SAFETY: the driver's handle variable.
    let acc = unsafe { *handlep } as usize;
    let Some(mem) = lock(&MEM_ACC).get_or_insert_with(HashMap::new).remove(&acc) else {
        violation("ddi_dma_mem_free of an unknown handle");
        return;
    };
    lock(&MEMS).remove(&(mem.host as usize));
    if Arc::strong_count(&mem) > 1 {
        violation("ddi_dma_mem_free of memory that is still bound");
    }
    if let Some(q) = rings_in(&mem.machine, mem.gpa, mem.pages) {
        violation(format!(
            "ddi_dma_mem_free of guest memory {:#x} (+{}) that holds virtqueue {q}'s rings, \
             which the device still uses (it was not reset first, so it may still write there)",
            mem.gpa, mem.len
        ));
    }
    bump(&mem.machine.live.dma_mem, -1);
    // SAFETY: the token box made in ddi_dma_mem_alloc.
    drop(unsafe { Box::from_raw(acc as *mut u64) });
    // SAFETY: the driver's handle variable.
    unsafe { *handlep = std::ptr::null_mut() };
}

/// Binds `object` to `d`; returns the DDI result code.
///
/// # Safety
/// Out-pointers valid or null.
unsafe fn bind(
    d: &DmaHandle,
    object: Object,
    segs: &[(u64, usize)],
    flags: u32,
    cookiep: *mut ddi_dma_cookie_t,
    ccountp: *mut c_uint,
    func: &str,
) -> c_int {
    let mut b = lock(&d.binding);
    if b.is_some() {
        violation(format!("{func}: handle already bound"));
        return ffi::DDI_DMA_INUSE;
    }
    if flags & ffi::DDI_DMA_RDWR == 0 {
        violation(format!("{func}: neither DDI_DMA_READ nor DDI_DMA_WRITE"));
        return ffi::DDI_DMA_NOMAPPING;
    }
    let cookies = cookies_of(segs, &d.attr);
    let single = cookies.len() <= d.attr.dma_attr_sgllen as usize
        && object.len() as u64 <= d.attr.dma_attr_maxxfer.max(1);
    let windows = if single {
        let len = object.len();
        vec![Window {
            off: 0,
            len,
            cookies,
        }]
    } else if flags & ffi::DDI_DMA_PARTIAL != 0 {
        match windows_of(cookies, &d.attr) {
            Some(w) => w,
            None => return ffi::DDI_DMA_TOOBIG,
        }
    } else {
        return ffi::DDI_DMA_TOOBIG;
    };
    let partial = windows.len() > 1;
    // SAFETY: checked non-null by the caller where required.
    unsafe {
        if !cookiep.is_null() {
            *cookiep = windows[0].cookies[0];
        }
        if !ccountp.is_null() {
            *ccountp = windows[0].cookies.len() as c_uint;
        }
    }
    // A copy-buffering nexus puts a write's data in place at bind time.
    if flags & ffi::DDI_DMA_WRITE != 0 && matches!(object, Object::Buf { .. }) {
        object.to_device(&d.machine, 0, object.len());
    }
    bump(&d.machine.live.dma_binds, 1);
    *b = Some(Binding {
        flags,
        object,
        windows,
        cur_win: 0,
        next_cookie: 1,
    });
    if partial {
        ffi::DDI_DMA_PARTIAL_MAP
    } else {
        ffi::DDI_DMA_MAPPED
    }
}

/// `ddi_dma_addr_bind_handle(9F)`: only memory from `ddi_dma_mem_alloc`
/// can be bound (other kernel memory has no guest pages here).
///
/// # Safety
/// Pointers must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_addr_bind_handle(
    h: ddi_dma_handle_t,
    _as: *mut c_void,
    addr: caddr_t,
    len: usize,
    flags: c_uint,
    _waitfp: ddi_callback_t,
    _arg: caddr_t,
    cookiep: *mut ddi_dma_cookie_t,
    ccountp: *mut c_uint,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_addr_bind_handle") else {
        return ffi::DDI_DMA_NOMAPPING;
    };
    if cookiep.is_null() || ccountp.is_null() || len == 0 {
        violation("ddi_dma_addr_bind_handle: null out-pointer or zero length");
        return ffi::DDI_DMA_NOMAPPING;
    }
    let Some((mem, off)) = mem_containing(addr as usize, len) else {
        violation(format!(
            "ddi_dma_addr_bind_handle of {addr:p} (+{len}): not memory from ddi_dma_mem_alloc"
        ));
        return ffi::DDI_DMA_NOMAPPING;
    };
    let gpa = mem.gpa + off as u64;
    if !gpa.is_multiple_of(d.attr.dma_attr_align.max(1)) {
        violation("ddi_dma_addr_bind_handle: address not aligned as dma_attr_align asks");
    }
    // SAFETY: out-pointers checked.
    unsafe {
        bind(
            d,
            Object::Mem { mem, off, len },
            &[(gpa, len)],
            flags,
            cookiep,
            ccountp,
            "ddi_dma_addr_bind_handle",
        )
    }
}

/// `struct buf` as far as DMA binding reads it (offsets from the measured
/// illumos layout, checked in `scsa::buf`).
pub use crate::scsa::buf::Buf;

/// `ddi_dma_buf_bind_handle(9F)`: the framework binds a target driver's
/// buffer; it lands on scattered guest pages.
///
/// # Safety
/// Pointers must be valid; the buffer must stay valid while bound.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_buf_bind_handle(
    h: ddi_dma_handle_t,
    bp: *mut ffi::buf,
    flags: c_uint,
    _waitfp: ddi_callback_t,
    _arg: caddr_t,
    cookiep: *mut ddi_dma_cookie_t,
    ccountp: *mut c_uint,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_buf_bind_handle") else {
        return ffi::DDI_DMA_NOMAPPING;
    };
    if bp.is_null() {
        violation("ddi_dma_buf_bind_handle(NULL buf)");
        return ffi::DDI_DMA_NOMAPPING;
    }
    // SAFETY: a struct buf of the emulated framework.
    let b = unsafe { &*bp.cast::<Buf>() };
    let (host, len) = (b.b_addr as usize, b.b_bcount);
    if len == 0 || host == 0 {
        violation("ddi_dma_buf_bind_handle of an empty buffer");
        return ffi::DDI_DMA_NOMAPPING;
    }
    if !(host as u64).is_multiple_of(d.attr.dma_attr_align.max(1)) {
        violation("ddi_dma_buf_bind_handle: buffer not aligned as dma_attr_align asks");
        return ffi::DDI_DMA_NOMAPPING;
    }
    let first_off = host % PAGE as usize;
    let npages = (first_off + len).div_ceil(PAGE as usize);
    let Some(pages) = d.machine.alloc_scattered(npages) else {
        return ffi::DDI_DMA_NORESOURCES;
    };
    for &p in &pages {
        verify_freed(&d.machine, Some((p, 1)), true);
    }
    let object = Object::Buf {
        host,
        len,
        first_off,
        pages,
    };
    let segs: Vec<(u64, usize)> = object
        .pieces(0, len)
        .into_iter()
        .map(|(g, _, n)| (g, n))
        .collect();
    // SAFETY: out-pointers valid or null (the framework passes valid ones).
    let rc = unsafe {
        bind(
            d,
            object,
            &segs,
            flags,
            cookiep,
            ccountp,
            "ddi_dma_buf_bind_handle",
        )
    };
    if rc != ffi::DDI_DMA_MAPPED && rc != ffi::DDI_DMA_PARTIAL_MAP {
        // The object (and its pages) was not kept: give the pages back.
        for (g, _) in segs {
            let page = g & !(PAGE - 1);
            d.machine.free_pages(page, 1);
        }
    }
    rc
}

/// `ddi_dma_unbind_handle(9F)`: a read's data is copied back here.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_dma_unbind_handle(h: ddi_dma_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_unbind_handle") else {
        return ffi::DDI_FAILURE;
    };
    let Some(b) = lock(&d.binding).take() else {
        violation("ddi_dma_unbind_handle of an unbound handle");
        return ffi::DDI_FAILURE;
    };
    if let Object::Buf { pages, len, .. } = &b.object {
        if b.flags & ffi::DDI_DMA_READ != 0 {
            b.object.to_cpu(&d.machine, 0, *len);
        }
        for &p in pages {
            d.machine.free_pages(p, 1);
        }
    }
    bump(&d.machine.live.dma_binds, -1);
    ffi::DDI_SUCCESS
}

/// `ddi_dma_sync(9F)`: the only way bytes move between the driver's view
/// and the device's.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_dma_sync(
    h: ddi_dma_handle_t,
    offset: off_t,
    length: usize,
    type_: c_uint,
) -> c_int {
    // The frame around a call of the body: the body's prologue and
    // epilogue (the emulation's, some 70 instructions with its locks and
    // checks) are the kernel's side, not the driver's.
    let _kernel = crate::meter::kernel();
    dma_sync(h, offset, length, type_)
}

#[inline(never)]
fn dma_sync(h: ddi_dma_handle_t, offset: off_t, length: usize, type_: c_uint) -> c_int {
    let Some(d) = handle(h, "ddi_dma_sync") else {
        return ffi::DDI_FAILURE;
    };
    let b = lock(&d.binding);
    let Some(b) = b.as_ref() else {
        violation("ddi_dma_sync of an unbound handle");
        return ffi::DDI_FAILURE;
    };
    let total = b.object.len();
    let len = if length == 0 {
        total.saturating_sub(offset.max(0) as usize)
    } else {
        length
    };
    if offset < 0 || offset as usize + len > total {
        violation(format!(
            "ddi_dma_sync of [{offset}, +{len}) beyond the {total}-byte object"
        ));
        return ffi::DDI_FAILURE;
    }
    let m = &d.machine;
    match type_ {
        ffi::DDI_DMA_SYNC_FORDEV => {
            m.stats.syncs_for_dev.fetch_add(1, Ordering::Relaxed);
            b.object.to_device(m, offset as usize, len);
        }
        ffi::DDI_DMA_SYNC_FORCPU | ffi::DDI_DMA_SYNC_FORKERNEL => {
            m.stats.syncs_for_cpu.fetch_add(1, Ordering::Relaxed);
            b.object.to_cpu(m, offset as usize, len);
        }
        other => {
            violation(format!("ddi_dma_sync with unknown type {other}"));
            return ffi::DDI_FAILURE;
        }
    }
    ffi::DDI_SUCCESS
}

/// `ddi_dma_numwin(9F)`
///
/// # Safety
/// `np` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_numwin(h: ddi_dma_handle_t, np: *mut c_uint) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_numwin") else {
        return ffi::DDI_FAILURE;
    };
    let b = lock(&d.binding);
    match (b.as_ref(), np.is_null()) {
        (Some(b), false) => {
            // SAFETY: checked non-null.
            unsafe { *np = b.windows.len() as c_uint };
            ffi::DDI_SUCCESS
        }
        _ => ffi::DDI_FAILURE,
    }
}

/// `ddi_dma_getwin(9F)`: makes window `win` current.
///
/// # Safety
/// Out-pointers must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_getwin(
    h: ddi_dma_handle_t,
    win: c_uint,
    offp: *mut off_t,
    lenp: *mut usize,
    cookiep: *mut ddi_dma_cookie_t,
    ccountp: *mut c_uint,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_getwin") else {
        return ffi::DDI_FAILURE;
    };
    let mut b = lock(&d.binding);
    let Some(b) = b.as_mut() else {
        violation("ddi_dma_getwin of an unbound handle");
        return ffi::DDI_FAILURE;
    };
    let Some(w) = b.windows.get(win as usize) else {
        return ffi::DDI_FAILURE;
    };
    // SAFETY: out-pointers valid or null.
    unsafe {
        if !offp.is_null() {
            *offp = w.off as off_t;
        }
        if !lenp.is_null() {
            *lenp = w.len;
        }
        if !cookiep.is_null() {
            *cookiep = w.cookies[0];
        }
        if !ccountp.is_null() {
            *ccountp = w.cookies.len() as c_uint;
        }
    }
    b.cur_win = win as usize;
    b.next_cookie = 1;
    ffi::DDI_SUCCESS
}

/// `ddi_dma_nextcookie(9F)`
///
/// # Safety
/// `cookiep` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_dma_nextcookie(h: ddi_dma_handle_t, cookiep: *mut ddi_dma_cookie_t) {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_nextcookie") else {
        return;
    };
    let mut b = lock(&d.binding);
    let Some(b) = b.as_mut() else { return };
    let w = &b.windows[b.cur_win];
    match w.cookies.get(b.next_cookie) {
        Some(c) if !cookiep.is_null() => {
            // SAFETY: checked non-null.
            unsafe { *cookiep = *c };
            b.next_cookie += 1;
        }
        _ => violation("ddi_dma_nextcookie past the last cookie"),
    }
}

/// `ddi_dma_ncookies(9F)`: cookies of the current window.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_dma_ncookies(h: ddi_dma_handle_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_ncookies") else {
        return 0;
    };
    lock(&d.binding)
        .as_ref()
        .map_or(0, |b| b.windows[b.cur_win].cookies.len() as c_int)
}

/// `ddi_dma_cookie_get(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_dma_cookie_get(h: ddi_dma_handle_t, i: c_uint) -> *const ddi_dma_cookie_t {
    let _kernel = crate::meter::kernel();
    let Some(d) = handle(h, "ddi_dma_cookie_get") else {
        return std::ptr::null();
    };
    let b = lock(&d.binding);
    b.as_ref()
        .and_then(|b| b.windows[b.cur_win].cookies.get(i as usize))
        .map_or(std::ptr::null(), |c| c as *const _)
}

/// The current window's cookie array (stable while bound), its count,
/// offset and length: what the framework points `pkt_cookies` at.
pub fn current_window(h: ddi_dma_handle_t) -> Option<(*mut ddi_dma_cookie_t, u32, usize, usize)> {
    let d = handle(h, "current_window")?;
    let mut b = lock(&d.binding);
    let b = b.as_mut()?;
    let w = &mut b.windows[b.cur_win];
    Some((w.cookies.as_mut_ptr(), w.cookies.len() as u32, w.off, w.len))
}

/// Number of windows of a bound handle.
pub fn window_count(h: ddi_dma_handle_t) -> usize {
    handle(h, "window_count")
        .and_then(|d| lock(&d.binding).as_ref().map(|b| b.windows.len()))
        .unwrap_or(0)
}

/// The bind flags of a bound handle.
pub fn bind_flags(h: ddi_dma_handle_t) -> Option<u32> {
    handle(h, "bind_flags").and_then(|d| lock(&d.binding).as_ref().map(|b| b.flags))
}
