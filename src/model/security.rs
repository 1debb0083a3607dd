//! The security event log's record: the 21 event types of the original library, their
//! severities, and one event.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::error::{Error, Result};

/// The type of a security event: the original library's `AuditAction`, all 21 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum EventType {
    SessionCreated,
    SessionAccessed,
    SessionRefreshed,
    SessionExpired,
    SessionRevoked,
    SessionTerminated,
    TokenIssued,
    TokenRefreshed,
    TokenRotated,
    TokenRevoked,
    TokenValidated,
    TokenIntrospected,
    SuspiciousActivity,
    RateLimitExceeded,
    InvalidDevice,
    IpChangeDetected,
    SessionHijackAttempt,
    LoginSuccess,
    LoginFailure,
    Logout,
    ForcedLogout,
}

impl EventType {
    /// Every type, in the contract's order.
    pub const ALL: [EventType; 21] = [
        EventType::SessionCreated,
        EventType::SessionAccessed,
        EventType::SessionRefreshed,
        EventType::SessionExpired,
        EventType::SessionRevoked,
        EventType::SessionTerminated,
        EventType::TokenIssued,
        EventType::TokenRefreshed,
        EventType::TokenRotated,
        EventType::TokenRevoked,
        EventType::TokenValidated,
        EventType::TokenIntrospected,
        EventType::SuspiciousActivity,
        EventType::RateLimitExceeded,
        EventType::InvalidDevice,
        EventType::IpChangeDetected,
        EventType::SessionHijackAttempt,
        EventType::LoginSuccess,
        EventType::LoginFailure,
        EventType::Logout,
        EventType::ForcedLogout,
    ];

    /// The snake_case name, as in logs and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::SessionCreated => "session_created",
            EventType::SessionAccessed => "session_accessed",
            EventType::SessionRefreshed => "session_refreshed",
            EventType::SessionExpired => "session_expired",
            EventType::SessionRevoked => "session_revoked",
            EventType::SessionTerminated => "session_terminated",
            EventType::TokenIssued => "token_issued",
            EventType::TokenRefreshed => "token_refreshed",
            EventType::TokenRotated => "token_rotated",
            EventType::TokenRevoked => "token_revoked",
            EventType::TokenValidated => "token_validated",
            EventType::TokenIntrospected => "token_introspected",
            EventType::SuspiciousActivity => "suspicious_activity",
            EventType::RateLimitExceeded => "rate_limit_exceeded",
            EventType::InvalidDevice => "invalid_device",
            EventType::IpChangeDetected => "ip_change_detected",
            EventType::SessionHijackAttempt => "session_hijack_attempt",
            EventType::LoginSuccess => "login_success",
            EventType::LoginFailure => "login_failure",
            EventType::Logout => "logout",
            EventType::ForcedLogout => "forced_logout",
        }
    }

    /// The severity an event of this type has unless its risk says more.
    pub fn default_severity(self) -> Severity {
        match self {
            EventType::SessionHijackAttempt => Severity::Critical,
            EventType::SuspiciousActivity
            | EventType::RateLimitExceeded
            | EventType::InvalidDevice
            | EventType::LoginFailure
            | EventType::ForcedLogout => Severity::Warning,
            _ => Severity::Info,
        }
    }
}

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Routine.
    Info,
    /// Worth a look.
    Warning,
    /// Act on it.
    Critical,
}

/// Risk above this makes an event suspicious (the library's `is_suspicious`, strictly greater).
pub const SUSPICIOUS_RISK: f64 = 0.5;

/// One entry of the security event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityEvent {
    /// `evt_` and 32 hex digits (see [`Recorder`](crate::security::events::Recorder)); unique, and ordered within a millisecond.
    pub event_id: String,
    /// What happened.
    pub event_type: EventType,
    /// The user, when known.
    pub user_id: Option<String>,
    /// The session's public id, when known.
    pub session_id: Option<String>,
    /// The end user's IP address, when known.
    pub ip_address: Option<String>,
    /// How serious.
    pub severity: Severity,
    /// Human-readable details.
    pub details: String,
    /// Risk from 0 to 1.
    pub risk_score: f64,
    /// Structured details.
    pub metadata: BTreeMap<String, String>,
    /// Server time.
    pub occurred_at: Millis,
}

impl SecurityEvent {
    /// Serialises for backends that store bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::internal_from("security event cannot be serialised", e))
    }

    /// Parses what [`SecurityEvent::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<SecurityEvent> {
        serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored security event is unreadable", e))
    }

    /// Whether the risk makes it suspicious.
    pub fn is_suspicious(&self) -> bool {
        self.risk_score > SUSPICIOUS_RISK
    }
}
