//! Kernel statistics: `kstat_create(9F)`, `kstat_named_init(9F)`,
//! `kstat_install(9F)`, `kstat_delete(9F)`, and the reader side of the
//! kstat driver (`kstat -p`), modelled on uts/common/os/kstat_fr.c and
//! uts/common/io/kstat.c.
//!
//! What illumos does, and how the emulation holds the driver to it:
//! - `kstat_create_zone` refuses a type >= KSTAT_NUM_TYPES, a persistent
//!   virtual kstat, a variable-size physical one, an ndata out of the
//!   type's range and a (module, instance, name) already taken, each with a
//!   CE_WARN and NULL; it copies module, name and class with
//!   `kstat_set_string`, which silently cuts them to KSTAT_STRLEN - 1
//!   bytes (recorded here as a violation: a cut name is a bug that may
//!   collide); the kstat comes back INVALID, its data zeroed, `ks_update`
//!   and `ks_snapshot` the defaults, `ks_lock` NULL. It allocates with
//!   KM_SLEEP: "user or kernel context" (kstat_create(9F)), so interrupt
//!   context is a violation.
//! - `kstat_install` of a kstat that does not exist warns and returns;
//!   a VAR_SIZE kstat without `ks_lock` panics; then it clears INVALID:
//!   before that, a reader gets EAGAIN (kstat.c `read_kstat_data`), so a
//!   kstat is visible only once installed.
//! - `kstat_delete` panics if the caller holds `ks_lock`, warns (after
//!   reading freed memory) for a kstat that does not exist (a double
//!   delete), waits for a reader holding the kstat (`kstat_hold`), then
//!   frees it.
//! - a reader holds the kstat, takes `ks_lock` if set (KSTAT_ENTER), calls
//!   `ks_update(ksp, KSTAT_READ)`, which returns 0, EACCES or EIO
//!   (sys/kstat.h) and must not change a fixed-size kstat's size, then
//!   `ks_snapshot`, then KSTAT_EXIT.
//!
//! Beyond illumos (stricter): installing twice, installing a named kstat
//! with an entry `kstat_named_init` never named, or with no `ks_update`
//! (the framework calls it unconditionally), a named statistic whose name
//! would be cut, `KSTAT_FLAG_PERSISTENT` (not emulated: it would need the
//! dormant-kstat machinery) are violations; kstats not deleted at detach
//! are leaks ("kstats").

use super::sync::check_may_sleep;
use super::violation;
use crate::machine::{Machine, bump, lock};
use rvscsi::ffi::{self, kstat_named_t, kstat_t};
use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, Weak};

/// `KSTAT_NUM_TYPES` (sys/kstat.h): raw, named, intr, io, timer.
const KSTAT_NUM_TYPES: u8 = 5;
/// `KSTAT_TYPE_INTR`, `KSTAT_TYPE_IO`: exactly one record each
/// (kstat_fr.c `kstat_data_type`).
const KSTAT_TYPE_INTR: u8 = 2;
const KSTAT_TYPE_IO: u8 = 3;
/// `KSTAT_FLAG_LONGSTRINGS` (sys/kstat.h).
const KSTAT_FLAG_LONGSTRINGS: u8 = 0x40;
/// The highest `KSTAT_DATA_*` type (`KSTAT_DATA_STRING`).
const KSTAT_DATA_MAX: u8 = 9;

/// One kstat as `kstat_create` allocates it: the header, then the data.
struct Block {
    ks: kstat_t,
    /// The data section, 8-byte aligned, zeroed.
    data: Vec<u64>,
}

struct Entry {
    machine: Weak<Machine>,
    block: Box<Block>,
    /// `kstat_hold`: a reader holds it across update and snapshot;
    /// `kstat_delete` waits for it.
    hold: Arc<Mutex<()>>,
    /// Made by the emulated kernel itself (the FM handle's `fm` kstat).
    kernel_owned: bool,
}

