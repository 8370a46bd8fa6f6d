//! The driver under a DEBUG kernel's kmem (test/emu/src/ddi/kmem.rs): the
//! packet cache's constructor and destructor around every use, freed
//! packets poisoned with 0xdeadbeef and checked, caches reaped at random.
//!
//! Every test here sets the allocator's mode itself, whatever
//! `RVSCSI_KMEM_DEBUG` says (the mode is process-wide and a cache takes it
//! at creation, so the tests of this file run one at a time).

use rvscsi::ffi;
use rvscsi_emu::ddi::kmem::{self, KmemMode};
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_emu::{DataBuf, Device, InitArgs, Packet};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig, clear_unit_attention, packet_cache, wait_until};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Held for a whole test: the tests of this file change the process's
/// kmem mode.
static MODE: Mutex<()> = Mutex::new(());

/// Sets `mode` for the rig the caller starts next; the guard keeps the
/// other tests of this file out until the caller is done.
fn kmem_mode(mode: KmemMode) -> MutexGuard<'static, ()> {
    let g = MODE.lock().unwrap_or_else(|p| p.into_inner());
    kmem::force_debug(Some(mode));
    g
}

/// DEBUG kmem with no random reaps (the scenario decides what is freed).
fn debug_kmem_without_reaps() -> MutexGuard<'static, ()> {
    kmem_mode(KmemMode {
        reap_one_in: 0,
        ..KmemMode::debug(kmem::DEFAULT_SEED)
    })
}

fn rig() -> Rig {
    Rig::start(RigConfig {
        images: vec![(4096, 0, 0)],
        driver: Driver::Recorder,
        ..RigConfig::default()
    })
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

fn read_pkt(dev: &Arc<Device>, lba: u32, buf: Arc<DataBuf>) -> Packet {
    let mut p = dev
        .init_pkt(Some(buf), InitArgs::default())
        .expect("a READ packet");
    p.cdb_mut().copy_from_slice(&read10(lba, 8));
    p
}

/// LUN 0 of the recorder, its unit attention consumed.
fn ready_device(rig: &Rig) -> Arc<Device> {
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    dev
}

/// Reads 8 blocks at `lba` and checks the data against the image.
fn read_and_check(rig: &Rig, dev: &Arc<Device>, lba: u32) {
    let buf = Arc::new(DataBuf::new(4096, 0, true));
    let p = read_pkt(dev, lba, buf.clone());
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(WAIT), "READ at {lba} completes");
    let r = p.result();
    assert_eq!((r.reason, r.status()), (ffi::CMD_CMPLT, 0), "{r:?}");
    assert_eq!(p.comp_calls(), 1);
    p.destroy();
    assert_eq!(buf.bytes(), &rig.images[0].expected(u64::from(lba), 8)[..]);
}

#[test]
fn debug_kmem_constructs_at_every_allocation_and_catches_a_write_to_a_freed_packet() {
    let _mode = debug_kmem_without_reaps();
    let rig = rig();
    let dev = ready_device(&rig);
    let c = packet_cache(&dev);
    assert!(c.mode().debug);
    let (c0, d0, _) = rig.bed().cache_counts().expect("cache");
    assert_eq!(c0, d0, "no packet allocated: every object destroyed");
    read_and_check(&rig, &dev, 8);
    let (c1, d1, _) = rig.bed().cache_counts().expect("cache");
    assert_eq!(
        (c1, d1),
        (c0 + 1, d0 + 1),
        "one use, one constructor, one destructor"
    );

    // A late write into a freed packet's HBA area, as a thread of the HBA
    // still holding a command of a destroyed packet would do: the next
    // allocation of the object finds the pattern broken.
    let p = dev.init_pkt(None, InitArgs::default()).expect("packet");
    // SAFETY: reading the framework's pointer of a live packet.
    let ha = unsafe { (*p.pkt()).pkt_ha_private }.cast::<u8>();
    p.destroy();
    assert!(rig.bed().machine.violations().is_empty());
    // SAFETY: the object's memory still belongs to the cache (DEBUG keeps a
    // freed object, poisoned, until it is allocated again or reaped, and
    // no reap is asked for here): the write is the bug being simulated,
    // into memory that stays allocated.
    unsafe { ha.add(8).write(1) };
    let again = dev.init_pkt(None, InitArgs::default()).expect("packet");
    assert_eq!(
        again.pkt().cast::<u8>(),
        ha.wrapping_sub(rvscsi_emu::scsa::hba::WRAP_SIZE)
    );
    again.destroy();
    let v = rig.bed().machine.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("written after scsi_destroy_pkt")
            && v[0].contains("HBA's private area (pkt_ha_private), +0x8"),
        "{v:?}"
    );
    assert_eq!(c.modified.load(Ordering::Acquire), 1);
    let report = rig.finish();
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
    assert!(report.leaks.is_empty() && report.pages_leaked == 0);
}

