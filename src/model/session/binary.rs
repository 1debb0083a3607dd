//! The binary form of a [`SessionRecord`]: one marker byte, then a protobuf message.
//!
//! JSON records begin with `{`; a binary one begins with [`MARKER`], so a reader tells the two
//! apart by the first byte and reads both. The message is declared here with prost's derive
//! (it is a storage format, not part of the API; its field numbers must never be reused).
//!
//! Fields this build does not know survive a read and a rewrite either way: the top-level
//! fields of a binary record that no [`StoredRecord`] member claims are kept as their raw bytes
//! in `extra` (under [`UNKNOWN_KEY`], base64) and appended unchanged when the record is written
//! in binary again, and the unknown members of a JSON record travel as JSON text in
//! `extra_json`.

use std::collections::BTreeMap;

use base64::Engine as _;
use prost::Message as _;
use prost::bytes::Buf as _;

use super::{SealedTokens, SessionRecord, SessionState};
use crate::error::{Error, Result};
use crate::model::fingerprint::Fingerprint;

/// First byte of a binary record (JSON records begin with `{`).
pub(super) const MARKER: u8 = 0xB1;

/// The key of `extra` that holds a binary record's unknown fields (base64 of their raw
/// protobuf encoding). It is not a JSON member name any build writes.
pub(super) const UNKNOWN_KEY: &str = "$binary_unknown";

/// Highest field number of [`StoredRecord`]; any other number is a newer build's.
const LAST_FIELD: u32 = 27;

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredRecord {
    #[prost(uint32, tag = "1")]
    schema_version: u32,
    #[prost(string, tag = "2")]
    session_id: String,
    #[prost(bytes = "vec", tag = "3")]
    token_hash: Vec<u8>,
    #[prost(string, tag = "4")]
    user_id: String,
    /// 0 active, 1 expired, 2 revoked, 3 terminated.
    #[prost(uint32, tag = "5")]
    state: u32,
    #[prost(int64, tag = "6")]
    created_at: i64,
    #[prost(int64, tag = "7")]
    last_accessed_at: i64,
    #[prost(int64, tag = "8")]
    idle_expires_at: i64,
    #[prost(int64, tag = "9")]
    absolute_expires_at: i64,
    #[prost(int64, tag = "10")]
    idle_timeout_ms: i64,
    #[prost(int64, tag = "11")]
    absolute_timeout_ms: i64,
    #[prost(int64, optional, tag = "12")]
    token_expires_at: Option<i64>,
    #[prost(string, repeated, tag = "13")]
    scopes: Vec<String>,
    #[prost(string, tag = "14")]
    provider: String,
    #[prost(string, optional, tag = "15")]
    ip_address: Option<String>,
    #[prost(string, optional, tag = "16")]
    user_agent: Option<String>,
    #[prost(btree_map = "string, string", tag = "17")]
    metadata: BTreeMap<String, String>,
    #[prost(string, optional, tag = "18")]
    end_reason: Option<String>,
    #[prost(int64, optional, tag = "19")]
    ended_at: Option<i64>,
    #[prost(int64, tag = "20")]
    retain_until: i64,
    #[prost(message, optional, tag = "21")]
    fingerprint: Option<StoredFingerprint>,
    #[prost(message, optional, tag = "22")]
    tokens: Option<StoredTokens>,
    #[prost(uint64, tag = "23")]
    version: u64,
    #[prost(string, repeated, tag = "24")]
    upstream_hashes: Vec<String>,
    #[prost(uint32, tag = "25")]
    refresh_count: u32,
    #[prost(int64, optional, tag = "26")]
    last_refreshed_at: Option<i64>,
    /// The unknown members of a record first written as JSON (a JSON object), if any.
    #[prost(bytes = "vec", tag = "27")]
    extra_json: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredTokens {
    #[prost(string, tag = "1")]
    token_type: String,
    #[prost(string, tag = "2")]
    access: String,
    #[prost(string, optional, tag = "3")]
    refresh: Option<String>,
    #[prost(string, optional, tag = "4")]
    id: Option<String>,
}

/// A [`Fingerprint`], field for field. Its own unknown fields are not kept: a fingerprint is
/// replaced whole (UpdateSession), never merged.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredFingerprint {
    #[prost(string, optional, tag = "1")]
    user_agent: Option<String>,
    #[prost(string, optional, tag = "2")]
    accept_language: Option<String>,
    #[prost(string, optional, tag = "3")]
    platform: Option<String>,
    #[prost(string, optional, tag = "4")]
    timezone: Option<String>,
    #[prost(string, optional, tag = "5")]
    screen_resolution: Option<String>,
    #[prost(int32, optional, tag = "6")]
    color_depth: Option<i32>,
    #[prost(double, optional, tag = "7")]
    pixel_ratio: Option<f64>,
    #[prost(bool, optional, tag = "8")]
    touch_support: Option<bool>,
    #[prost(int32, optional, tag = "9")]
    device_memory: Option<i32>,
    #[prost(int32, optional, tag = "10")]
    hardware_concurrency: Option<i32>,
    #[prost(string, optional, tag = "11")]
    canvas_fingerprint: Option<String>,
    #[prost(string, optional, tag = "12")]
    webgl_fingerprint: Option<String>,
    #[prost(string, optional, tag = "13")]
    audio_fingerprint: Option<String>,
    #[prost(string, repeated, tag = "14")]
    fonts: Vec<String>,
    #[prost(string, repeated, tag = "15")]
    plugins: Vec<String>,
    #[prost(btree_map = "string, string", tag = "16")]
    extras: BTreeMap<String, String>,
}

