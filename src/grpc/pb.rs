//! Code generated from `proto/atoms/session/v1` by `build.rs`, and the encoded file descriptor
//! set that reflection serves.

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

tonic::include_proto!("atoms.session.v1");

/// The encoded `FileDescriptorSet` of the contract, with its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/session_authority_descriptor.bin"));
