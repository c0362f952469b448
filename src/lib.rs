//! keyfence: a policy decision point for partner API keys.
//!
//! Layout, inner to outer (dependencies point inward):
//! - [`policy`]: domain types and the pure decision engine; knows nothing of I/O.
//! - [`store`]: the source of truth (embedded file store; Redis later), one trait.
//! - [`sync`]: applies store changes to the in-memory policy snapshot.
//! - [`grpc`]: tonic services; the only place that names generated proto types or `Status`.
//! - [`config`]: the one configuration struct, from file, environment and flags.
//! - [`server`]: wires the above together and runs the listeners.
//! - [`access`]: access logs, last-used times and blocked-attempt alerts, off the decision path.
//! - [`telemetry`]: logs, OpenTelemetry export and Prometheus metrics.
//! - [`cli`]: the admin command line, a client of the Admin service.
#![forbid(unsafe_code)]

pub mod access;
pub mod authz;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod policy;
pub mod server;
pub mod store;
pub mod sync;
pub mod telemetry;
