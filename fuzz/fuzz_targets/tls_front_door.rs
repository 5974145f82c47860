#![no_main]
//! See `isthmus_tests::fuzz::tls_front_door`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::tls_front_door(data));
