//! The meter's accounting. Its counters belong to the whole process (the
//! driver runs on interrupt and task threads too), so this runs in a test
//! binary of its own: any emulated kernel call another test made meanwhile
//! would be counted.

use rvscsi_emu::meter::{arm, calibrate, driver, kernel, probe, take};

#[test]
fn time_goes_to_the_innermost_side_and_kernel_calls_are_counted() {
    arm(true);
    let _ = take();
    {
        let _d = driver();
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            let _k = kernel();
            std::thread::sleep(std::time::Duration::from_millis(60));
            let _d2 = driver();
        }
        drop(probe());
        let _k = kernel();
    }
    arm(false);
    let r = take();
    assert_eq!(r.kernel_calls, 2);
    assert_eq!(r.probe_calls, 1, "probe sites are counted apart");
    assert_eq!(r.driver_entries, 2);
    assert!(r.driver_ns >= 20_000_000, "{r:?}");
    assert!(
        r.driver_ns < 60_000_000,
        "kernel time charged to the driver: {r:?}"
    );
    assert_eq!(
        r.switches, 10,
        "every crossing between the driver and the rest"
    );
    let c = calibrate(1000);
    assert_eq!(
        (c.switches, c.kernel_calls, c.probe_calls, c.driver_entries),
        (2002, 1000, 0, 1)
    );
    // calibrate leaves the meter off: nothing more is counted.
    let _ = take();
    {
        let _d = driver();
        let _k = kernel();
    }
    let after = take();
    assert_eq!(
        (after.kernel_calls, after.driver_entries),
        (0, 0),
        "{after:?}"
    );
}
