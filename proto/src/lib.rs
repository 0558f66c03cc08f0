//! The `celld.v1` wire contract, generated from `proto/celld/v1/*.proto`.
//!
//! Nothing but generated code lives here: conversions to domain types belong to the
//! crate that owns the domain (the agent's `api` module, the master).

/// Package `celld.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("celld.v1");
}

/// Encoded `FileDescriptorSet` of package `celld.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/celld_v1_descriptor.bin"));
