use rvscsi_emu::*;
use std::sync::{Arc, Mutex};

struct Recorder(Mutex<Vec<(u32, u64, Vec<u8>)>>);
struct Inst;
impl TargetInstance for Inst {
    fn detach(&self) {}
}
impl TargetDriver for Recorder {
    fn attach(&self, dev: Arc<Device>, inq: &[u8]) -> Result<Box<dyn TargetInstance>, String> {
        self.0
            .lock()
            .unwrap()
            .push((dev.target, dev.lun, inq.to_vec()));
        Ok(Box::new(Inst))
    }
}

#[test]
fn smoke_attach_detach() {
    let dir = std::env::temp_dir().join(format!("rvscsi-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("d0.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
    let mc = MachineConfig::virtio_scsi(vec![Disk {
        file: img.display().to_string(),
        target: 0,
        lun: 0,
    }]);
    let bed = Bed::attach(BedConfig::new(mc, rec.clone())).expect("attach");
    for l in bed.machine.log() {
        eprintln!("log: {}", l.text);
    }
    let found = rec.0.lock().unwrap().clone();
    eprintln!(
        "found {:?}",
        found
            .iter()
            .map(|(t, l, i)| (t, l, String::from_utf8_lossy(&i[8..32]).to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(found.len(), 1);
    let report = bed.detach().expect("detach");
    eprintln!("{report:?}");
    assert!(report.is_clean());
}
