#![no_main]
//! See `isthmus_tests::fuzz::static_resources`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::static_resources(data));
