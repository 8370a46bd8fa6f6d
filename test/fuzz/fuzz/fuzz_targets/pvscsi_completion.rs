//! libFuzzer target: [`rvscsi_fuzz::pvscsi_completion`] (the input plays the device).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rvscsi_fuzz::pvscsi_completion(data));
