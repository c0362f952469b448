//! The policy decision point's core: domain types, strict IP parsing, compiled allowlists,
//! signatures, and the engine that decides.
//!
//! Architecture invariant: nothing here knows about tonic, prost, Redis, the disk or the clock.
//! Everything is a pure function of a snapshot, a request and the `now` it is given, so every
//! path can be unit-tested exhaustively.

pub mod allowlist;
pub mod client_ip;
pub mod decision;
pub mod ip;
pub mod model;
pub mod nonce;
pub mod rate_limit;
pub mod signature;
pub mod snapshot;