// SAFETY: the raw pointers inside the header point into the entry's own
// block or at driver data the kstat contract keeps alive; every access is
// under the registry lock or the entry's hold.
unsafe impl Send for Entry {}

static KSTATS: Mutex<BTreeMap<usize, Entry>> = Mutex::new(BTreeMap::new());
static NEXT_KID: Mutex<i32> = Mutex::new(1);
/// Machines whose next `kstat_create` calls fail (as with no memory).
static FAIL_CREATE: Mutex<Vec<(Weak<Machine>, usize)>> = Mutex::new(Vec::new());

fn same(w: &Weak<Machine>, m: &Machine) -> bool {
    std::ptr::eq(w.as_ptr(), m)
}

/// Makes the next `n` `kstat_create` calls on `m` fail, as
/// kstat_create does without kernel memory (CE_NOTE, NULL).
pub fn fail_next_creates(m: &Arc<Machine>, n: usize) {
    let mut f = lock(&FAIL_CREATE);
    f.retain(|(w, _)| w.strong_count() > 0 && !same(w, m));
    f.push((Arc::downgrade(m), n));
}

fn take_failure(m: &Machine) -> bool {
    let mut f = lock(&FAIL_CREATE);
    for (w, n) in f.iter_mut() {
        if same(w, m) && *n > 0 {
            *n -= 1;
            return true;
        }
    }
    false
}

/// A C string argument, or None (a violation) for NULL.
fn arg(p: *const c_char, func: &str, what: &str) -> Option<String> {
    if p.is_null() {
        violation(format!("{func}: NULL {what}"));
        return None;
    }
    // SAFETY: the driver passes NUL-terminated strings.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// `kstat_set_string`: zero the field, copy at most KSTAT_STRLEN - 1
/// bytes; a longer string is a violation (illumos cuts it silently).
fn set_string(dst: &mut [c_char; ffi::KSTAT_STRLEN], src: &str, func: &str, what: &str) {
    if src.len() >= ffi::KSTAT_STRLEN {
        violation(format!(
            "{func}: {what} {src:?} is {} bytes; kstat_set_string cuts it to {}",
            src.len(),
            ffi::KSTAT_STRLEN - 1
        ));
    }
    *dst = [0; ffi::KSTAT_STRLEN];
    for (d, &b) in dst
        .iter_mut()
        .zip(src.as_bytes().iter().take(ffi::KSTAT_STRLEN - 1))
    {
        *d = b as c_char;
    }
}

fn field(f: &[c_char; ffi::KSTAT_STRLEN]) -> String {
    let bytes: Vec<u8> = f
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The default `ks_update` (kstat_fr.c `default_kstat_update`): nothing to
/// do for fixed-size kstats.
unsafe extern "C" fn default_update(_ksp: *mut kstat_t, _rw: c_int) -> c_int {
    0
}

/// The default `ks_snapshot` (kstat_fr.c `default_kstat_snapshot`):
/// timestamps and copies `ks_data_size` bytes; writes need WRITABLE.
///
/// # Safety
/// `ksp` is a live kstat; `buf` holds `ks_data_size` bytes.
unsafe extern "C" fn default_snapshot(ksp: *mut kstat_t, buf: *mut c_void, rw: c_int) -> c_int {
    // SAFETY: the caller's contract.
    let ks = unsafe { &mut *ksp };
    ks.ks_snaptime = super::time::gethrtime();
    if rw == ffi::KSTAT_WRITE {
        if ks.ks_flags & ffi::KSTAT_FLAG_WRITABLE == 0 {
            return ffi::EACCES;
        }
        // SAFETY: both hold ks_data_size bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.cast::<u8>(), ks.ks_data.cast(), ks.ks_data_size)
        };
        return 0;
    }
    if !ks.ks_data.is_null() {
        // SAFETY: both hold ks_data_size bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(ks.ks_data.cast::<u8>(), buf.cast(), ks.ks_data_size)
        };
    }
    0
}

