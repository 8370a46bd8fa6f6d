//! Kernel mutexes and condition variables (mutex(9F), condvar(9F)) holding
//! the data they protect.
//!
//! The raw `kmutex_t`/`kcondvar_t` live in their own heap allocation so that
//! their address never changes after `mutex_init`/`cv_init`, whatever
//! happens to the owning Rust value; they are allocated at attach time,
//! never on the I/O path.

use crate::ffi;
use alloc::boxed::Box;
use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

/// A `kmutex_t` protecting a `T`.
pub struct KMutex<T> {
    raw: Box<UnsafeCell<ffi::kmutex_t>>,
    data: UnsafeCell<T>,
}

// SAFETY: access to `data` is serialized by the kernel mutex.
unsafe impl<T: Send> Send for KMutex<T> {}
// SAFETY: `&KMutex<T>` reaches `data` only through a guard, which holds
// the kernel mutex: one thread at a time gets `&mut T`, so sharing the
// KMutex across threads needs only `T: Send`.
unsafe impl<T: Send> Sync for KMutex<T> {}

impl<T> KMutex<T> {
    /// `mutex_init(MUTEX_DRIVER)` at interrupt priority `intr_pri` (from
    /// `ddi_intr_get_pri(9F)`), or 0 for a lock never taken by an
    /// interrupt handler.
    pub fn new(data: T, intr_pri: u32) -> Self {
        let raw = Box::new(UnsafeCell::new(ffi::kmutex_t {
            _opaque: [core::ptr::null_mut()],
        }));
        // SAFETY: raw is a fresh, exclusively owned kmutex_t at a stable
        // address; DDI_INTR_PRI(pri) is the priority cast to a pointer.
        unsafe {
            ffi::mutex_init(
                raw.get(),
                core::ptr::null_mut(),
                ffi::MUTEX_DRIVER,
                intr_pri as usize as *mut _,
            )
        };
        Self {
            raw,
            data: UnsafeCell::new(data),
        }
    }

    /// `mutex_enter(9F)`; released when the guard drops.
    pub fn lock(&self) -> KMutexGuard<'_, T> {
        // SAFETY: the mutex was initialized in new() and lives until drop.
        unsafe { ffi::mutex_enter(self.raw.get()) };
        KMutexGuard {
            lock: self,
            _not_send: PhantomData,
        }
    }

    /// `mutex_tryenter(9F)`: the lock if it is free now, never waiting
    /// for it (`None` if another thread holds it).
    pub fn try_lock(&self) -> Option<KMutexGuard<'_, T>> {
        // SAFETY: the mutex was initialized in new() and lives until drop;
        // mutex_tryenter only takes it if it can at once.
        let taken = unsafe { ffi::mutex_tryenter(self.raw.get()) } != 0;
        // A guard exists only for a lock taken: dropping one releases it
        // (`then_some` would build, and drop, a guard when not taken).
        if taken {
            Some(KMutexGuard {
                lock: self,
                _not_send: PhantomData,
            })
        } else {
            None
        }
    }

    /// `mutex_owned(9F)`: whether the calling thread holds the lock.
    pub fn held(&self) -> bool {
        // SAFETY: initialized mutex.
        unsafe { ffi::mutex_owned(self.raw.get()) != 0 }
    }

    /// The data, through exclusive access to the lock itself.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }

    fn raw(&self) -> *mut ffi::kmutex_t {
        self.raw.get()
    }
}

impl<T> Drop for KMutex<T> {
    fn drop(&mut self) {
        // SAFETY: initialized, and no guard can exist (we have &mut self).
        unsafe { ffi::mutex_destroy(self.raw.get()) };
    }
}

