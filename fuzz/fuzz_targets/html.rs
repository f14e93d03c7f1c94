#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pretrain_worker::fuzz::html(data));