/// The emulated kernel's own kstat_create (for `ddi_fm_init`'s `fm`
/// kstat): no driver-side checks of context.
pub(crate) fn create_internal(
    m: &Arc<Machine>,
    module: &str,
    instance: i32,
    name: &str,
    class: &str,
    ndata: u32,
) -> *mut kstat_t {
    create(
        m,
        module,
        instance,
        name,
        class,
        ffi::KSTAT_TYPE_NAMED,
        ndata,
        0,
        true,
    )
}

#[allow(clippy::too_many_arguments)]
fn create(
    m: &Arc<Machine>,
    module: &str,
    instance: i32,
    name: &str,
    class: &str,
    ks_type: u8,
    ndata: u32,
    flags: u8,
    kernel_owned: bool,
) -> *mut kstat_t {
    let func = "kstat_create";
    let warn = |why: &str| {
        m.log_line(
            ffi::CE_WARN,
            &format!("kstat_create('{module}', {instance}, '{name}'): {why}"),
        );
        std::ptr::null_mut()
    };
    if ks_type >= KSTAT_NUM_TYPES {
        return warn(&format!("invalid kstat type {ks_type}"));
    }
    if flags & ffi::KSTAT_FLAG_PERSISTENT != 0 {
        if flags & ffi::KSTAT_FLAG_VIRTUAL != 0 {
            return warn("cannot create persistent virtual kstat");
        }
        violation(format!(
            "{func}('{module}', {instance}, '{name}'): KSTAT_FLAG_PERSISTENT is not emulated"
        ));
        return std::ptr::null_mut();
    }
    if flags & ffi::KSTAT_FLAG_VAR_SIZE != 0 && flags & ffi::KSTAT_FLAG_VIRTUAL == 0 {
        return warn("cannot create variable-size physical kstat");
    }
    let (elem, min, max) = match ks_type {
        ffi::KSTAT_TYPE_RAW => (1usize, 0u32, i32::MAX as u32),
        ffi::KSTAT_TYPE_NAMED => (std::mem::size_of::<kstat_named_t>(), 0, i32::MAX as u32),
        KSTAT_TYPE_INTR | KSTAT_TYPE_IO => (80, 1, 1),
        _ => (40, 0, i32::MAX as u32),
    };
    if ndata < min || ndata > max {
        return warn(&format!("ks_ndata={ndata} out of range [{min}, {max}]"));
    }
    let data_size = elem * ndata as usize;
    let mut reg = lock(&KSTATS);
    // The name as kstat_set_string leaves it, for the collision check.
    let cut = |s: &str| s.chars().take(ffi::KSTAT_STRLEN - 1).collect::<String>();
    let taken = reg.values().any(|e| {
        same(&e.machine, m)
            && field(&e.block.ks.ks_module) == cut(module)
            && e.block.ks.ks_instance == instance
            && field(&e.block.ks.ks_name) == cut(name)
    });
    if taken {
        drop(reg);
        return warn("namespace collision");
    }
    if take_failure(m) {
        drop(reg);
        m.log_line(
            ffi::CE_NOTE,
            &format!("kstat_create('{module}', {instance}, '{name}'): insufficient kernel memory"),
        );
        return std::ptr::null_mut();
    }
    // SAFETY: kstat_t is plain data; all zero is its initial state.
    let mut ks: kstat_t = unsafe { std::mem::zeroed() };
    ks.ks_crtime = super::time::gethrtime();
    set_string(&mut ks.ks_module, module, func, "module");
    ks.ks_instance = instance;
    set_string(&mut ks.ks_name, name, func, "name");
    ks.ks_type = ks_type;
    set_string(&mut ks.ks_class, class, func, "class");
    ks.ks_flags = flags | ffi::KSTAT_FLAG_INVALID;
    ks.ks_ndata = ndata;
    ks.ks_data_size = data_size;
    ks.ks_snaptime = ks.ks_crtime;
    ks.ks_update = Some(default_update);
    ks.ks_snapshot = Some(default_snapshot);
    ks.ks_lock = std::ptr::null_mut();
    {
        let mut kid = lock(&NEXT_KID);
        ks.ks_kid = *kid;
        *kid += 1;
    }
    let mut block = Box::new(Block {
        ks,
        data: vec![0u64; data_size.div_ceil(8)],
    });
    if flags & ffi::KSTAT_FLAG_VIRTUAL == 0 {
        block.ks.ks_data = block.data.as_mut_ptr().cast();
    }
    let ksp: *mut kstat_t = &mut block.ks;
    reg.insert(
        ksp as usize,
        Entry {
            machine: Arc::downgrade(m),
            block,
            hold: Arc::new(Mutex::new(())),
            kernel_owned,
        },
    );
    bump(&m.live.kstats, 1);
    ksp
}