/// I/O while the packet cache is reaped at random points, in `mode`.
fn io_across_random_reaps(mode: KmemMode) {
    let _mode = kmem_mode(mode);
    let rig = rig();
    let dev = ready_device(&rig);
    let c = packet_cache(&dev);
    // Several packets at a time, so that there are free constructed
    // objects for the reaps to take.
    for round in 0..40u32 {
        let bufs: Vec<_> = (0..4)
            .map(|_| Arc::new(DataBuf::new(4096, 0, true)))
            .collect();
        let pkts: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| read_pkt(&dev, round * 32 + i as u32 * 8, b.clone()))
            .collect();
        for p in &pkts {
            assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
        }
        for p in &pkts {
            assert!(p.wait(WAIT));
            assert_eq!(p.result().reason, ffi::CMD_CMPLT);
        }
        for (i, (p, b)) in pkts.into_iter().zip(&bufs).enumerate() {
            p.destroy();
            let lba = u64::from(round * 32 + i as u32 * 8);
            assert_eq!(b.bytes(), &rig.images[0].expected(lba, 8)[..]);
        }
    }
    wait_until("a reap", WAIT, || c.reaped.load(Ordering::Acquire) > 0);
    let (constructed, destructed, in_use) = rig.bed().cache_counts().expect("cache");
    assert_eq!(in_use, 0);
    if !mode.debug {
        // Only reaps destroy objects before detach in a non-DEBUG kernel.
        assert!(destructed > 0, "reaps ran destructors");
        assert!(constructed >= destructed);
    }
    rig.finish_clean();
}

#[test]
fn random_reaps_destroy_cached_packets_while_io_runs() {
    io_across_random_reaps(KmemMode {
        debug: false,
        reap_one_in: 3,
        seed: kmem::DEFAULT_SEED,
    });
}

#[test]
fn debug_kmem_io_across_random_reaps() {
    io_across_random_reaps(KmemMode {
        reap_one_in: 3,
        ..KmemMode::debug(kmem::DEFAULT_SEED)
    });
}

/// A packet the scenarios can take from another thread.
type Slot = Arc<Mutex<Option<Packet>>>;

/// Two READs held by the device (their completions withheld), in their
/// slots.
fn two_held(rig: &Rig, dev: &Arc<Device>) -> [Slot; 2] {
    let m = rig.bed().machine.clone();
    m.faults.arm(Fault::Withhold(Match::Lba(200)));
    m.faults.arm(Fault::Withhold(Match::Lba(208)));
    let slots = [200, 208].map(|lba| {
        let p = read_pkt(dev, lba, Arc::new(DataBuf::new(4096, 0, true)));
        assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
        Arc::new(Mutex::new(Some(p)))
    });
    wait_until("both commands to be withheld", WAIT, || {
        m.faults.withheld() == 2
    });
    slots
}

/// The address of the packet in `slot` (0 once it is taken).
fn pkt_address(slot: &Mutex<Option<Packet>>) -> u64 {
    slot.lock().unwrap().as_ref().map_or(0, |p| p.pkt() as u64)
}

/// The `rvscsi-cmd-done` firings so far, then [`two_held`]'s two slots
/// and their packets' addresses.
fn completions_then_two_held(rig: &Rig, dev: &Arc<Device>) -> (usize, [Slot; 2], [u64; 2]) {
    let seen = rig.bed().machine.probes.firings("rvscsi-cmd-done").len();
    let slots = two_held(rig, dev);
    let pkts = slots.each_ref().map(|s| pkt_address(s));
    (seen, slots, pkts)
}