fn state_number(state: SessionState) -> u32 {
    match state {
        SessionState::Active => 0,
        SessionState::Expired => 1,
        SessionState::Revoked => 2,
        SessionState::Terminated => 3,
    }
}

/// The error of a stored record that cannot be read, saying what is wrong with it.
pub(super) fn unreadable(what: &str) -> Error {
    Error::internal(format!("stored session is unreadable: {what}"))
}

/// The binary form of `record`.
pub(super) fn encode(record: &SessionRecord) -> Result<Vec<u8>> {
    let mut extra = record.extra.clone();
    let unknown = match extra.remove(UNKNOWN_KEY) {
        Some(serde_json::Value::String(text)) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| unreadable("the kept unknown fields are not base64"))?,
        Some(_) => return Err(unreadable("the kept unknown fields are not a string")),
        None => Vec::new(),
    };
    let extra_json = if extra.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&extra).map_err(|e| Error::internal_from("session record cannot be serialised", e))?
    };
    let stored = StoredRecord {
        schema_version: record.schema_version,
        session_id: record.session_id.clone(),
        token_hash: record.token_hash.to_vec(),
        user_id: record.user_id.clone(),
        state: state_number(record.state),
        created_at: record.created_at,
        last_accessed_at: record.last_accessed_at,
        idle_expires_at: record.idle_expires_at,
        absolute_expires_at: record.absolute_expires_at,
        idle_timeout_ms: record.idle_timeout_ms,
        absolute_timeout_ms: record.absolute_timeout_ms,
        token_expires_at: record.token_expires_at,
        scopes: record.scopes.clone(),
        provider: record.provider.clone(),
        ip_address: record.ip_address.clone(),
        user_agent: record.user_agent.clone(),
        metadata: record.metadata.clone(),
        end_reason: record.end_reason.clone(),
        ended_at: record.ended_at,
        retain_until: record.retain_until,
        fingerprint: record.fingerprint.as_deref().map(|f| StoredFingerprint {
            user_agent: f.user_agent.clone(),
            accept_language: f.accept_language.clone(),
            platform: f.platform.clone(),
            timezone: f.timezone.clone(),
            screen_resolution: f.screen_resolution.clone(),
            color_depth: f.color_depth,
            pixel_ratio: f.pixel_ratio,
            touch_support: f.touch_support,
            device_memory: f.device_memory,
            hardware_concurrency: f.hardware_concurrency,
            canvas_fingerprint: f.canvas_fingerprint.clone(),
            webgl_fingerprint: f.webgl_fingerprint.clone(),
            audio_fingerprint: f.audio_fingerprint.clone(),
            fonts: f.fonts.iter().cloned().collect(),
            plugins: f.plugins.iter().cloned().collect(),
            extras: f.extras.clone(),
        }),
        tokens: Some(StoredTokens {
            token_type: record.tokens.token_type.clone(),
            access: record.tokens.access.clone(),
            refresh: record.tokens.refresh.clone(),
            id: record.tokens.id.clone(),
        }),
        version: record.version,
        upstream_hashes: record.upstream_hashes.clone(),
        refresh_count: record.refresh_count,
        last_refreshed_at: record.last_refreshed_at,
        extra_json,
    };
    let mut out = Vec::with_capacity(1 + stored.encoded_len() + unknown.len());
    out.push(MARKER);
    stored.encode(&mut out).map_err(|e| Error::internal_from("session record cannot be serialised", e))?;
    // Protobuf fields may come in any order: the unknown ones after the known ones read back
    // the same, by this build and by the newer one that wrote them.
    out.extend_from_slice(&unknown);
    Ok(out)
}

