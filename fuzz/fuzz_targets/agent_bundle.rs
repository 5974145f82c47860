#![no_main]
//! See `isthmus_tests::fuzz::agent_bundle`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_tests::fuzz::agent_bundle(data));
