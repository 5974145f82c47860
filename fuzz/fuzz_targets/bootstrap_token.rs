#![no_main]
//! See `isthmus_tests::fuzz::bootstrap_token`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::bootstrap_token(data));
