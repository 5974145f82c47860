#![no_main]
//! See `isthmus_tests::fuzz::dns_query`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::dns_query(data));
