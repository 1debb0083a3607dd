//! What ended a session, and the event of the revocation log that says so.

use serde::{Deserialize, Serialize};

use super::session::SessionState;
use crate::clock::Millis;

/// What ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// RevokeSession or RevokeUserSessions.
    Revoked,
    /// TerminateSession (logout or admin termination).
    Terminated,
    /// The per-user cap evicted the session.
    Evicted,
    /// Hijack detection ended the session.
    Hijack,
    /// The provider refused the session's refresh token.
    RefreshFailed,
}

impl RevocationKind {
    /// The terminal state a session ends in for this kind: only revocations are `Revoked`.
    pub fn state(self) -> SessionState {
        match self {
            RevocationKind::Revoked => SessionState::Revoked,
            _ => SessionState::Terminated,
        }
    }

    /// A stable lower-case name (JSON output of the `watch` command).
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Revoked => "revoked",
            RevocationKind::Terminated => "terminated",
            RevocationKind::Evicted => "evicted",
            RevocationKind::Hijack => "hijack",
            RevocationKind::RefreshFailed => "refresh_failed",
        }
    }
}

/// One end of a session in the revocation log; while `expires_at` is in the future it is also
/// an entry of the revocation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEvent {
    /// Sequence number in the log (from 1, gap-free, in commit order).
    pub seq: u64,
    /// The session that ended.
    pub session_id: String,
    /// Its owner.
    pub user_id: String,
    /// What ended it.
    pub kind: RevocationKind,
    /// Why.
    pub reason: String,
    /// Who asked, when known.
    pub revoked_by: Option<String>,
    /// When.
    pub revoked_at: Millis,
    /// When the entry leaves the revocation list (and the event may be purged from the log).
    pub expires_at: Millis,
}

/// A fresh random log id (16 hex digits).
pub fn new_log_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(16);
    id
}
