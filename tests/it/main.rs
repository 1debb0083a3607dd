//! Integration tests: one test binary; `support` starts the real server as a process.

mod conformance;
mod foundation;
mod loadgen;
mod oidc;
mod revocations;
mod security;
mod sessions;
mod support;
mod tls;
mod tokens;
