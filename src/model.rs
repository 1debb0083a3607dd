//! The types that cross the storage boundary, at the bottom of the layer order: the session
//! record, what ended a session, the security event, the limiter's state and its pure rule, the
//! refresh lease and history. The store traits speak only these; the domain modules re-export
//! the ones their callers name (`session::SessionRecord`, `security::limiter`, ...).

#![warn(missing_docs)]

pub mod fingerprint;
pub mod limiter;
pub mod revocation;
pub mod security;
pub mod session;
pub mod token;

pub use revocation::{RevocationEvent, RevocationKind, new_log_id};
pub use security::{EventType, SecurityEvent, Severity};
pub use session::{RecordFormat, SessionRecord, SessionState, shard_tag};
pub use token::{RefreshLease, RefreshRecord};

/// SHA-256 of a session token or an upstream token: the only form in which a token is stored.
pub type TokenHash = [u8; 32];