/// Reads what [`encode`] wrote (`bytes` without the marker byte).
pub(super) fn decode(bytes: &[u8]) -> Result<SessionRecord> {
    let stored = StoredRecord::decode(bytes).map_err(|e| unreadable(&format!("bad binary record: {e}")))?;
    let token_hash = stored.token_hash.try_into().map_err(|_| unreadable("the token hash is not 32 bytes"))?;
    let state = match stored.state {
        0 => SessionState::Active,
        1 => SessionState::Expired,
        2 => SessionState::Revoked,
        3 => SessionState::Terminated,
        n => return Err(unreadable(&format!("unknown state {n}"))),
    };
    let mut extra = if stored.extra_json.is_empty() {
        serde_json::Map::new()
    } else {
        serde_json::from_slice(&stored.extra_json).map_err(|_| unreadable("the kept JSON members are not an object"))?
    };
    let unknown = unknown_fields(bytes)?;
    if !unknown.is_empty() {
        let text = base64::engine::general_purpose::STANDARD.encode(unknown);
        extra.insert(UNKNOWN_KEY.to_owned(), serde_json::Value::String(text));
    }
    let tokens = stored.tokens.unwrap_or_default();
    Ok(SessionRecord {
        schema_version: stored.schema_version,
        session_id: stored.session_id,
        token_hash,
        user_id: stored.user_id,
        state,
        created_at: stored.created_at,
        last_accessed_at: stored.last_accessed_at,
        idle_expires_at: stored.idle_expires_at,
        absolute_expires_at: stored.absolute_expires_at,
        idle_timeout_ms: stored.idle_timeout_ms,
        absolute_timeout_ms: stored.absolute_timeout_ms,
        token_expires_at: stored.token_expires_at,
        scopes: stored.scopes,
        provider: stored.provider,
        ip_address: stored.ip_address,
        user_agent: stored.user_agent,
        metadata: stored.metadata,
        end_reason: stored.end_reason,
        ended_at: stored.ended_at,
        retain_until: stored.retain_until,
        fingerprint: stored.fingerprint.map(|f| {
            Box::new(Fingerprint {
                user_agent: f.user_agent,
                accept_language: f.accept_language,
                platform: f.platform,
                timezone: f.timezone,
                screen_resolution: f.screen_resolution,
                color_depth: f.color_depth,
                pixel_ratio: f.pixel_ratio,
                touch_support: f.touch_support,
                device_memory: f.device_memory,
                hardware_concurrency: f.hardware_concurrency,
                canvas_fingerprint: f.canvas_fingerprint,
                webgl_fingerprint: f.webgl_fingerprint,
                audio_fingerprint: f.audio_fingerprint,
                fonts: f.fonts.into_iter().collect(),
                plugins: f.plugins.into_iter().collect(),
                extras: f.extras,
            })
        }),
        tokens: SealedTokens {
            token_type: tokens.token_type,
            access: tokens.access,
            refresh: tokens.refresh,
            id: tokens.id,
        },
        version: stored.version,
        upstream_hashes: stored.upstream_hashes,
        refresh_count: stored.refresh_count,
        last_refreshed_at: stored.last_refreshed_at,
        extra,
    })
}

