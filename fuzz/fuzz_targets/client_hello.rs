#![no_main]
//! See `isthmus_tests::fuzz::client_hello`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::client_hello(data));
