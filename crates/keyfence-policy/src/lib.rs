//! keyfence-policy: the policy decision point's core. Domain types, strict IP parsing, compiled
//! allowlists, signatures, and the engine that decides.
//!
//! Architecture invariant (checked by `tests/architecture.rs`, which fails the test command
//! if `cargo tree -p keyfence-policy` shows one of them): this crate depends on none of tokio,
//! tonic, prost, redb, redis or rand. It never reads the system clock or the OS random generator
//! (clippy's `disallowed-methods` in this crate's `clippy.toml`): time comes in as a
//! [`clock::Clock`] or a `now` argument, randomness as a [`random::RandomSource`]. Everything is a
//! pure function of a snapshot, a request and the `now` it is given, so every path can be
//! unit-tested exhaustively.
#![forbid(unsafe_code)]

pub mod allowlist;
pub mod client_ip;
pub mod clock;
pub mod decision;
pub mod excerpt;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod ip;
pub mod model;
pub mod nonce;
pub mod random;
pub mod rate_limit;
pub mod signature;
pub mod snapshot;
