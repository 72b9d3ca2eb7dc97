//! The relance.v1 gRPC API: messages, clients and servers generated from `relance/v1/*.proto`,
//! the encoded descriptor set for reflection, and conversions between protobuf's JSON-like
//! types and `serde_json` / `chrono`.
#![forbid(unsafe_code)]

/// Generated code of package `relance.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("relance.v1");
}

/// The encoded `FileDescriptorSet` of every relance.v1 file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/relance_descriptor.bin"));

pub mod convert;
