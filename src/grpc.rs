//! The gRPC edge: tonic services for the data plane (Authorizer, Envoy's ext_authz Check) and the
//! management plane (Admin), health and reflection, and the routers that put them on a listener.
//!
//! Architecture invariant: this is the only module that names generated protobuf types or
//! `tonic::Status` (`tests/architecture.rs` checks), and [`ext_authz`] the only one that names
//! Envoy's. Requests are validated here, once, into domain types ([`convert`], [`decision_io`]);
//! errors become statuses through one table ([`status`]).

pub mod admin;
pub mod auth;
pub mod authorizer;
pub mod convert;
pub mod decision_io;
pub mod ext_authz;
pub mod planes;
pub mod status;
pub mod tls;

/// Generated protobuf and tonic code for `keyfence.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keyfence.v1");

    /// The encoded descriptors of `proto/`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/keyfence_descriptor.bin"));
}
