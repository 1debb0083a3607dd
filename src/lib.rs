//! Session Authority: a gRPC service that owns user sessions for a fleet of polyglot backends.
//!
//! Read in this order:
//! - [`config`]: every setting, resolved from flags, environment and a TOML file;
//! - [`error`]: the one error type, mapped to gRPC statuses in [`grpc::status`];
//! - [`clock`]: time in milliseconds, and a clock tests can move;
//! - [`crypto`]: session tokens, hashes, encryption at rest;
//! - [`limits`]: size limits shared by validation and the domain;
//! - [`model`]: the types that cross the storage boundary (records, events, limiter state);
//! - [`session`]: the session record and lifecycle ([`session::SessionManager`]);
//! - [`security`]: rate limits, hijack detection, the security event log and summaries;
//! - [`store`]: the storage traits and the memory, embedded, redis and kv-rest backends;
//! - [`revocation`]: the revocation log and list, cascading revocation, the live feed;
//! - [`token`]: upstream OAuth2 tokens: access, refresh (single flight, retries), introspection;
//! - [`bootstrap`]: the keys a first run generates;
//! - [`http`]: what both HTTP clients read from answers alike (`Retry-After`);
//! - [`grpc`]: the contract's generated code, the service adapters, auth and tower layers;
//! - [`metrics`]: the Prometheus exporter, the per-RPC counters and every metric name;
//! - [`telemetry`]: logs (text or JSON), OTLP trace export, the per-call span and its parent;
//! - [`app`]: assembly of the server and its graceful shutdown.
//!
//! `ARCHITECTURE.md` at the repository root has the bird's-eye view and the invariants.

#![forbid(unsafe_code)]
// `missing_docs` is on where the library is meant to be built on: the storage traits and their
// backends (`store`), the model they exchange, `app`, `error` and `clock` (each says so at its
// top). Elsewhere an item is documented when there is something to say beyond its name.
#![warn(unreachable_pub)]

pub mod app;
pub mod bootstrap;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod paging;
pub mod revocation;
pub mod security;
#[cfg(feature = "bench-seed")]
pub mod seeding;
pub mod session;
pub mod sidecar;
pub mod store;
pub mod telemetry;
pub mod token;

pub use app::{App, StartError};
pub use config::Config;
pub use error::{Error, Result};
