//! Names, tags, digests, references and /v2/ paths must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth::fuzzing::reference(data);
});
