//! keyfence's fuzz checks, shared by the libFuzzer targets and the corpus replay test.
#![forbid(unsafe_code)]

pub mod checks;
