//! `Range` and `Content-Range` parsing must never panic, and must stay inside the blob.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth::fuzzing::ranges(data);
});
