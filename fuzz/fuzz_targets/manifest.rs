//! Manifest parsing and validation must never panic, whatever the bytes and Content-Type.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth::fuzzing::manifest(data);
});
