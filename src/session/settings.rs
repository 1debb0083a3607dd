//! The settings of the session lifecycle and their defaults.

use std::time::Duration;

/// Settings of the session lifecycle. The configuration builds them from `session.*`, with
/// `revocation.list_ttl` as the tombstone lifetime and `token.proactive_refresh` as the refresh
/// window; [`Default`] is the integration guide's values, which are also the configuration's.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Default idle timeout.
    pub idle_timeout: Duration,
    /// Default absolute timeout.
    pub absolute_timeout: Duration,
    /// Per-user cap.
    pub max_sessions_per_user: u32,
    /// Compare presented fingerprints.
    pub device_validation: bool,
    /// Share of scored fingerprint fields that must agree (0 to 1).
    pub device_match_threshold: f64,
    /// A session that stored a fingerprint requires one: an empty presented fingerprint is a
    /// mismatch instead of a skipped check.
    pub device_fingerprint_required: bool,
    /// Minimum movement of the idle expiry before it is written.
    pub idle_slide_step: Duration,
    /// How long an ended session's tombstone is kept.
    pub tombstone_ttl: Duration,
    /// `needs_refresh` when the access token expires within this.
    pub proactive_refresh: Duration,
    /// How often expired sessions are swept.
    pub cleanup_interval: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        SessionSettings {
            idle_timeout: minutes(30),
            absolute_timeout: minutes(480),
            max_sessions_per_user: 5,
            device_validation: true,
            device_match_threshold: 0.8,
            device_fingerprint_required: true,
            idle_slide_step: Duration::from_secs(60),
            tombstone_ttl: minutes(24 * 60),
            proactive_refresh: minutes(5),
            cleanup_interval: minutes(15),
        }
    }
}