/// `kstat_create(9F)`
///
/// # Safety
/// The strings are NUL-terminated (or `ks_name` NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kstat_create(
    ks_module: *const c_char,
    ks_instance: c_int,
    ks_name: *const c_char,
    ks_class: *const c_char,
    ks_type: u8,
    ks_ndata: c_uint,
    ks_flags: u8,
) -> *mut kstat_t {
    let _kernel = crate::meter::kernel();
    let Some(m) = super::current_or_violation("kstat_create") else {
        return std::ptr::null_mut();
    };
    check_may_sleep("kstat_create");
    let (Some(module), Some(class)) = (
        arg(ks_module, "kstat_create", "module"),
        arg(ks_class, "kstat_create", "class"),
    ) else {
        return std::ptr::null_mut();
    };
    // A NULL name is <module><instance> (kstat_create_zone).
    let name = if ks_name.is_null() {
        format!("{module}{ks_instance}")
    } else {
        arg(ks_name, "kstat_create", "name").unwrap_or_default()
    };
    create(
        &m,
        &module,
        ks_instance,
        &name,
        &class,
        ks_type,
        ks_ndata,
        ks_flags,
        false,
    )
}

/// `kstat_named_init(9F)` (kstat_fr.c: `kstat_set_string` of the name,
/// the type, a NULL string for KSTAT_DATA_STRING).
///
/// # Safety
/// `knp` points at a `kstat_named_t`; `name` is NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kstat_named_init(
    knp: *mut kstat_named_t,
    name: *const c_char,
    data_type: u8,
) {
    let _kernel = crate::meter::kernel();
    check_may_sleep("kstat_named_init");
    if knp.is_null() {
        violation("kstat_named_init: NULL kstat_named_t");
        return;
    }
    let Some(name) = arg(name, "kstat_named_init", "name") else {
        return;
    };
    if data_type > KSTAT_DATA_MAX {
        violation(format!(
            "kstat_named_init({name:?}): data type {data_type} is no KSTAT_DATA_*"
        ));
    }
    // SAFETY: the caller's kstat_named_t.
    let kn = unsafe { &mut *knp };
    set_string(&mut kn.name, &name, "kstat_named_init", "statistic name");
    kn.data_type = data_type;
    if data_type == ffi::KSTAT_DATA_STRING {
        kn.value.str = ffi::kstat_named_str {
            ptr: std::ptr::null_mut(),
            len: 0,
        };
    }
}

