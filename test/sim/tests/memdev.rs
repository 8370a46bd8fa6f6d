//! The in-process device model (the bench's `memory` back end) carries the
//! real driver: sd attaches through it, data goes both ways byte-exact,
//! each request queue interrupts on its own vector, and the driver stays
//! inside what the model checks (no malformed ring or chain).

use rvscsi_emu::Backend;
use rvscsi_emu::ddi::cpu;
use rvscsi_sim::testkit::{Rig, RigConfig, random_bytes, request_vector};
use std::sync::atomic::Ordering;

fn memory_rig(num_queues: u32) -> Rig {
    Rig::start(RigConfig {
        images: vec![(32_768, 0, 0), (4096, 2, 1)],
        transport: "modern".into(),
        interrupts: "msix".into(),
        num_queues: Some(num_queues),
        backend: Backend::Memory,
        ..RigConfig::default()
    })
}

/// The rig's in-memory device, checked to have found nothing malformed.
fn device_without_errors(rig: &Rig) -> std::sync::Arc<rvscsi_emu::memdev::MemoryMachine> {
    let dev = rig.memdev();
    assert!(dev.errors().is_empty(), "device errors: {:?}", dev.errors());
    dev
}

#[test]
fn sd_attaches_and_moves_data_byte_exact_on_the_in_memory_device() {
    let rig = memory_rig(1);
    let disks = rig.sd.disks();
    assert_eq!(disks.len(), 2, "both LUNs found: {:?}", rig.log());
    let disk = rig.disk0();
    let img = &rig.images[0];
    for (lba, len) in [(0u64, 512usize), (9, 4096), (100, 1 << 20)] {
        assert_eq!(
            disk.read(lba, len).expect("read"),
            img.expected(lba, len as u64 / 512)
        );
    }
    for (i, len) in [512usize, 65536, disk.max_xfer.min(4 << 20)]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(i as u64 + 1, len);
        let lba = 2048 + 4096 * i as u64;
        disk.write(lba, &data).expect("write");
        assert_eq!(disk.read(lba, len).expect("read back"), data);
    }
    assert!(
        device_without_errors(&rig)
            .stats
            .requests
            .load(Ordering::Relaxed)
            > 0
    );
    rig.finish_clean();
}

#[test]
fn each_request_queue_completes_on_its_own_vector_in_memory_too() {
    let rig = memory_rig(4);
    let disk = rig.disk0();
    for on in 0..4 {
        let before = rig.per_vector_quiet();
        let d = disk.clone();
        std::thread::spawn(move || {
            cpu::run_on(on);
            let data = random_bytes(on as u64, 8192);
            d.write(512 + 64 * on as u64, &data).expect("write");
            assert_eq!(d.read(512 + 64 * on as u64, 8192).expect("read"), data);
        })
        .join()
        .expect("I/O thread");
        let after = rig.per_vector_quiet();
        for n in 0..4 {
            let fired = after[request_vector(n)] - before[request_vector(n)];
            assert_eq!(
                fired > 0,
                n == on,
                "CPU {on}: vector of queue {n} fired {fired} times"
            );
        }
    }
    device_without_errors(&rig);
    rig.finish_clean();
}

#[test]
fn the_in_memory_device_refuses_what_it_does_not_model() {
    let legacy = Rig::try_start(RigConfig {
        transport: "legacy".into(),
        backend: Backend::Memory,
        ..RigConfig::default()
    });
    let e = legacy.err().expect("legacy refused");
    assert!(e.contains("modern-only"), "{e}");
    let no_msix = Rig::try_start(RigConfig {
        msix_vectors: Some(0),
        backend: Backend::Memory,
        ..RigConfig::default()
    });
    let e = no_msix.err().expect("no MSI-X refused");
    assert!(e.contains("MSI-X"), "{e}");
}
