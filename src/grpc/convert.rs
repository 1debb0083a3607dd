//! Conversions between proto messages and domain types, so that domain modules never see proto.

use std::time::Duration;

use crate::clock::Millis;
use crate::grpc::pb;
use crate::security::events::{EventType, SecurityEvent, Severity, Summary};
use crate::session::{Fingerprint, SessionRecord, SessionState};

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(at: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.div_euclid(1000), nanos: (at.rem_euclid(1000) * 1_000_000) as i32 }
}

/// A protobuf timestamp as milliseconds since the epoch.
pub fn millis(ts: &prost_types::Timestamp) -> Millis {
    ts.seconds.saturating_mul(1000).saturating_add(i64::from(ts.nanos) / 1_000_000)
}

/// A duration as protobuf.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// A proto fingerprint as the domain's (already validated).
pub fn fingerprint(fp: &pb::DeviceFingerprint) -> Fingerprint {
    Fingerprint {
        user_agent: non_empty(&fp.user_agent),
        accept_language: non_empty(&fp.accept_language),
        platform: non_empty(&fp.platform),
        timezone: non_empty(&fp.timezone),
        screen_resolution: non_empty(&fp.screen_resolution),
        color_depth: fp.color_depth,
        pixel_ratio: fp.pixel_ratio,
        touch_support: fp.touch_support,
        device_memory: fp.device_memory,
        hardware_concurrency: fp.hardware_concurrency,
        canvas_fingerprint: non_empty(&fp.canvas_fingerprint),
        webgl_fingerprint: non_empty(&fp.webgl_fingerprint),
        audio_fingerprint: non_empty(&fp.audio_fingerprint),
        fonts: fp.fonts.iter().filter(|f| !f.is_empty()).cloned().collect(),
        plugins: fp.plugins.iter().filter(|p| !p.is_empty()).cloned().collect(),
        extras: fp.extras.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// A domain state as proto.
pub fn state(state: SessionState) -> pb::SessionState {
    match state {
        SessionState::Active => pb::SessionState::Active,
        SessionState::Expired => pb::SessionState::Expired,
        SessionState::Revoked => pb::SessionState::Revoked,
        SessionState::Terminated => pb::SessionState::Terminated,
    }
}

/// A proto state filter as the domain's; UNSPECIFIED and unknown values are dropped.
pub fn state_filter(states: &[i32]) -> Vec<SessionState> {
    states
        .iter()
        .filter_map(|s| match pb::SessionState::try_from(*s) {
            Ok(pb::SessionState::Active) => Some(SessionState::Active),
            Ok(pb::SessionState::Expired) => Some(SessionState::Expired),
            Ok(pb::SessionState::Revoked) => Some(SessionState::Revoked),
            Ok(pb::SessionState::Terminated) => Some(SessionState::Terminated),
            _ => None,
        })
        .collect()
}

/// A session as the contract reports it at `now`: its effective state (a session past a
/// timeout is reported expired even before that is written), and never a token.
pub fn session(record: &SessionRecord, now: Millis) -> pb::Session {
    let (effective, reason) = record.effective_state(now);
    let ended_at = record.effective_ended_at(now);
    pb::Session {
        session_id: record.session_id.clone(),
        user_id: record.user_id.clone(),
        state: state(effective) as i32,
        created_at: Some(timestamp(record.created_at)),
        last_accessed_at: Some(timestamp(record.last_accessed_at)),
        idle_expires_at: Some(timestamp(record.idle_expires_at)),
        absolute_expires_at: Some(timestamp(record.absolute_expires_at)),
        token_expires_at: record.token_expires_at.map(timestamp),
        scopes: record.scopes.clone(),
        provider: record.provider.clone(),
        ip_address: record.ip_address.clone().unwrap_or_default(),
        user_agent: record.user_agent.clone().unwrap_or_default(),
        metadata: record.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        end_reason: reason.unwrap_or_default().to_owned(),
        ended_at: ended_at.map(timestamp),
        idle_timeout: Some(duration(Duration::from_millis(record.idle_timeout_ms.max(0) as u64))),
        absolute_timeout: Some(duration(Duration::from_millis(record.absolute_timeout_ms.max(0) as u64))),
        has_refresh_token: record.tokens.refresh.is_some(),
        refresh_count: record.refresh_count,
        last_refreshed_at: record.last_refreshed_at.map(timestamp),
        has_device_fingerprint: record.fingerprint.is_some(),
    }
}

/// A proto event type as the domain's; UNSPECIFIED and unknown values are `None`.
pub fn event_type(value: i32) -> Option<EventType> {
    let index = usize::try_from(value).ok()?.checked_sub(1)?;
    EventType::ALL.get(index).copied()
}

/// A domain event type as the proto enum value.
pub fn event_type_value(event_type: EventType) -> i32 {
    // ALL is in the contract's order, numbered from 1.
    EventType::ALL.iter().position(|t| *t == event_type).map_or(0, |i| i as i32 + 1)
}

fn severity(severity: Severity) -> pb::Severity {
    match severity {
        Severity::Info => pb::Severity::Info,
        Severity::Warning => pb::Severity::Warning,
        Severity::Critical => pb::Severity::Critical,
    }
}

/// A security event as proto.
pub fn security_event(event: &SecurityEvent) -> pb::SecurityEvent {
    pb::SecurityEvent {
        event_id: event.event_id.clone(),
        event_type: event_type_value(event.event_type),
        user_id: event.user_id.clone().unwrap_or_default(),
        session_id: event.session_id.clone().unwrap_or_default(),
        ip_address: event.ip_address.clone().unwrap_or_default(),
        severity: severity(event.severity) as i32,
        details: event.details.clone(),
        risk_score: event.risk_score,
        metadata: event.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        occurred_at: Some(timestamp(event.occurred_at)),
    }
}

/// A summary as proto.
pub fn summary(s: &Summary) -> pb::GetSecuritySummaryResponse {
    pb::GetSecuritySummaryResponse {
        user_id: s.user_id.clone(),
        period_hours: s.period_hours,
        total_events: s.total_events,
        suspicious_events: s.suspicious_events,
        counts: s
            .counts
            .iter()
            .map(|(t, count)| pb::EventTypeCount { event_type: event_type_value(*t), count: *count })
            .collect(),
        active_sessions: s.active_sessions,
        suspicious_sessions: s.suspicious_sessions,
        rate_limit_hits: s.rate_limit_hits,
        distinct_ips: s.distinct_ips,
        last_login_at: s.last_login_at.map(timestamp),
        successful_logins: s.successful_logins,
        failed_logins: s.failed_logins,
        average_risk_score: s.average_risk_score,
        recent_events: s.recent_events.iter().map(security_event).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_match_the_proto_enum_by_name() {
        for t in EventType::ALL {
            let value = event_type_value(t);
            let proto = pb::SecurityEventType::try_from(value).unwrap();
            assert_eq!(proto.as_str_name(), format!("SECURITY_EVENT_TYPE_{}", t.as_str().to_uppercase()));
            assert_eq!(event_type(value), Some(t));
        }
        assert_eq!(event_type(0), None);
        assert_eq!(event_type(22), None);
        assert_eq!(event_type(-1), None);
    }

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for at in [0, 1, 999, 1_000, 1_764_000_000_123, -1, -1_001] {
            let ts = timestamp(at);
            assert!((0..1_000_000_000).contains(&ts.nanos));
            assert_eq!(millis(&ts), at);
        }
    }
}

/// A request's `oneof selector { session_token, session_id }`, as its two parts (at most one
/// set), so that each adapter reads it the same way.
pub(crate) trait SessionSelector {
    /// `(session_token, session_id)`.
    fn parts(&self) -> (Option<&String>, Option<&String>);
}

macro_rules! session_selectors {
    ($($request:ident),* $(,)?) => {
        $(
            impl SessionSelector for pb::$request::Selector {
                fn parts(&self) -> (Option<&String>, Option<&String>) {
                    match self {
                        Self::SessionToken(token) => (Some(token), None),
                        Self::SessionId(id) => (None, Some(id)),
                    }
                }
            }
        )*
    };
}

session_selectors!(
    get_session_request,
    update_session_request,
    terminate_session_request,
    detect_hijacking_request,
    get_access_token_request,
    refresh_session_request,
);

impl<S: SessionSelector> SessionSelector for Option<S> {
    fn parts(&self) -> (Option<&String>, Option<&String>) {
        self.as_ref().map_or((None, None), S::parts)
    }
}