/// `kstat_install(9F)`
///
/// # Safety
/// `ksp` is what `kstat_create` returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kstat_install(ksp: *mut kstat_t) {
    let _kernel = crate::meter::kernel();
    check_may_sleep("kstat_install");
    let mut reg = lock(&KSTATS);
    let Some(e) = reg.get_mut(&(ksp as usize)) else {
        drop(reg);
        violation(format!(
            "kstat_install({ksp:p}): does not exist (not from kstat_create, or deleted)"
        ));
        return;
    };
    let ks = &mut e.block.ks;
    let what = format!(
        "kstat_install('{}', {}, '{}')",
        field(&ks.ks_module),
        ks.ks_instance,
        field(&ks.ks_name)
    );
    if ks.ks_flags & ffi::KSTAT_FLAG_VAR_SIZE != 0 && ks.ks_lock.is_null() {
        drop(reg);
        violation(format!(
            "{what}: cannot create variable-size kstat without data lock (illumos panics)"
        ));
        return;
    }
    if ks.ks_flags & ffi::KSTAT_FLAG_INVALID == 0 {
        violation(format!("{what}: installed twice"));
    }
    if ks.ks_update.is_none() {
        violation(format!("{what}: ks_update is NULL (every read calls it)"));
    }
    if ks.ks_type == ffi::KSTAT_TYPE_NAMED && !ks.ks_data.is_null() {
        let n = ks.ks_ndata as usize;
        let data = ks.ks_data.cast::<kstat_named_t>();
        for i in 0..n {
            // SAFETY: the data section holds ks_ndata entries (made by
            // create, or the driver's own for a virtual kstat).
            let kn = unsafe { &*data.add(i) };
            if kn.name[0] == 0 {
                violation(format!(
                    "{what}: named entry {i} was never named (kstat_named_init)"
                ));
            }
            if kn.data_type == ffi::KSTAT_DATA_STRING {
                ks.ks_flags |= KSTAT_FLAG_LONGSTRINGS;
            }
        }
        if ks.ks_flags & KSTAT_FLAG_LONGSTRINGS != 0
            && ks.ks_flags & ffi::KSTAT_FLAG_WRITABLE != 0
            && ks.ks_snapshot.map(|f| f as usize)
                == Some(default_snapshot as ffi::ks_snapshot_fn as usize)
        {
            violation(format!(
                "{what}: writable KSTAT_DATA_STRING kstat with the default snapshot (illumos panics)"
            ));
        }
    }
    ks.ks_flags &= !ffi::KSTAT_FLAG_INVALID;
}

/// `kstat_delete(9F)`
///
/// # Safety
/// `ksp` is what `kstat_create` returned, not deleted yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kstat_delete(ksp: *mut kstat_t) {
    let _kernel = crate::meter::kernel();
    delete(ksp, false);
}

pub(crate) fn delete(ksp: *mut kstat_t, by_kernel: bool) {
    if ksp.is_null() {
        violation("kstat_delete(NULL) (illumos asserts a kstat)");
        return;
    }
    let (hold, lp, kernel_owned) = {
        let reg = lock(&KSTATS);
        let Some(e) = reg.get(&(ksp as usize)) else {
            drop(reg);
            violation(format!(
                "kstat_delete({ksp:p}): does not exist (deleted twice, or never created)"
            ));
            return;
        };
        (e.hold.clone(), e.block.ks.ks_lock, e.kernel_owned)
    };
    if kernel_owned && !by_kernel {
        violation(format!(
            "kstat_delete({ksp:p}): a kstat the kernel made (ddi_fm_init's)"
        ));
        return;
    }
    if !lp.is_null() && super::sync::mutex_owned(lp.cast()) != 0 {
        violation(format!(
            "kstat_delete({ksp:p}): caller holds data lock {lp:p} (illumos panics)"
        ));
        return;
    }
    // kstat_hold_bykid: wait for a reader.
    let _held = lock(&hold);
    let removed = lock(&KSTATS).remove(&(ksp as usize));
    if let Some(m) = removed.and_then(|e| e.machine.upgrade()) {
        bump(&m.live.kstats, -1);
    }
}

/// A statistic's value as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `KSTAT_DATA_INT32`
    I32(i32),
    /// `KSTAT_DATA_UINT32`
    U32(u32),
    /// `KSTAT_DATA_INT64` (and `LONG`)
    I64(i64),
    /// `KSTAT_DATA_UINT64` (and `ULONG`)
    U64(u64),
    /// `KSTAT_DATA_CHAR`: up to 16 bytes.
    Char(String),
    /// `KSTAT_DATA_STRING`
    Str(String),
    /// Another type (float, double: obsolete).
    Other(u8),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::I32(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::Char(s) | Value::Str(s) => f.write_str(s),
            Value::Other(t) => write!(f, "<type {t}>"),
        }
    }
}

