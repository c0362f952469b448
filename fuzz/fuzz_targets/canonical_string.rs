#![no_main]
//! `cargo +nightly fuzz run canonical_string`: see `keyfence_fuzz::checks` for what it asserts.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keyfence_fuzz::checks::run("canonical_string", data));