fn take(slot: &Mutex<Option<Packet>>) -> Option<Packet> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// What the scenarios check after the reset: the first packet completed
/// once (CMD_RESET if the reset took it back, CMD_CMPLT if the device's
/// completion, written before the reset, was reaped first), the torn-down
/// one was never completed to anyone, no rule was broken, the LUN works,
/// and detach finds every freed object intact.
fn after_the_reset(rig: Rig, dev: &Arc<Device>, first: Packet, torn_down_pkt: u64, seen: usize) {
    assert!(first.wait(WAIT), "the first packet's completion returns");
    let r = first.result();
    assert!(
        r.reason == ffi::CMD_RESET || (r.reason == ffi::CMD_CMPLT && r.status() == 0),
        "{r:?}"
    );
    assert_eq!(first.comp_calls(), 1);
    first.destroy();
    let m = rig.bed().machine.clone();
    let done = m.probes.firings("rvscsi-cmd-done");
    assert!(
        done[seen..].iter().all(|f| f.args[0] != torn_down_pkt),
        "the torn-down packet is never completed"
    );
    clear_unit_attention(dev);
    read_and_check(&rig, dev, 64);
    assert_eq!(packet_cache(dev).modified.load(Ordering::Acquire), 0);
    rig.finish_clean();
}

/// A device reset ends two outstanding commands; the first one's
/// completion routine (run by the resetting thread, or by the interrupt
/// thread if it reaps the device's completions first) destroys the other
/// packet, which the HBA still has (a target-driver bug the driver survives
/// by cutting the command loose). The HBA must not touch that command
/// again: under DEBUG kmem its packet's destructor has run and its memory
/// holds 0xdeadbeef.
#[test]
fn a_packet_destroyed_by_a_completion_during_a_device_reset_is_not_touched_again() {
    let _mode = debug_kmem_without_reaps();
    let rig = rig();
    let dev = ready_device(&rig);
    let (seen, slots, pkts) = completions_then_two_held(&rig, &dev);
    // Whichever completes first destroys the other.
    let first = Arc::new(Mutex::new(None::<usize>));
    for (i, slot) in slots.iter().enumerate() {
        let other = slots[1 - i].clone();
        let first = first.clone();
        let p = slot.lock().unwrap();
        p.as_ref()
            .expect("packet")
            .set_callback(Some(Arc::new(move |_| {
                let mut f = first.lock().unwrap();
                if f.is_none() {
                    *f = Some(i);
                    drop(f);
                    if let Some(o) = take(&other) {
                        o.destroy_outstanding();
                    }
                }
            })));
    }
    assert_eq!(dev.reset(ffi::RESET_ALL), 1, "the device reset");
    wait_until("a completion during the reset", WAIT, || {
        first.lock().unwrap().is_some()
    });
    let i = first.lock().unwrap().expect("the first completion");
    let p = take(&slots[i]).expect("the first packet");
    after_the_reset(rig, &dev, p, pkts[1 - i], seen);
}

/// The same race from another thread: while the resetting thread delivers
/// the first completion, a target driver thread destroys the other packet.
#[test]
fn a_packet_destroyed_by_another_thread_during_a_device_reset_is_not_touched_again() {
    let _mode = debug_kmem_without_reaps();
    let rig = rig();
    let dev = ready_device(&rig);
    let (seen, slots, pkts) = completions_then_two_held(&rig, &dev);
    let (started_tx, started_rx) = mpsc::channel::<usize>();
    let (destroyed_tx, destroyed_rx) = mpsc::channel::<()>();
    let destroyed_rx = Arc::new(Mutex::new(destroyed_rx));
    for (i, slot) in slots.iter().enumerate() {
        let started = started_tx.clone();
        let destroyed = destroyed_rx.clone();
        let p = slot.lock().unwrap();
        p.as_ref()
            .expect("packet")
            .set_callback(Some(Arc::new(move |_| {
                // Only the first completion waits (the second never comes).
                if started.send(i).is_ok() {
                    let _ = destroyed.lock().unwrap().recv_timeout(WAIT);
                }
            })));
    }
    drop(started_tx);
    let resetter = {
        let dev = dev.clone();
        std::thread::spawn(move || dev.reset(ffi::RESET_ALL))
    };
    let i = started_rx
        .recv_timeout(WAIT)
        .expect("a completion during the reset");
    // The resetting thread is inside the first completion routine now.
    take(&slots[1 - i])
        .expect("the other packet")
        .destroy_outstanding();
    destroyed_tx.send(()).expect("the completion routine waits");
    assert_eq!(resetter.join().expect("the reset"), 1, "the device reset");
    assert!(
        started_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "no completion of the destroyed packet"
    );
    let p = take(&slots[i]).expect("the first packet");
    after_the_reset(rig, &dev, p, pkts[1 - i], seen);
}
