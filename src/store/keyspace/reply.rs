//! Decoding replies into records, events and limiter states, and encoding values for scripts.

use super::*;

pub(super) fn malformed(what: &str) -> Error {
    Error::internal(format!("stored session is unreadable: {what}"))
}

pub(super) fn text(reply: &Reply) -> Result<&str> {
    match reply {
        Reply::Data(bytes) => std::str::from_utf8(bytes).map_err(|_| malformed("a field is not UTF-8")),
        other => Err(malformed(&format!("expected a string, got {other:?}"))),
    }
}

pub(super) fn integer(reply: &Reply) -> Result<i64> {
    match reply {
        Reply::Int(n) => Ok(*n),
        Reply::Data(_) => text(reply)?.parse().map_err(|_| malformed("expected an integer")),
        other => Err(malformed(&format!("expected an integer, got {other:?}"))),
    }
}

pub(super) fn items(reply: Reply) -> Result<Vec<Reply>> {
    match reply {
        Reply::Array(items) => Ok(items),
        Reply::Nil => Ok(Vec::new()),
        other => Err(malformed(&format!("expected an array, got {other:?}"))),
    }
}

/// A record from an HGETALL reply; an empty reply is `None`. The `doc` is decoded straight into
/// the record (one pass, no intermediate JSON tree), then each field beside it overrides the
/// same-named member (the fields scripts change without re-encoding `doc`).
pub(super) fn record(reply: Reply) -> Result<Option<SessionRecord>> {
    let items = items(reply)?;
    if items.is_empty() {
        return Ok(None);
    }
    let doc_at = items.chunks(2).position(|pair| matches!(&pair[0], Reply::Data(name) if name == b"doc"));
    let doc = doc_at.and_then(|i| items.get(2 * i + 1)).ok_or_else(|| malformed("no `doc` field"))?;
    let mut record: SessionRecord = match doc {
        Reply::Data(bytes) => SessionRecord::from_bytes(bytes)?,
        _ => return Err(malformed("`doc` is not a string")),
    };
    for pair in items.chunks(2) {
        let [name, value] = pair else { return Err(malformed("odd number of hash items")) };
        override_field(&mut record, text(name)?, value)?;
    }
    Ok(Some(record))
}

/// Sets the member `name` of `record` from the hash field of that name; other fields (`doc`,
/// anything a newer version added) change nothing.
fn override_field(record: &mut SessionRecord, name: &str, value: &Reply) -> Result<()> {
    match name {
        "session_id" => record.session_id = text(value)?.to_owned(),
        "user_id" => record.user_id = text(value)?.to_owned(),
        "state" => {
            use serde::de::IntoDeserializer as _;
            let state: std::result::Result<SessionState, serde::de::value::Error> =
                serde::Deserialize::deserialize(text(value)?.into_deserializer());
            record.state = state.map_err(|e| malformed(&e.to_string()))?;
        }
        "version" => record.version = u64::try_from(integer(value)?).map_err(|_| malformed("negative version"))?,
        "created_at" => record.created_at = integer(value)?,
        "absolute_expires_at" => record.absolute_expires_at = integer(value)?,
        "idle_expires_at" => record.idle_expires_at = integer(value)?,
        "last_accessed_at" => record.last_accessed_at = integer(value)?,
        "retain_until" => record.retain_until = integer(value)?,
        "ip_address" => record.ip_address = Some(text(value)?.to_owned()),
        "end_reason" => record.end_reason = Some(text(value)?.to_owned()),
        "ended_at" => record.ended_at = Some(integer(value)?),
        _ => {}
    }
    Ok(())
}

pub(super) fn required(reply: Reply) -> Result<SessionRecord> {
    record(reply)?.ok_or_else(|| malformed("empty record"))
}

/// A script's `{code, ...}` reply.
/// The end (or eviction) was refused, with nothing written, because its revocation event could
/// not be appended to `key`: a session never ends without its event.
pub(super) fn log_unwritable(key: &str) -> Error {
    Error::FailedPrecondition(format!(
        "the session was not ended: its revocation event cannot be appended, because the Redis key \
         {key} holds a value of another type (or a sequence number the log has passed); an operator \
         must delete or repair that key (nothing else may write under the key prefix), then retry"
    ))
}

