//! What the token work keeps in storage besides the session: the refresh lease and the history
//! of refresh attempts.

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// The refresh lease of one session in storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshLease {
    /// The session whose tokens the lease holder may refresh.
    pub session_id: String,
    /// Who holds it: random per attempt (never a secret).
    pub holder: String,
    /// The session version the holder read before asking for the lease (for diagnosis; its
    /// swap expects the version it reads again once it holds the lease).
    pub version: u64,
    /// When the lease lapses unless renewed.
    pub expires_at: Millis,
}

/// One upstream refresh attempt (with its retries), success or failure. Holds SHA-256 hashes of
/// tokens (hex), never tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRecord {
    /// `rr_<13-digit millis>_<random>`: sorts by time.
    pub record_id: String,
    /// The session whose tokens were refreshed.
    pub session_id: String,
    /// Its owner.
    pub user_id: String,
    /// When the attempt finished.
    pub refreshed_at: Millis,
    /// Why: proactive, expired, user_requested, forced, or the caller's text.
    pub reason: String,
    /// Whether new tokens were stored.
    pub success: bool,
    /// For a failure: what failed, without secrets.
    pub error: Option<String>,
    /// Bounded failure cause (the metrics label).
    pub cause: Option<String>,
    /// Whether the provider rotated the refresh token.
    pub rotated: bool,
    /// Hash of the access token before.
    pub old_access_token_hash: String,
    /// Hash of the access token after.
    pub new_access_token_hash: Option<String>,
    /// Hash of the refresh token before.
    pub old_refresh_token_hash: Option<String>,
    /// Hash of the refresh token after.
    pub new_refresh_token_hash: Option<String>,
    /// Access-token expiry before.
    pub old_expires_at: Option<Millis>,
    /// Access-token expiry after.
    pub new_expires_at: Option<Millis>,
    /// Upstream attempts made (1 plus retries).
    pub attempts: u32,
    /// End of the grace period this refresh opened.
    pub grace_period_ends_at: Option<Millis>,
    /// When the record may be purged (the session's retention when it was written).
    pub expires_at: Millis,
}
