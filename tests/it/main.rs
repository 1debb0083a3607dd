//! Integration tests: one test binary; `support` starts the real server as a process.

mod conformance;
mod foundation;
mod loadgen;
mod revocations;
mod security;
mod servers;
mod sessions;
mod shared_storage;
mod support;
mod tls;
