//! The session record every backend stores, its states, and the shard tag that routes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::TokenHash;
use super::fingerprint::Fingerprint;
use crate::clock::Millis;
use crate::crypto;
use crate::error::{Error, Result};

mod binary;

/// How a backend writes records. Every backend reads both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordFormat {
    /// A JSON object: readable by every earlier build.
    #[default]
    Json,
    /// A marker byte and a protobuf message (see `binary`): cheaper to read and smaller, and
    /// unreadable by builds from before it existed.
    Binary,
}

/// First character of a binary record in text form (base64 after it), for the stores whose
/// values are strings. JSON records begin with `{`.
const TEXT_MARKER: u8 = b'~';

/// Lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Usable.
    Active,
    /// A timeout passed.
    Expired,
    /// Revoked through the revocation service.
    Revoked,
    /// Terminated (logout, admin, cap eviction, hijack, refused refresh).
    Terminated,
}

impl SessionState {
    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        self != SessionState::Active
    }
}

/// Upstream tokens, each sealed by the key ring (base64 of the sealed bytes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SealedTokens {
    /// Token type, usually "Bearer".
    pub token_type: String,
    /// Sealed access token.
    pub access: String,
    /// Sealed refresh token.
    pub refresh: Option<String>,
    /// Sealed id token.
    pub id: Option<String>,
}

/// The schema version of the records this build creates.
pub const RECORD_SCHEMA: u32 = 1;

/// A session as every backend stores it. Holds no secret in the clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Schema of the record: [`RECORD_SCHEMA`] for records this build creates, 0 for records
    /// from before the field existed. A record read and rewritten keeps the number it had.
    #[serde(default)]
    pub schema_version: u32,
    /// Public id: `ses_<shard tag>_<uuid>`.
    pub session_id: String,
    /// SHA-256 of the session token (hex in storage).
    #[serde(with = "hex_32")]
    pub token_hash: TokenHash,
    /// Owner.
    pub user_id: String,
    /// Stored state (see [`SessionRecord::effective_state`] for the state at a given time).
    pub state: SessionState,
    /// Creation time.
    #[serde(default)]
    pub created_at: Millis,
    /// Last access written (to the slide step).
    #[serde(default)]
    pub last_accessed_at: Millis,
    /// Idle expiry.
    #[serde(default)]
    pub idle_expires_at: Millis,
    /// Absolute expiry.
    #[serde(default)]
    pub absolute_expires_at: Millis,
    /// Idle timeout in force, in milliseconds.
    #[serde(default)]
    pub idle_timeout_ms: Millis,
    /// Absolute timeout in force, in milliseconds.
    #[serde(default)]
    pub absolute_timeout_ms: Millis,
    /// Upstream access-token expiry.
    #[serde(default)]
    pub token_expires_at: Option<Millis>,
    /// Granted scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Provider name.
    #[serde(default)]
    pub provider: String,
    /// Last known client IP.
    #[serde(default)]
    pub ip_address: Option<String>,
    /// User agent at creation.
    #[serde(default)]
    pub user_agent: Option<String>,
    /// Caller metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Why it ended.
    #[serde(default)]
    pub end_reason: Option<String>,
    /// When it ended.
    #[serde(default)]
    pub ended_at: Option<Millis>,
    /// When the record may be purged.
    #[serde(default)]
    pub retain_until: Millis,
    /// Device fingerprint presented at creation (or set by UpdateSession). Boxed: most
    /// sessions have none, and inline it would triple the size of every record in memory.
    #[serde(default)]
    pub fingerprint: Option<Box<Fingerprint>>,
    /// Sealed upstream tokens.
    #[serde(default)]
    pub tokens: SealedTokens,
    /// Incremented by every compare-and-swap and state change.
    #[serde(default)]
    pub version: u64,
    /// [`crypto::upstream_token_hash`] (hex) of the upstream tokens the session holds and of
    /// those the last rotation replaced (at most six), for IsRevoked and RevokeSession by
    /// upstream token. Records from before the field have none and are found by id or token only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_hashes: Vec<String>,
    /// Successful upstream refreshes.
    #[serde(default)]
    pub refresh_count: u32,
    /// Last successful refresh.
    #[serde(default)]
    pub last_refreshed_at: Option<Millis>,
    /// Fields this build does not know (written by a newer replica), kept as they are so a
    /// rolling deploy never drops them on a rewrite.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

