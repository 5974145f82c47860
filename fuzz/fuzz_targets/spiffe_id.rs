#![no_main]
//! See `isthmus_tests::fuzz::spiffe_id`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::spiffe_id(data));