/// Proof that the calling thread holds a [`KMutex`].
///
/// The guard cannot leave the thread that took the lock: an illumos
/// adaptive mutex belongs to the thread that entered it, and
/// `mutex_exit(9F)` on any other thread panics the system
/// ("mutex_exit: not owner", `mutex_vector_exit` in
/// usr/src/uts/common/os/mutex.c, reached from the `mutex_exit` fast path
/// of usr/src/uts/intel/ml/lock_prim.S when the owner is not
/// `curthread`). So the guard is neither `Send` nor `Sync`:
///
/// ```compile_fail
/// fn exit_elsewhere(g: rvscsi::ddi::sync::KMutexGuard<'static, u32>) {
///     // error: `*const ()` cannot be sent between threads safely
///     std::thread::spawn(move || drop(g));
/// }
/// ```
pub struct KMutexGuard<'a, T> {
    lock: &'a KMutex<T>,
    /// A raw pointer makes the guard `!Send` and `!Sync`.
    _not_send: PhantomData<*const ()>,
}

/// Compile-time proof that [`KMutexGuard`] is not `Send`: were it `Send`,
/// both implementations of `AmbiguousIfSend` would apply to it and the
/// path below would be ambiguous, failing the build (the technique of the
/// `static_assertions` crate's `assert_not_impl_any!`).
const _: fn() = || {
    trait AmbiguousIfSend<A> {
        fn some_item() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    struct IfSend;
    impl<T: ?Sized + Send> AmbiguousIfSend<IfSend> for T {}
    let _ = <KMutexGuard<'static, u32> as AmbiguousIfSend<_>>::some_item;
};

impl<T> Deref for KMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the mutex is held for the guard's lifetime.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for KMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the mutex is held, and the guard is unique.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for KMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this thread entered the mutex when creating the guard.
        unsafe { ffi::mutex_exit(self.lock.raw()) };
    }
}

/// A `kcondvar_t`.
pub struct KCondvar {
    raw: Box<UnsafeCell<ffi::kcondvar_t>>,
}

// SAFETY: condition variables are designed for cross-thread use.
unsafe impl Send for KCondvar {}
// SAFETY: cv_wait/cv_signal/cv_broadcast(9F) are meant to be called on
// one kcondvar_t from several threads at once; KCondvar has no other state.
unsafe impl Sync for KCondvar {}

/// `cv_reltimedwait(9F)` resolution argument `TR_CLOCK_TICK`.
const TR_CLOCK_TICK: i32 = 4;

impl KCondvar {
    /// `cv_init(CV_DRIVER)`
    pub fn new() -> Self {
        let raw = Box::new(UnsafeCell::new(ffi::kcondvar_t { _opaque: 0 }));
        // SAFETY: fresh kcondvar_t at a stable address.
        unsafe {
            ffi::cv_init(
                raw.get(),
                core::ptr::null_mut(),
                ffi::CV_DRIVER,
                core::ptr::null_mut(),
            )
        };
        Self { raw }
    }

    /// `cv_reltimedwait(9F)`: releases the lock, waits for a signal or
    /// `ticks` clock ticks, re-acquires. Returns false on timeout.
    pub fn wait_ticks<T>(&self, guard: &mut KMutexGuard<'_, T>, ticks: i64) -> bool {
        // SAFETY: the guard proves the mutex is held by this thread.
        let r = unsafe {
            ffi::cv_reltimedwait(
                self.raw.get(),
                guard.lock.raw(),
                ticks.max(1),
                TR_CLOCK_TICK,
            )
        };
        r != -1
    }

    /// `cv_signal(9F)`
    pub fn signal(&self) {
        // SAFETY: initialized condvar.
        unsafe { ffi::cv_signal(self.raw.get()) }
    }

    /// `cv_broadcast(9F)`
    pub fn broadcast(&self) {
        // SAFETY: initialized condvar.
        unsafe { ffi::cv_broadcast(self.raw.get()) }
    }
}

impl Default for KCondvar {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KCondvar {
    fn drop(&mut self) {
        // SAFETY: initialized; no waiter can exist once we own it mutably.
        unsafe { ffi::cv_destroy(self.raw.get()) };
    }
}
