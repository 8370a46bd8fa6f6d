//! Doorbells: at most one per request queue per completion pass, whichever
//! queues the commands started while the pass runs land on, and a lone
//! command rings at once. Counted per queue by the in-memory device (a
//! notification is handled inside the doorbell write there, so every
//! command that needs one asks for it: nothing is suppressed by timing).

use rvscsi::ffi;
use rvscsi_emu::memdev::MemoryMachine;
use rvscsi_emu::{Backend, DataBuf, InitArgs, Packet};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const QUEUES: usize = 4;
/// The device's index of request queue 0 (control and event queues first).
const FIRST_REQUEST_QUEUE: usize = 2;
/// CPUs no request queue's vector interrupts (the test bed runs vector i
/// on CPU i; vector 0 carries configuration changes and events, request
/// queue q is on vector 1 + q, so the request queues' are 1 to 4), one per
/// request queue: the queue of a command started on a CPU where no
/// completion pass runs is the CPU's seqid modulo the queue count.
const IDLE_CPUS: [usize; QUEUES] = [0, 5, 6, 7];

fn rig() -> Rig {
    Rig::start(RigConfig {
        images: vec![(16_384, 0, 0)],
        transport: "modern".into(),
        interrupts: "msix".into(),
        num_queues: Some(QUEUES as u32),
        backend: Backend::Memory,
        driver: Driver::Recorder,
        ..RigConfig::default()
    })
}

fn doorbells(dev: &MemoryMachine) -> [u64; QUEUES] {
    std::array::from_fn(|q| dev.stats.doorbell_writes(FIRST_REQUEST_QUEUE + q))
}

fn read_packet(lun: &rvscsi_sim::load::Lun, lba: u8) -> Packet {
    let buf = Arc::new(DataBuf::new(4096, 0, true));
    let p = lun
        .dev
        .init_pkt(Some(buf), InitArgs::default())
        .expect("scsi_init_pkt");
    // READ(10) of 8 blocks at `lba`.
    let cdb = [0x28, 0, 0, 0, 0, lba, 0, 0, 8, 0];
    // SAFETY: a packet not in flight, with a 10-byte CDB area.
    unsafe { std::ptr::copy_nonoverlapping(cdb.as_ptr(), (*p.pkt()).pkt_cdbp, cdb.len()) };
    p
}

