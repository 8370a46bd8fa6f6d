//! The emulated mutex(9F) panics where illumos panics: `mutex_exit` by a
//! thread that does not own the mutex ("mutex_exit: not owner",
//! mutex_vector_exit in usr/src/uts/common/os/mutex.c) and a recursive
//! `mutex_enter` ("recursive mutex_enter", mutex_vector_enter). A kernel
//! panic ends the process, so each scenario runs in a child process (this
//! test binary again, running only the scenario) and the parent checks
//! that the child died with the panic message.

use rvscsi::ffi::kmutex_t;
use rvscsi_emu::ddi::sync::{mutex_destroy, mutex_enter, mutex_exit, mutex_init};
use std::process::Command;

/// Set in the child's environment: which scenario to run.
const SCENARIO: &str = "RVSCSI_MUTEX_PANIC_SCENARIO";

fn fresh_mutex() -> *mut kmutex_t {
    let mp = Box::into_raw(Box::new(kmutex_t {
        _opaque: [std::ptr::null_mut()],
    }));
    mutex_init(mp, std::ptr::null_mut(), 0, std::ptr::null_mut());
    mp
}

/// Runs `scenario` in a child process; returns its exit success and
/// standard error.
fn run_child(scenario: &str) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args(["--exact", "child_scenario", "--ignored", "--nocapture"])
        .env(SCENARIO, scenario)
        .output()
        .expect("run the child");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "the child half of the tests below; run by them with RVSCSI_MUTEX_PANIC_SCENARIO set"]
fn child_scenario() {
    let Ok(which) = std::env::var(SCENARIO) else {
        panic!("run by the parent tests only (set {SCENARIO})");
    };
    let mp = fresh_mutex();
    let addr = mp as usize;
    match which.as_str() {
        "exit-on-another-thread" => {
            mutex_enter(mp);
            // The owner's lock released by someone else: what a guard sent
            // to another thread would do.
            std::thread::spawn(move || mutex_exit(addr as *mut kmutex_t))
                .join()
                .expect("the other thread");
        }
        "exit-unheld" => mutex_exit(mp),
        "recursive-enter" => {
            mutex_enter(mp);
            mutex_enter(mp);
        }
        "try-lock-contended" => {
            // KMutex::try_lock (mutex_tryenter(9F)) while another thread
            // holds the lock: no guard, so nothing is released; then, free,
            // a guard that releases it.
            let m = std::sync::Arc::new(rvscsi::ddi::sync::KMutex::new(5u32, 0));
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let holder = {
                let m = m.clone();
                std::thread::spawn(move || {
                    let g = m.lock();
                    held_tx.send(()).expect("tell");
                    go_rx.recv().expect("wait");
                    drop(g);
                })
            };
            held_rx.recv().expect("held");
            assert!(m.try_lock().is_none(), "held elsewhere: no guard");
            assert!(!m.held(), "and not ours");
            go_tx.send(()).expect("release");
            holder.join().expect("the holder");
            let g = m.try_lock().expect("free: a guard");
            assert_eq!(*g, 5);
            assert!(m.held());
            drop(g);
            assert!(!m.held(), "the guard released it");
        }
        "owner-exits" => {
            mutex_enter(mp);
            mutex_exit(mp);
            mutex_destroy(mp);
            // SAFETY: made by Box::into_raw above, destroyed.
            drop(unsafe { Box::from_raw(mp) });
        }
        other => panic!("unknown scenario {other}"),
    }
    eprintln!("child: scenario {which} finished");
}

fn assert_panics(scenario: &str, message: &str) {
    let (ok, stderr) = run_child(scenario);
    assert!(!ok, "{scenario}: the child survived; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("rvscsi-emu: PANIC: {message}")),
        "{scenario}: no '{message}' panic; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("finished"),
        "{scenario}: the child went on after the panic; stderr:\n{stderr}"
    );
}

#[test]
fn mutex_exit_on_a_thread_that_does_not_own_it_panics() {
    assert_panics("exit-on-another-thread", "mutex_exit: not owner");
}

#[test]
fn mutex_exit_of_an_unheld_mutex_panics() {
    assert_panics("exit-unheld", "mutex_exit: not owner");
}

#[test]
fn recursive_mutex_enter_panics() {
    assert_panics("recursive-enter", "recursive mutex_enter");
}

#[test]
fn try_lock_of_a_held_mutex_takes_and_releases_nothing() {
    let (ok, stderr) = run_child("try-lock-contended");
    assert!(ok, "stderr:\n{stderr}");
    assert!(
        stderr.contains("child: scenario try-lock-contended finished"),
        "{stderr}"
    );
}

#[test]
fn the_owner_exiting_does_not_panic() {
    // The control: the child runs the same way and survives when the
    // owner exits, so the panics above come from the ownership checks.
    let (ok, stderr) = run_child("owner-exits");
    assert!(ok, "stderr:\n{stderr}");
    assert!(
        stderr.contains("child: scenario owner-exits finished"),
        "{stderr}"
    );
}
