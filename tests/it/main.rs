//! Integration tests: one test binary; `support` starts the real server as a process.

mod foundation;
mod support;
