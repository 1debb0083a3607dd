//! Integration tests: one test binary; `support` starts the real server as a process.

mod authz;
mod cluster_faults;
mod conformance;
mod envoy;
mod faults;
mod feed_faults;
mod foundation;
mod fuzz;
mod guide;
mod keys;
mod layers;
mod loadgen;
mod oidc;
mod operability;
mod overload;
mod refresh_faults;
mod revocations;
mod security;
mod servers;
mod sessions;
mod shared_storage;
mod soak;
mod support;
mod tls;
mod tokens;
