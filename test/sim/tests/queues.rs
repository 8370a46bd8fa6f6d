//! Every request queue the device offers: commands go to the queue of the
//! CPU that issues them, each queue interrupts on its own MSI-X vector,
//! and with fewer vectors (or none) the queues share what there is.

use rvscsi_emu::ddi::cpu;
use rvscsi_sim::testkit::{Rig, RigConfig, random_bytes, request_vector};
use std::sync::Arc;

fn attach_line(rig: &Rig) -> String {
    rig.log()
        .into_iter()
        .find(|l| l.starts_with("virtio-scsi"))
        .expect("the attach line")
}

/// Reads and writes 64 KiB at a region of its own from a thread running on
/// CPU `on`, and checks the data.
fn io_on_cpu(disk: &Arc<rvscsi_sim::sd::Disk>, on: usize) {
    cpu::run_on(on);
    let lba = 1024 + on as u64 * 256;
    let data = random_bytes(on as u64, 64 << 10);
    for _ in 0..4 {
        disk.write(lba, &data).expect("write");
        assert_eq!(disk.read(lba, 64 << 10).expect("read"), data);
    }
}

/// [`io_on_cpu`] on each of `cpus` at once.
fn io_on_cpus(disk: &Arc<rvscsi_sim::sd::Disk>, cpus: std::ops::Range<usize>) {
    let threads: Vec<_> = cpus
        .map(|on| {
            let d = disk.clone();
            std::thread::spawn(move || io_on_cpu(&d, on))
        })
        .collect();
    for t in threads {
        t.join().expect("I/O thread");
    }
}

#[test]
fn each_cpu_uses_its_own_queue_and_each_queue_interrupts_on_its_own_vector() {
    let rig = Rig::start(RigConfig {
        transport: "modern".into(),
        interrupts: "msix".into(),
        num_queues: Some(4),
        ..RigConfig::default()
    });
    let line = attach_line(&rig);
    assert!(line.contains("4 request queue(s)"), "{line}");
    let disk = rig.disk0();
    // One CPU at a time: only its queue's vector fires.
    for on in 0..4 {
        let before = rig.per_vector_quiet();
        let d = disk.clone();
        std::thread::spawn(move || io_on_cpu(&d, on))
            .join()
            .expect("I/O thread");
        let after = rig.per_vector_quiet();
        for n in 0..4 {
            let fired = after[request_vector(n)] - before[request_vector(n)];
            if n == on {
                assert!(fired > 0, "CPU {on}: queue {n}'s vector never fired");
            } else {
                assert_eq!(fired, 0, "CPU {on}: queue {n}'s vector fired");
            }
        }
    }
    // CPUs beyond the number of queues wrap around: CPU 5 uses queue 1.
    let before = rig.per_vector_quiet();
    let d = disk.clone();
    std::thread::spawn(move || io_on_cpu(&d, 5))
        .join()
        .expect("I/O thread");
    let after = rig.per_vector_quiet();
    assert!(after[request_vector(1)] > before[request_vector(1)]);
    // All at once: every queue busy, data intact.
    io_on_cpus(&disk, 0..4);
    rig.finish_clean();
}

#[test]
fn the_request_queues_tunable_caps_the_queues_used() {
    let rig = Rig::start(RigConfig {
        transport: "modern".into(),
        interrupts: "msix".into(),
        num_queues: Some(4),
        props: vec![("request-queues".into(), 2)],
        ..RigConfig::default()
    });
    let line = attach_line(&rig);
    assert!(line.contains("2 request queue(s)"), "{line}");
    let disk = rig.disk0();
    let before = rig.per_vector_quiet();
    let d = disk.clone();
    std::thread::spawn(move || io_on_cpu(&d, 3))
        .join()
        .expect("I/O thread");
    // CPU 3 of 2 queues: queue 1.
    let v = rig.per_vector_quiet();
    assert!(v[request_vector(1)] > before[request_vector(1)]);
    assert_eq!(v[request_vector(0)], before[request_vector(0)]);
    assert_eq!(v[request_vector(2)], 0, "there is no third queue");
    rig.finish_clean();
}

/// Four queues with fewer vectors than sources, or without MSI-X: the
/// queues share one vector (or the fixed interrupt) and every CPU's I/O
/// still completes.
#[test]
fn four_queues_work_on_one_shared_vector_and_on_fixed_interrupts() {
    for (vectors, interrupts, expect) in [
        (Some(2), "msix", "MSI-X"),
        (Some(0), "auto", "fixed"),
        (None, "fixed", "fixed"),
    ] {
        let rig = Rig::start(RigConfig {
            transport: "modern".into(),
            interrupts: interrupts.into(),
            num_queues: Some(4),
            msix_vectors: vectors,
            ..RigConfig::default()
        });
        let line = attach_line(&rig);
        assert!(
            line.contains("4 request queue(s)") && line.contains(&format!("{expect} interrupts")),
            "{vectors:?} {interrupts}: {line}"
        );
        let disk = rig.disk0();
        io_on_cpus(&disk, 0..4);
        let v = rig.per_vector_quiet();
        if expect == "MSI-X" {
            // Two vectors: configuration and events on 0, every request
            // queue on 1.
            assert!(line.contains("(2 vectors)"), "{line}");
            assert!(v[1] > 0 && v[2..].iter().all(|&n| n == 0), "{v:?}");
        } else {
            assert!(rig.bed().machine.snapshot().interrupts > 0);
        }
        rig.finish_clean();
    }
}
