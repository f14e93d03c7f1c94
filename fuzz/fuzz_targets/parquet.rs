#![no_main]

// The reader catches the Parquet decoder's panics on malformed files (they end the file like a
// damaged page). libFuzzer's panic hook would abort on those caught panics, so it is replaced by
// a silent one; a panic that escapes the reader still aborts the run (libfuzzer-sys checks).
libfuzzer_sys::fuzz_target!(init: {
    std::panic::set_hook(Box::new(|_| {}));
}, |data: &[u8]| pretrain_worker::fuzz::parquet(data));