/// The raw bytes of every top-level field of `bytes` whose number [`StoredRecord`] does not
/// have, in their order. Most records have none, and then nothing is copied.
fn unknown_fields(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut unknown = Vec::new();
    let mut buf = bytes;
    while buf.has_remaining() {
        let start = bytes.len() - buf.remaining();
        let (tag, wire_type) =
            prost::encoding::decode_key(&mut buf).map_err(|e| unreadable(&format!("bad binary record: {e}")))?;
        prost::encoding::skip_field(wire_type, tag, &mut buf, prost::encoding::DecodeContext::default())
            .map_err(|e| unreadable(&format!("bad binary record: {e}")))?;
        if tag > LAST_FIELD {
            unknown.extend_from_slice(&bytes[start..bytes.len() - buf.remaining()]);
        }
    }
    Ok(unknown)
}

#[cfg(test)]
mod tests {
    use super::super::RecordFormat;
    use super::*;

    fn full() -> SessionRecord {
        let json = serde_json::json!({
            "schema_version": 1, "session_id": "ses_ab12_x", "token_hash": "07".repeat(32), "user_id": "u",
            "state": "revoked", "created_at": 1, "last_accessed_at": 2, "idle_expires_at": 100,
            "absolute_expires_at": 200, "idle_timeout_ms": 100, "absolute_timeout_ms": 200,
            "token_expires_at": 150, "scopes": ["a", "b"], "provider": "p", "ip_address": "10.0.0.1",
            "user_agent": "ua", "metadata": {"k": "v"}, "end_reason": "r", "ended_at": 5,
            "retain_until": 300, "fingerprint": {"user_agent": "ua", "pixel_ratio": 2.5, "touch_support": false,
            "color_depth": 24, "fonts": ["x", "y"], "extras": {"e": "1"}},
            "tokens": {"token_type": "Bearer", "access": "a", "refresh": "r", "id": null},
            "version": 4, "upstream_hashes": ["h1"], "refresh_count": 3, "last_refreshed_at": 9,
            "future_field": {"kept": [1, 2]}
        });
        SessionRecord::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap()
    }

    #[test]
    fn every_field_reads_back_in_both_forms_and_json_unknowns_are_kept() {
        let record = full();
        assert!(record.extra.contains_key("future_field"));
        for format in [RecordFormat::Json, RecordFormat::Binary] {
            let bytes = record.to_bytes(format).unwrap();
            assert_eq!(SessionRecord::from_bytes(&bytes).unwrap(), record, "{format:?}");
            let text = record.to_text(format).unwrap();
            assert_eq!(SessionRecord::from_bytes(text.as_bytes()).unwrap(), record, "{format:?} text");
        }
        assert!(
            record.to_bytes(RecordFormat::Binary).unwrap().len() < record.to_bytes(RecordFormat::Json).unwrap().len()
        );
    }

    #[test]
    fn fields_of_a_newer_binary_record_survive_a_rewrite_in_either_form() {
        let mut bytes = full().to_bytes(RecordFormat::Binary).unwrap();
        // Field 40, length-delimited, "new": what a newer build might add.
        let newer = [0xC2, 0x02, 0x03, b'n', b'e', b'w'];
        bytes.extend_from_slice(&newer);
        let read = SessionRecord::from_bytes(&bytes).unwrap();
        assert!(read.extra.contains_key(UNKNOWN_KEY));
        assert!(read.to_bytes(RecordFormat::Binary).unwrap().ends_with(&newer));
        let via_json = SessionRecord::from_bytes(&read.to_bytes(RecordFormat::Json).unwrap()).unwrap();
        assert!(via_json.to_bytes(RecordFormat::Binary).unwrap().ends_with(&newer));
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let good = full().to_bytes(RecordFormat::Binary).unwrap();
        for bad in [&[MARKER][..], &[MARKER, 0xFF], &good[..good.len() / 2], b"~!!", b"~AAAA", b"", b"{"] {
            let e = SessionRecord::from_bytes(bad);
            assert!(matches!(e, Err(Error::Internal { .. })), "{bad:?}: {e:?}");
        }
    }
}