/// Why a read failed (the errno the kstat driver returns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// `ENXIO`: no such kstat.
    NoSuchKstat,
    /// `EAGAIN`: it exists but is not installed (KSTAT_FLAG_INVALID).
    NotInstalled,
    /// The update or snapshot returned this error.
    Failed(c_int),
}

/// One read kstat: its identity, times and named statistics.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `ks_module`
    pub module: String,
    /// `ks_instance`
    pub instance: i32,
    /// `ks_name`
    pub name: String,
    /// `ks_class`
    pub class: String,
    /// `ks_crtime`
    pub crtime: i64,
    /// `ks_snaptime`
    pub snaptime: i64,
    /// Named statistics in kstat order (empty for other types).
    pub stats: Vec<(String, Value)>,
}

impl Snapshot {
    /// The value of statistic `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.stats.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The `u64` value of statistic `name`.
    pub fn u64(&self, name: &str) -> Option<u64> {
        match self.get(name)? {
            Value::U64(v) => Some(*v),
            _ => None,
        }
    }
}

fn named_value(kn: &kstat_named_t) -> Value {
    // SAFETY: each arm reads the union member data_type says is valid.
    unsafe {
        match kn.data_type {
            0 => {
                let bytes: Vec<u8> = kn
                    .value
                    .c
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                Value::Char(String::from_utf8_lossy(&bytes).into_owned())
            }
            1 => Value::I32(kn.value.i32),
            2 => Value::U32(kn.value.ui32),
            3 | 7 => Value::I64(kn.value.i64),
            4 | 8 => Value::U64(kn.value.ui64),
            9 => {
                let p = kn.value.str.ptr;
                Value::Str(if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                })
            }
            t => Value::Other(t),
        }
    }
}

