//! keyfence: a policy decision point for partner API keys. This package is the edge and the
//! runtime; the core lives in the workspace's crates (see ARCHITECTURE.md):
//! - `keyfence_policy`: domain types and the pure decision engine; no I/O, no clock.
//! - `keyfence_store`: the source of truth (embedded redb, or Redis for many replicas) and the
//!   access log.
//! - `keyfence_admin`: the admin application layer, every admin rule once.
//!
//! Layout of this package, inner to outer (dependencies point inward):
//! - [`system`]: the real clock and the OS random source, handed to the layers that take them.
//! - [`sync`]: applies store changes to the in-memory policy snapshot.
//! - [`telemetry`]: logs, OpenTelemetry export and Prometheus metrics.
//! - [`access`]: records decisions in the access log and raises alerts, off the decision path.
//! - [`authz`]: the decision service every data-plane front end shares.
//! - [`authn`]: who calls the admin plane: named token digests and client certificates.
//! - [`grpc`]: tonic services; the only place that names generated proto types or `Status`.
//! - [`config`]: the one configuration struct, from file, environment and flags.
//! - [`data_dir`]: makes the data directory private (0700, files 0600) at start.
//! - [`reload`]: SIGHUP and file changes as a reload trigger.
//! - [`secrets`]: the secrets key file (the keyring that seals stored records) and its reloads.
//! - [`server`]: wires the above together and runs the listeners.
//! - [`signing`]: signing as a partner signs (key file formats), for `keyfence sign` and the
//!   published test vectors.
//! - [`cli`]: the command line: the admin commands, clients of the Admin service, and
//!   `keyfence sign`, which needs no server.
#![forbid(unsafe_code)]

pub mod access;
pub mod authn;
pub mod authz;
pub mod cli;
pub mod config;
pub mod data_dir;
pub mod grpc;
pub mod reload;
pub mod secrets;
pub mod server;
pub mod signing;
pub mod sync;
pub mod system;
pub mod telemetry;