pub(super) fn coded(reply: Reply) -> Result<(i64, Vec<Reply>)> {
    let mut items = items(reply)?.into_iter();
    let code = integer(&items.next().ok_or_else(|| malformed("empty script reply"))?)?;
    Ok((code, items.collect()))
}

/// How many purge scripts run at once.
pub(super) const PURGE_CONCURRENCY: usize = 16;

pub(super) fn unsigned(reply: &Reply) -> Result<u64> {
    u64::try_from(integer(reply)?).map_err(|_| malformed("negative number"))
}

pub(super) fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stream entry `[id, [field, value, ...]]`.
pub(super) fn stream_entry(reply: Reply) -> Result<(String, std::collections::HashMap<String, String>)> {
    let mut parts = items(reply)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else { return Err(malformed("stream entry")) };
    let id = text(&id)?.to_owned();
    let mut map = std::collections::HashMap::new();
    for pair in items(fields)?.chunks(2) {
        let [name, value] = pair else { return Err(malformed("odd stream entry fields")) };
        map.insert(text(name)?.to_owned(), text(value)?.to_owned());
    }
    Ok((id, map))
}

pub(super) fn kind_from(name: &str) -> Result<RevocationKind> {
    [
        RevocationKind::Revoked,
        RevocationKind::Terminated,
        RevocationKind::Evicted,
        RevocationKind::Hijack,
        RevocationKind::RefreshFailed,
    ]
    .into_iter()
    .find(|kind| kind.as_str() == name)
    .ok_or_else(|| malformed("unknown revocation kind"))
}

/// `revoked_by` as a stream field: `-` for none, `+<name>` for a name.
pub(super) fn encode_by(by: Option<&str>) -> String {
    by.map_or_else(|| "-".to_owned(), |by| format!("+{by}"))
}

/// A log event from a stream entry whose id is `<seq>-0`.
pub(super) fn log_event(reply: Reply) -> Result<RevocationEvent> {
    let (id, mut fields) = stream_entry(reply)?;
    let seq = id.strip_suffix("-0").and_then(|n| n.parse().ok()).ok_or_else(|| malformed("log entry id"))?;
    let mut take = |name: &str| fields.remove(name).ok_or_else(|| malformed("log entry field"));
    let number = |value: String| value.parse::<Millis>().map_err(|_| malformed("log entry number"));
    Ok(RevocationEvent {
        seq,
        session_id: take("sid")?,
        user_id: take("uid")?,
        kind: kind_from(&take("kind")?)?,
        reason: take("reason")?,
        revoked_by: take("by")?.strip_prefix('+').map(str::to_owned),
        revoked_at: number(take("at")?)?,
        expires_at: number(take("exp")?)?,
    })
}

/// The hash field of a rate-limit state: the rule's name, length-prefixed, then the key.
pub(super) fn limit_field(rule: &str, key: &str) -> String {
    format!("{}:{rule}{key}", rule.len())
}

pub(super) fn encode_limit(state: &LimiterState) -> String {
    format!("{}:{}:{}:{}", state.tat_us, state.violations, state.last_violation_ms, state.blocked_until_ms)
}

pub(super) fn decode_limit(value: &str) -> Result<LimiterState> {
    let bad = || Error::internal("stored rate-limit state is unreadable");
    let mut parts = value.split(':');
    let mut next = || parts.next().ok_or_else(bad);
    let state = LimiterState {
        tat_us: next()?.parse().map_err(|_| bad())?,
        violations: next()?.parse().map_err(|_| bad())?,
        last_violation_ms: next()?.parse().map_err(|_| bad())?,
        blocked_until_ms: next()?.parse().map_err(|_| bad())?,
    };
    Ok(state)
}

/// The time-index member of a security event: `u|<tag>|<user hex>|<id>` or `n|<id>`.
pub(super) fn event_member(event: &SecurityEvent) -> String {
    match &event.user_id {
        Some(user) => format!("u|{}|{}|{}", shard_tag(user), hex::encode(user), event.event_id),
        None => format!("n|{}", event.event_id),
    }
}