mod hex_32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = hex::decode(text.as_bytes()).map_err(serde::de::Error::custom)?;
        bytes.try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

impl SessionRecord {
    /// The record a compare-and-swap writes over `current` (whose version the caller expected):
    /// this one at the next version, with the identity, state and retention of `current`, which
    /// are not the caller's to change through a swap.
    pub fn swapped_over(&self, current: &SessionRecord) -> SessionRecord {
        SessionRecord {
            version: current.version + 1,
            session_id: current.session_id.clone(),
            user_id: current.user_id.clone(),
            state: current.state,
            retain_until: current.retain_until,
            ..self.clone()
        }
    }

    /// The state at `now`, and the end reason: an active record past a timeout is expired.
    pub fn effective_state(&self, now: Millis) -> (SessionState, Option<&str>) {
        match self.state {
            SessionState::Active if now >= self.absolute_expires_at => {
                (SessionState::Expired, Some("absolute_timeout"))
            }
            SessionState::Active if now >= self.idle_expires_at => (SessionState::Expired, Some("idle_timeout")),
            state => (state, self.end_reason.as_deref()),
        }
    }

    /// When the session ended, as reported at `now`: the recorded end, or for an active record
    /// past a timeout (expired before that is written) its deadline; `None` while it is active.
    pub fn effective_ended_at(&self, now: Millis) -> Option<Millis> {
        match (self.ended_at, self.effective_state(now).0) {
            (Some(at), _) => Some(at),
            (None, SessionState::Expired) => Some(self.deadline()),
            _ => None,
        }
    }

    /// Whether the session is usable at `now`.
    pub fn is_active_at(&self, now: Millis) -> bool {
        self.effective_state(now).0 == SessionState::Active
    }

    /// The instant an active session times out unless it is used before: the earlier of its
    /// idle and absolute expiry.
    pub fn deadline(&self) -> Millis {
        self.idle_expires_at.min(self.absolute_expires_at)
    }

    /// Serialises for backends that store bytes, in `format`.
    pub fn to_bytes(&self, format: RecordFormat) -> Result<Vec<u8>> {
        match format {
            RecordFormat::Json => {
                serde_json::to_vec(self).map_err(|e| Error::internal_from("session record cannot be serialised", e))
            }
            RecordFormat::Binary => binary::encode(self),
        }
    }

    /// Serialises for backends whose values are strings, in `format`: JSON, or `~` and the
    /// base64 of the binary form.
    pub fn to_text(&self, format: RecordFormat) -> Result<String> {
        use base64::Engine as _;
        match format {
            RecordFormat::Json => {
                serde_json::to_string(self).map_err(|e| Error::internal_from("session record cannot be serialised", e))
            }
            RecordFormat::Binary => {
                let bytes = binary::encode(self)?;
                let mut text = String::with_capacity(1 + bytes.len().div_ceil(3) * 4);
                text.push(char::from(TEXT_MARKER));
                base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut text);
                Ok(text)
            }
        }
    }

    /// Parses what [`SessionRecord::to_bytes`] or [`SessionRecord::to_text`] wrote, in
    /// either format: the first byte tells which.
    pub fn from_bytes(bytes: &[u8]) -> Result<SessionRecord> {
        use base64::Engine as _;
        match bytes.split_first() {
            Some((&binary::MARKER, rest)) => binary::decode(rest),
            Some((&TEXT_MARKER, rest)) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .map_err(|_| binary::unreadable("bad base64 after `~`"))?;
                match raw.split_first() {
                    Some((&binary::MARKER, rest)) => binary::decode(rest),
                    _ => Err(binary::unreadable("`~` not followed by a binary record")),
                }
            }
            _ => serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored session is unreadable", e)),
        }
    }
}

/// The four hex digits that route a user's keys to one shard (a Redis Cluster hash tag). They
/// are part of the session token and id so that any key can be found from either.
pub fn shard_tag(user_id: &str) -> String {
    hex::encode(&crypto::sha256(user_id.as_bytes())[..2])
}
