use std::sync::Mutex;

use super::*;
use crate::clock::ManualClock;
use crate::model::RecordFormat;
use crate::store::memory::MemoryStore;

#[derive(Debug, Default)]
struct Recording {
    calls: Mutex<Vec<(String, String)>>,
    deny: bool,
}

#[async_trait::async_trait]
impl LimitGuard for Recording {
    async fn check(&self, rule: &str, key: &str) -> Result<()> {
        self.calls.lock().unwrap().push((rule.to_owned(), key.to_owned()));
        if self.deny {
            return Err(Error::RateLimited { rule: rule.to_owned(), retry_after: Duration::from_secs(300) });
        }
        Ok(())
    }
}

fn manager(guard: Arc<Recording>) -> SessionManager {
    let settings = SessionSettings { ..SessionSettings::default() };
    SessionManager::new(
        Arc::new(MemoryStore::new()),
        Arc::new(KeyRing::new(&[1; 32], &[])),
        Arc::new(ManualClock::new(1_000_000)),
        settings,
    )
    .with_limit_guard(guard)
}

fn new(user: &str) -> NewSession {
    NewSession { user_id: user.into(), access_token: SecretString::from("a".to_string()), ..Default::default() }
}

#[tokio::test]
async fn creation_checks_the_session_create_rule_per_user() {
    let guard = Arc::new(Recording::default());
    let m = manager(guard.clone());
    m.create(new("alice")).await.unwrap();
    assert_eq!(*guard.calls.lock().unwrap(), vec![("session_create".to_string(), "alice".to_string())]);
    // The default guard is a no-op rule that allows every creation.
    let open = SessionManager::new(
        m.store().clone(),
        Arc::new(KeyRing::new(&[1; 32], &[])),
        Arc::new(ManualClock::new(1_000_000)),
        m.settings().clone(),
    );
    for _ in 0..20 {
        open.create(new("bob")).await.unwrap();
    }
}

#[tokio::test]
async fn a_denied_creation_writes_nothing() {
    let guard = Arc::new(Recording { deny: true, ..Default::default() });
    let m = manager(guard);
    let e = m.create(new("mallory")).await.unwrap_err();
    assert!(matches!(e, Error::RateLimited { ref rule, .. } if rule == "session_create"), "{e:?}");
    assert_eq!(m.store().count().await.unwrap(), 0);
}

#[test]
fn tokens_and_ids_carry_the_users_shard_tag() {
    let tag = shard_tag("alice");
    assert_eq!(tag.len(), 4);
    let token = new_session_token(&tag);
    let id = new_session_id(&tag);
    assert_eq!(&token[4..8], tag);
    assert_eq!(&id[4..8], tag);
    // 4 + 4 + 1 + 43: the random part alone is 256 bits.
    assert_eq!(token.len(), 52);
}

#[test]
fn effective_state_expires_at_the_instant() {
    let record = SessionRecord {
        schema_version: RECORD_SCHEMA,
        extra: serde_json::Map::new(),
        session_id: "s".into(),
        token_hash: [0; 32],
        user_id: "u".into(),
        state: SessionState::Active,
        created_at: 0,
        last_accessed_at: 0,
        idle_expires_at: 100,
        absolute_expires_at: 200,
        idle_timeout_ms: 100,
        absolute_timeout_ms: 200,
        token_expires_at: None,
        scopes: vec![],
        provider: String::new(),
        ip_address: None,
        user_agent: None,
        metadata: BTreeMap::new(),
        end_reason: None,
        ended_at: None,
        retain_until: 300,
        fingerprint: None,
        tokens: SealedTokens::default(),
        version: 1,
        upstream_hashes: Vec::new(),
        refresh_count: 0,
        last_refreshed_at: None,
    };
    assert_eq!(record.effective_state(99).0, SessionState::Active);
    assert_eq!(record.effective_state(100), (SessionState::Expired, Some("idle_timeout")));
    let revoked = SessionRecord { state: SessionState::Revoked, end_reason: Some("x".into()), ..record.clone() };
    assert_eq!(revoked.effective_state(1_000), (SessionState::Revoked, Some("x")));
    assert_eq!(record.effective_ended_at(99), None, "active: not ended");
    assert_eq!(record.effective_ended_at(150), Some(100), "expired unwritten: ended at its deadline");
    let past_both = SessionRecord { idle_expires_at: 250, ..record.clone() };
    assert_eq!(past_both.effective_ended_at(300), Some(200), "the earlier of the two timeouts");
    let ended = SessionRecord { ended_at: Some(42), ..revoked.clone() };
    assert_eq!(ended.effective_ended_at(1_000), Some(42), "a written end is reported as written");
    assert_eq!(SessionRecord::from_bytes(&record.to_bytes(RecordFormat::Json).unwrap()).unwrap(), record);
}