#[test]
fn commands_started_on_four_queues_during_a_completion_pass_ring_each_doorbell_once() {
    let rig = rig();
    let lun = rig.load_luns().first().expect("a LUN").clone();
    let dev = rig.memdev();
    // Two commands for every request queue, started from the CPUs whose
    // queues they go to while the completion pass of `trigger` runs (its
    // completion routine waits for them): sd issuing from other CPUs
    // while an interrupt completes on one.
    let during: Vec<(usize, Packet)> = (0..2 * QUEUES)
        .map(|k| (IDLE_CPUS[k % QUEUES], read_packet(&lun, 8 * k as u8 + 8)))
        .collect();
    let during = Arc::new(Mutex::new(Some(during)));
    let started = Arc::new(Mutex::new(Vec::new()));
    let trigger = read_packet(&lun, 0);
    {
        let (during, started) = (during.clone(), started.clone());
        trigger.set_callback(Some(Arc::new(move |_p: &Packet| {
            let Some(batch) = during.lock().unwrap().take() else {
                return;
            };
            let rcs = std::thread::scope(|s| {
                s.spawn(|| {
                    batch
                        .iter()
                        .map(|(cpu, p)| {
                            rvscsi_emu::ddi::cpu::run_on(*cpu);
                            p.start_async()
                        })
                        .collect::<Vec<_>>()
                })
                .join()
                .expect("the starting thread")
            });
            *started.lock().unwrap() = vec![(batch, rcs)];
        })));
    }
    rvscsi_emu::ddi::cpu::run_on(IDLE_CPUS[0]);
    let before = doorbells(&dev);
    assert_eq!(trigger.start_async(), ffi::TRAN_ACCEPT);
    assert!(
        trigger.wait(Duration::from_secs(30)),
        "the trigger completed"
    );
    let (batch, rcs) = started
        .lock()
        .unwrap()
        .pop()
        .expect("the completion routine started the batch");
    assert!(rcs.iter().all(|&rc| rc == ffi::TRAN_ACCEPT), "{rcs:?}");
    for (_, p) in &batch {
        assert!(p.wait(Duration::from_secs(30)), "a batch command completed");
        let r = p.result();
        assert_eq!((r.reason, r.status()), (ffi::CMD_CMPLT, ffi::STATUS_GOOD));
    }
    let after = doorbells(&dev);
    let rung: Vec<u64> = (0..QUEUES).map(|q| after[q] - before[q]).collect();
    // Queue 0: the lone trigger (rung at once: it completed, and nothing
    // else could have rung for it) and its pass's batch; every other
    // queue: its two commands, one doorbell at the end of the pass.
    assert_eq!(
        rung,
        vec![2, 1, 1, 1],
        "doorbell writes per request queue (the trigger, then one per queue per pass)"
    );
    for (_, p) in batch {
        p.destroy();
    }
    trigger.set_callback(None);
    trigger.destroy();
    drop(lun);
    let report = rig.finish();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_command_started_from_a_completion_routine_joins_the_queue_being_reaped() {
    let rig = rig();
    let lun = rig.load_luns().first().expect("a LUN").clone();
    // Started on CPU 5, the trigger goes to queue 1 (5 mod 4), whose
    // vector (2) the test bed runs on CPU 2, whose own queue is 2: the
    // command its completion routine starts there goes to queue 1, the
    // queue that pass is reaping, not to CPU 2's.
    const TRIGGER_CPU: usize = 5;
    const REAPED: usize = 1;
    const INTR_CPU: usize = 1 + REAPED;
    let follow_up = Arc::new(read_packet(&lun, 64));
    let trigger = read_packet(&lun, 0);
    let started = Arc::new(Mutex::new(None));
    {
        let (follow_up, started) = (follow_up.clone(), started.clone());
        trigger.set_callback(Some(Arc::new(move |_p: &Packet| {
            let cpu = rvscsi_emu::ddi::cpu::current();
            *started.lock().unwrap() = Some((cpu, follow_up.start_async()));
        })));
    }
    let before: Vec<u64> = (0..QUEUES).map(|q| rig.queue_stat(q, "commands")).collect();
    rvscsi_emu::ddi::cpu::run_on(TRIGGER_CPU);
    assert_eq!(trigger.start_async(), ffi::TRAN_ACCEPT);
    assert!(
        trigger.wait(Duration::from_secs(30)),
        "the trigger completed"
    );
    assert!(
        follow_up.wait(Duration::from_secs(30)),
        "the follow-up completed"
    );
    let (cpu, rc) = started.lock().unwrap().take().expect("the routine ran");
    assert_eq!(
        (cpu, rc),
        (INTR_CPU, ffi::TRAN_ACCEPT),
        "started on the interrupt's CPU"
    );
    let placed: Vec<u64> = (0..QUEUES)
        .map(|q| rig.queue_stat(q, "commands") - before[q])
        .collect();
    let mut want = vec![0; QUEUES];
    want[REAPED] = 2;
    assert_eq!(placed, want, "the trigger and its follow-up, on one queue");
    // Once the pass is over (its handler returned: the test bed runs it
    // beside this thread, where CPU 2 would run one at a time), a command
    // started on CPU 2 goes to CPU 2's own queue again: no hint is left.
    rig.per_vector_quiet();
    let later = read_packet(&lun, 128);
    rvscsi_emu::ddi::cpu::run_on(INTR_CPU);
    let before = rig.queue_stat(INTR_CPU, "commands");
    assert_eq!(later.start_async(), ffi::TRAN_ACCEPT);
    assert!(
        later.wait(Duration::from_secs(30)),
        "the later command completed"
    );
    assert_eq!(
        rig.queue_stat(INTR_CPU, "commands") - before,
        1,
        "CPU 2's own queue"
    );
    trigger.set_callback(None);
    for p in [trigger, later] {
        p.destroy();
    }
    Arc::into_inner(follow_up)
        .expect("the routine let go")
        .destroy();
    drop(lun);
    let report = rig.finish();
    assert!(report.is_clean(), "{report:?}");
}
