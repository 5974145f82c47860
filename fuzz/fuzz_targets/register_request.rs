#![no_main]
//! See `isthmus_tests::fuzz::register_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::register_request(data));
