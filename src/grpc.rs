//! The gRPC surface: generated code, one adapter per service, the status mapping, request
//! validation, authentication and the tower layers. Only this module and `app.rs` use tonic;
//! adapters translate proto messages to domain calls and back, and nothing else.

pub mod auth;
pub mod convert;
pub mod envoy;
pub mod layers;
pub mod pb;
pub mod revocation;
pub mod rpc_metrics;
pub mod security;
pub mod session;
pub mod status;
pub mod token;
pub mod validate;