/// Reads kstat `module:instance:name` of machine `m` as the kstat driver
/// does (kstat.c `read_kstat_data`): hold, refuse an uninstalled one
/// (EAGAIN), KSTAT_ENTER, `ks_update(KSTAT_READ)`, `ks_snapshot`,
/// KSTAT_EXIT.
pub fn read(
    m: &Arc<Machine>,
    module: &str,
    instance: i32,
    name: &str,
) -> Result<Snapshot, ReadError> {
    let _current = crate::machine::set_current(m);
    let (ksp, hold) = {
        let reg = lock(&KSTATS);
        let found = reg.iter().find(|(_, e)| {
            same(&e.machine, m)
                && field(&e.block.ks.ks_module) == module
                && e.block.ks.ks_instance == instance
                && field(&e.block.ks.ks_name) == name
        });
        let Some((&k, e)) = found else {
            return Err(ReadError::NoSuchKstat);
        };
        (k as *mut kstat_t, e.hold.clone())
    };
    let _held = lock(&hold);
    if !lock(&KSTATS).contains_key(&(ksp as usize)) {
        return Err(ReadError::NoSuchKstat);
    }
    // SAFETY: held: kstat_delete waits for us, so the block is live.
    let ks = unsafe { &mut *ksp };
    if ks.ks_flags & ffi::KSTAT_FLAG_INVALID != 0 {
        return Err(ReadError::NotInstalled);
    }
    let size_before = ks.ks_data_size;
    let lp = ks.ks_lock.cast::<ffi::kmutex_t>();
    if !lp.is_null() {
        super::sync::mutex_enter(lp);
    }
    let what = format!("kstat {module}:{instance}:{name}");
    let result = (|| {
        let Some(update) = ks.ks_update else {
            violation(format!("{what}: read with a NULL ks_update"));
            return Err(ReadError::Failed(ffi::EIO));
        };
        // SAFETY: the kstat contract: the provider's update, called with
        // the kstat held and its lock (if any) taken.
        let r = unsafe { update(ksp, ffi::KSTAT_READ) };
        if r != 0 && r != ffi::EACCES && r != ffi::EIO {
            violation(format!(
                "{what}: ks_update returned {r}, not 0, EACCES or EIO"
            ));
        }
        if r != 0 {
            return Err(ReadError::Failed(r));
        }
        if ks.ks_flags & (ffi::KSTAT_FLAG_VAR_SIZE | KSTAT_FLAG_LONGSTRINGS) == 0
            && ks.ks_data_size != size_before
        {
            violation(format!(
                "{what}: ks_update changed the size of a fixed-size kstat ({size_before} -> {})",
                ks.ks_data_size
            ));
        }
        let mut buf = vec![0u64; ks.ks_data_size.div_ceil(8) + 1];
        let Some(snapshot) = ks.ks_snapshot else {
            violation(format!("{what}: NULL ks_snapshot"));
            return Err(ReadError::Failed(ffi::EIO));
        };
        // SAFETY: buf holds ks_data_size bytes.
        let r = unsafe { snapshot(ksp, buf.as_mut_ptr().cast(), ffi::KSTAT_READ) };
        if r != 0 {
            return Err(ReadError::Failed(r));
        }
        let mut stats = Vec::new();
        if ks.ks_type == ffi::KSTAT_TYPE_NAMED {
            let entries = buf.as_ptr().cast::<kstat_named_t>();
            for i in 0..ks.ks_ndata as usize {
                // SAFETY: the snapshot copied ks_ndata entries into buf.
                let kn = unsafe { &*entries.add(i) };
                stats.push((field(&kn.name), named_value(kn)));
            }
        }
        Ok(Snapshot {
            module: field(&ks.ks_module),
            instance: ks.ks_instance,
            name: field(&ks.ks_name),
            class: field(&ks.ks_class),
            crtime: ks.ks_crtime,
            snaptime: ks.ks_snaptime,
            stats,
        })
    })();
    if !lp.is_null() {
        super::sync::mutex_exit(lp);
    }
    result
}

/// Every kstat of `m` (module, instance, name), installed or not, in order.
pub fn list(m: &Machine) -> Vec<(String, i32, String)> {
    let mut v: Vec<_> = lock(&KSTATS)
        .values()
        .filter(|e| same(&e.machine, m))
        .map(|e| {
            (
                field(&e.block.ks.ks_module),
                e.block.ks.ks_instance,
                field(&e.block.ks.ks_name),
            )
        })
        .collect();
    v.sort();
    v
}

fn seconds(ns: i64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// What `kstat -p <module>:<instance>` prints for `m` (instance None: all):
/// one `module:instance:name:statistic<TAB>value` line per statistic of
/// every installed kstat, with the `class`, `crtime` and `snaptime` lines
/// kstat(8) adds, statistics sorted by name as kstat(8) sorts them. Each
/// kstat is read through its `ks_update`.
pub fn kstat_p(m: &Arc<Machine>, module: &str, instance: Option<i32>) -> String {
    let mut out = String::new();
    for (md, inst, name) in list(m) {
        if md != module || instance.is_some_and(|i| i != inst) {
            continue;
        }
        let Ok(s) = read(m, &md, inst, &name) else {
            continue;
        };
        let mut lines: Vec<(String, String)> = s
            .stats
            .iter()
            .map(|(n, v)| (n.clone(), v.to_string()))
            .collect();
        lines.push(("class".into(), s.class.clone()));
        lines.push(("crtime".into(), seconds(s.crtime)));
        lines.push(("snaptime".into(), seconds(s.snaptime)));
        lines.sort();
        for (n, v) in lines {
            let _ = writeln!(out, "{md}:{inst}:{name}:{n}\t{v}");
        }
    }
    out
}
