//! libFuzzer target: [`rvscsi_fuzz::config`] (the input plays the device).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rvscsi_fuzz::config(data));