/// Issue 16 point 15a: a record a newer replica wrote, with a field this build does not know,
/// keeps that field through a read and rewrite; a record of an older build without the newer
/// fields reads with their defaults.
#[test]
fn records_keep_unknown_fields_and_default_missing_ones() {
    let newer = serde_json::json!({
        "schema_version": 9, "session_id": "s", "token_hash": "00".repeat(32), "user_id": "u",
        "state": "active", "created_at": 1, "last_accessed_at": 1, "idle_expires_at": 100,
        "absolute_expires_at": 200, "idle_timeout_ms": 100, "absolute_timeout_ms": 200,
        "token_expires_at": null, "scopes": [], "provider": "p", "ip_address": null,
        "user_agent": null, "metadata": {}, "end_reason": null, "ended_at": null,
        "retain_until": 300, "fingerprint": null,
        "tokens": {"token_type": "Bearer", "access": "a", "refresh": null, "id": null},
        "version": 4, "refresh_count": 0, "last_refreshed_at": null,
        "future_field": {"kept": [1, 2]}
    });
    let mut record = SessionRecord::from_bytes(&serde_json::to_vec(&newer).unwrap()).unwrap();
    record.version += 1;
    let written: serde_json::Value = serde_json::from_slice(&record.to_bytes(RecordFormat::Json).unwrap()).unwrap();
    assert_eq!(written["future_field"], serde_json::json!({"kept": [1, 2]}), "{written}");
    assert_eq!(written["schema_version"], 9);
    assert_eq!(written["version"], 5);

    // An older record: no schema version, no refresh bookkeeping, no fingerprint.
    let mut older = newer.clone();
    for field in ["schema_version", "refresh_count", "last_refreshed_at", "fingerprint", "future_field"] {
        older.as_object_mut().unwrap().remove(field);
    }
    let record = SessionRecord::from_bytes(&serde_json::to_vec(&older).unwrap()).unwrap();
    assert_eq!((record.schema_version, record.refresh_count, record.fingerprint), (0, 0, None));
    assert!(record.extra.is_empty());
}

#[tokio::test]
async fn refused_validations_count_against_the_clients_network_and_ended_sessions_do_not() {
    let guard = Arc::new(Recording::default());
    let m = manager(guard.clone());
    let from = |ip: &str| RequestContext { ip_address: Some(ip.parse().unwrap()), ..Default::default() };
    let v = m.validate("sa_unknown", &from("2001:db8:1:2::7")).await.unwrap();
    assert!(matches!(v, Validation::Invalid { reason: InvalidReason::NotFound, .. }), "{v:?}");
    let created = m.create(new("alice")).await.unwrap();
    let token = created.token.expose_secret().to_owned();
    m.terminate(&SessionRef::Token(token.clone()), "user_logout").await.unwrap();
    let v = m.validate(&token, &from("192.0.2.1")).await.unwrap();
    assert!(matches!(v, Validation::Invalid { reason: InvalidReason::Terminated, .. }), "{v:?}");
    // Without a client address there is nothing to count against.
    m.validate("sa_unknown", &RequestContext::default()).await.unwrap();
    let calls = guard.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![
            (VALIDATE_FAILURE_RULE.to_string(), "2001:db8:1:2::/64".to_string()),
            (SESSION_CREATE_RULE.to_string(), "alice".to_string()),
        ]
    );

    // Beyond the allowance the caller gets the limiter's error, not the answer.
    let m = manager(Arc::new(Recording { deny: true, ..Default::default() }));
    let e = m.validate("sa_unknown", &from("192.0.2.1")).await.unwrap_err();
    assert!(matches!(e, Error::RateLimited { ref rule, .. } if rule == VALIDATE_FAILURE_RULE), "{e:?}");
}

#[tokio::test]
async fn a_new_session_gets_a_configured_provider_or_invalid_argument() {
    let only = |names: &[&str]| manager(Arc::default()).with_providers(names.iter().map(|n| n.to_string()).collect());
    let with = |provider: &str| NewSession { provider: provider.into(), ..new("alice") };
    // No provider named and exactly one configured: that one.
    let created = only(&["acme"]).create(with("")).await.unwrap();
    assert_eq!(created.session.provider, "acme");
    // The default provider is the empty name.
    let created = only(&[DEFAULT_PROVIDER]).create(with("")).await.unwrap();
    assert_eq!(created.session.provider, "");
    let created = only(&["acme", "other"]).create(with("other")).await.unwrap();
    assert_eq!(created.session.provider, "other");
    let m = only(&["acme", "other"]);
    let e = m.create(with("nope")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "provider"), "{e:?}");
    assert!(e.to_string().contains("acme, other"), "{e}");
    assert_eq!(m.store().count().await.unwrap(), 0, "a refused creation writes nothing");
    let e = only(&[]).create(with("acme")).await.unwrap_err();
    assert!(e.to_string().contains("configured: none"), "{e}");
    // A manager that was told nothing about providers takes any name (the token work decides).
    assert_eq!(manager(Arc::default()).create(with("any")).await.unwrap().session.provider, "any");
}
