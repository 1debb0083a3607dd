//! TokenService against a real OpenID Connect provider (`tests/peers/oidc`, npm `oidc-provider`
//! with refresh-token rotation, introspection and revocation) on loopback: the real binary for
//! most tests; two `App`s in one process over one shared `MemoryStore` for the cross-replica
//! single-flight test (two processes cannot share the embedded store).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use session_authority::clock::{Millis, SystemClock};
use session_authority::config::{Config, Flags};
use session_authority::grpc::pb;
use session_authority::grpc::pb::get_access_token_request::Selector as AccessSelector;
use session_authority::grpc::pb::refresh_session_request::Selector as RefreshSelector;
use session_authority::store::memory::MemoryStore;
use session_authority::store::{LeaseOutcome, Stores, TokenStore};
use session_authority::token::{RefreshLease, RefreshRecord};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::oidc::{Oidc, Tokens};
use crate::support::{ADMIN_KEY, Auth, Process, SERVICE_KEY, Spawn, WATCHER_KEY, api_keys_env};

fn sha256_hex(text: &str) -> String {
    session_authority::crypto::sha256_hex(text)
}

/// The binary configured for `oidc` as its default provider (through OpenID discovery), with
/// quick retries.
fn spawn_for(oidc: &Oidc) -> Spawn {
    Spawn::default()
        .without_create_limit()
        .env("SESSION_AUTHORITY_TOKEN_ISSUER", &oidc.issuer)
        .env("OAUTH_CLIENT_ID", &oidc.client_id)
        .env("OAUTH_CLIENT_SECRET", &oidc.client_secret)
        .env("SESSION_AUTHORITY_TOKEN_PROACTIVE_REFRESH", "5m")
        .env("SESSION_AUTHORITY_TOKEN_RETRY_INITIAL_DELAY", "20ms")
        .env("SESSION_AUTHORITY_TOKEN_RETRY_MAX_DELAY", "100ms")
        .env("SESSION_AUTHORITY_TOKEN_REQUEST_TIMEOUT", "700ms")
}

fn create(user: &str, tokens: &Tokens, provider: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user.into(),
        access_token: tokens.access_token.clone(),
        refresh_token: tokens.refresh_token.clone(),
        id_token: tokens.id_token.clone(),
        token_type: "Bearer".into(),
        expires_in: Some(prost_types::Duration { seconds: tokens.expires_in, nanos: 0 }),
        scopes: tokens.scope.split(' ').map(str::to_owned).collect(),
        provider: provider.into(),
        ..Default::default()
    }
}

fn by_token(token: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest { selector: Some(AccessSelector::SessionToken(token.into())) }
}

fn force(token: &str) -> pb::RefreshSessionRequest {
    pb::RefreshSessionRequest {
        selector: Some(RefreshSelector::SessionToken(token.into())),
        force: true,
        reason: String::new(),
    }
}

async fn valid(server: &Process, token: &str) -> pb::ValidateSessionResponse {
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    sessions
        .validate_session(pb::ValidateSessionRequest { session_token: token.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_refresh_and_named_providers() {
    let oidc = Oidc::start(60);
    // A second provider over the same issuer, authenticating with client_secret_post.
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[token.providers.second]\nissuer = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nclient_auth = \"client_secret_post\"\n",
            oidc.issuer, oidc.client_id, oidc.client_secret
        ),
    )
    .unwrap();
    let server = spawn_for(&oidc).env("SESSION_AUTHORITY_CONFIG", config.to_str().unwrap()).start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;

    // The access token lives 60 s, the proactive window is 5 min: the first call refreshes.
    let login = oidc.tokens("alice").await;
    let created = sessions.create_session(create("alice", &login, "")).await.unwrap().into_inner();
    let first = tokens.get_access_token(by_token(&created.session_token)).await.unwrap().into_inner();
    assert!(first.refreshed);
    assert_ne!(first.access_token, login.access_token);
    assert_eq!(first.token_type, "Bearer");
    assert_eq!(oidc.refresh_requests().await, 1);
    assert_eq!(oidc.introspect(&first.access_token).await["active"], true);

    // Within the grace period the result just obtained is returned, without a provider call.
    let second = tokens.get_access_token(by_token(&created.session_token)).await.unwrap().into_inner();
    assert!(!second.refreshed);
    assert_eq!(second.access_token, first.access_token);
    assert_eq!(oidc.refresh_requests().await, 1);

    // By session_id for a service caller.
    let by_id = pb::GetAccessTokenRequest {
        selector: Some(AccessSelector::SessionId(created.session.as_ref().unwrap().session_id.clone())),
    };
    assert_eq!(tokens.get_access_token(by_id).await.unwrap().into_inner().access_token, first.access_token);

    // A session of the named provider refreshes there, with client_secret_post.
    let before = oidc.stats().await["token"]["by_auth_method"]["client_secret_post"].as_i64().unwrap_or(0);
    let login = oidc.tokens("bob").await;
    let created = sessions.create_session(create("bob", &login, "second")).await.unwrap().into_inner();
    assert_eq!(created.session.as_ref().unwrap().provider, "second");
    let answer = tokens.get_access_token(by_token(&created.session_token)).await.unwrap().into_inner();
    assert!(answer.refreshed);
    let after = oidc.stats().await["token"]["by_auth_method"]["client_secret_post"].as_i64().unwrap_or(0);
    assert_eq!(after - before, 1);

    // An unknown provider name is refused at creation.
    let e = sessions.create_session(create("carol", &login, "nowhere")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("provider"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refresh_rotates_and_never_reuses_the_old_refresh_token() {
    let oidc = Oidc::start(3600);
    let server = spawn_for(&oidc).start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("dana").await;
    let created = sessions.create_session(create("dana", &login, "")).await.unwrap().into_inner();
    let session_id = created.session.as_ref().unwrap().session_id.clone();

    // Not forced and not due (1 h left): within no grace period yet, so it still refreshes.
    let one = tokens.refresh_session(force(&created.session_token)).await.unwrap().into_inner();
    assert!(one.refreshed && one.rotated);
    // Forced again: a second upstream call, which succeeds only with the rotated refresh token
    // (presenting the old one would be invalid_grant and revoke the grant).
    let two = tokens.refresh_session(force(&created.session_token)).await.unwrap().into_inner();
    assert!(two.refreshed && two.rotated);
    // Not forced, inside the grace period: the result just obtained, no upstream call.
    let mut grace = force(&created.session_token);
    grace.force = false;
    let three = tokens.refresh_session(grace).await.unwrap().into_inner();
    assert!(!three.refreshed);
    assert_eq!(oidc.refresh_requests().await, 2);

    // The records chain the hashes: never a token, and the old refresh token was sent once.
    let mut admin = server.tokens(Some(ADMIN_KEY)).await;
    let history = admin
        .get_refresh_history(pb::GetRefreshHistoryRequest { session_id: session_id.clone(), limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(history.len(), 2);
    let (newest, oldest) = (&history[0], &history[1]);
    assert!(newest.success && oldest.success && newest.rotated && oldest.rotated);
    assert_eq!(oldest.old_refresh_token_hash, sha256_hex(&login.refresh_token));
    assert_eq!(oldest.old_access_token_hash, sha256_hex(&login.access_token));
    assert_eq!(newest.old_refresh_token_hash, oldest.new_refresh_token_hash);
    assert_ne!(newest.old_refresh_token_hash, sha256_hex(&login.refresh_token));
    assert_eq!(oldest.reason, "user_requested");
    assert!(newest.grace_period_ends_at.is_some());
    assert_eq!(two.record.as_ref().unwrap().record_id, newest.record_id);

    // The provider rejects the original refresh token now.
    let (status, body) = oidc.redeem(&login.refresh_token).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
}

/// Config for an in-process replica over a shared store.
fn replica_config(oidc: &Oidc) -> Config {
    let mut flags = Flags::new();
    for (k, v) in [
        ("listen", "127.0.0.1:0".to_owned()),
        ("storage", "memory".to_owned()),
        ("token.issuer", oidc.issuer.clone()),
        ("token.client_id", oidc.client_id.clone()),
        ("token.client_secret", oidc.client_secret.clone()),
        ("token.proactive_refresh", "5m".to_owned()),
        ("encryption_key", session_authority::crypto::encode_key(&[7u8; 32])),
        ("api_keys", api_keys_env()),
        ("security.rules.session_create.limit", "1000".to_owned()),
    ] {
        flags.insert(k.to_owned(), v);
    }
    Config::from_flags(&flags).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hundred_concurrent_calls_on_two_replicas_make_one_refresh() {
    let oidc = Oidc::start(60);
    // Two replicas: two Apps (each with its own TokenManager, in-process single flight and
    // lease holder ids) over one MemoryStore, as two processes would share Redis.
    let store = Arc::new(MemoryStore::new());
    let stop = CancellationToken::new();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let app = session_authority::App::build_with(
            replica_config(&oidc),
            Stores::shared(store.clone()),
            Arc::new(SystemClock),
        )
        .await
        .unwrap();
        urls.push(format!("http://{}", app.local_addr()));
        let stop = stop.clone();
        tokio::spawn(app.run_until(async move { stop.cancelled().await }));
    }
    let channel = |url: &str| Channel::from_shared(url.to_owned()).unwrap().connect_lazy();
    let mut sessions = pb::session_service_client::SessionServiceClient::with_interceptor(
        channel(&urls[0]),
        Auth::new(Some(SERVICE_KEY)),
    );
    let login = oidc.tokens("erin").await;
    let created = sessions.create_session(create("erin", &login, "")).await.unwrap().into_inner();
    oidc.reset().await;

    let clients: Vec<_> = urls
        .iter()
        .map(|url| {
            pb::token_service_client::TokenServiceClient::with_interceptor(channel(url), Auth::new(Some(SERVICE_KEY)))
        })
        .collect();
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let mut client = clients[i % 2].clone();
            let token = created.session_token.clone();
            tokio::spawn(async move { client.get_access_token(by_token(&token)).await.map(|r| r.into_inner()) })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut refreshed = 0;
    for call in calls {
        let answer = call.await.unwrap().unwrap();
        refreshed += usize::from(answer.refreshed);
        seen.insert(answer.access_token);
    }
    assert_eq!(oidc.refresh_requests().await, 1, "exactly one token request at the provider");
    assert_eq!(seen.len(), 1, "every caller got the one refreshed token");
    assert!(!seen.contains(&login.access_token));
    assert!(refreshed >= 1);
    stop.cancel();
}

/// A token store whose first lease request waits, after saying it arrived, until the test lets
/// it go on: it widens the window between a caller's read of the session and its lease.
#[derive(Debug)]
struct HeldLeaseRequest {
    inner: Arc<MemoryStore>,
    arrived: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
    first: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl TokenStore for HeldLeaseRequest {
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> session_authority::Result<LeaseOutcome> {
        if self.first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.arrived.notify_one();
            self.go.notified().await;
        }
        self.inner.acquire_lease(lease, now).await
    }
    async fn renew_lease(
        &self,
        session: &str,
        holder: &str,
        expires_at: Millis,
        now: Millis,
    ) -> session_authority::Result<bool> {
        self.inner.renew_lease(session, holder, expires_at, now).await
    }
    async fn release_lease(&self, session: &str, holder: &str) -> session_authority::Result<()> {
        self.inner.release_lease(session, holder).await
    }
    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> session_authority::Result<()> {
        self.inner.append_refresh_record(record, keep).await
    }
    async fn refresh_history(&self, session: &str, limit: usize) -> session_authority::Result<Vec<RefreshRecord>> {
        self.inner.refresh_history(session, limit).await
    }
    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> session_authority::Result<usize> {
        self.inner.purge_refresh_records(now, limit).await
    }
    async fn checkpoint(&self, name: &str) -> session_authority::Result<Option<String>> {
        self.inner.checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, value: &str) -> session_authority::Result<()> {
        self.inner.save_checkpoint(name, value).await
    }
}

/// Found by the soak: replica B read the session (not yet refreshed), then replica A refreshed
/// it from start to end (lease taken, provider called, result written, lease released), then B
/// got the free lease and refreshed from its older read, presenting the refresh token A had
/// already redeemed: the provider answered invalid_grant, revoked the grant, and the session
/// ended. With the lease held, B must look again and take A's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_another_replica_finished_before_the_lease_was_free_is_not_repeated() {
    let oidc = Oidc::start(60);
    let store = Arc::new(MemoryStore::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let stop = CancellationToken::new();
    let held = HeldLeaseRequest {
        inner: store.clone(),
        arrived: arrived.clone(),
        go: go.clone(),
        first: std::sync::atomic::AtomicBool::new(true),
    };
    let mut urls = Vec::new();
    for stores in [Stores::shared(store.clone()), Stores { tokens: Arc::new(held), ..Stores::shared(store.clone()) }] {
        let app =
            session_authority::App::build_with(replica_config(&oidc), stores, Arc::new(SystemClock)).await.unwrap();
        urls.push(format!("http://{}", app.local_addr()));
        let stop = stop.clone();
        tokio::spawn(app.run_until(async move { stop.cancelled().await }));
    }
    let channel = |url: &str| Channel::from_shared(url.to_owned()).unwrap().connect_lazy();
    let mut sessions = pb::session_service_client::SessionServiceClient::with_interceptor(
        channel(&urls[0]),
        Auth::new(Some(SERVICE_KEY)),
    );
    let [mut on_a, mut on_b] = [&urls[0], &urls[1]].map(|url| {
        pb::token_service_client::TokenServiceClient::with_interceptor(channel(url), Auth::new(Some(SERVICE_KEY)))
    });
    // The access token lives 60 s, inside the proactive window: the first GetAccessToken refreshes.
    let login = oidc.tokens("kira").await;
    let created = sessions.create_session(create("kira", &login, "")).await.unwrap().into_inner();
    oidc.reset().await;

    // B reads the session and stops at its lease request.
    let token = created.session_token.clone();
    let on_b = tokio::spawn(async move { on_b.get_access_token(by_token(&token)).await });
    tokio::time::timeout(Duration::from_secs(10), arrived.notified()).await.expect("B asked for the lease");
    // A refreshes meanwhile, start to end.
    let first = on_a.get_access_token(by_token(&created.session_token)).await.unwrap().into_inner();
    assert!(first.refreshed);
    assert_eq!(oidc.refresh_requests().await, 1);
    // B gets the free lease now: it must take A's result, not redeem the old refresh token.
    go.notify_one();
    let second = on_b.await.unwrap().expect("B answers with A's refresh").into_inner();
    assert_eq!(second.access_token, first.access_token);
    assert_eq!(oidc.refresh_requests().await, 1, "one token request at the provider");
    let validate = pb::ValidateSessionRequest { session_token: created.session_token.clone(), ..Default::default() };
    let answer = sessions.validate_session(validate).await.unwrap().into_inner();
    assert!(answer.valid, "the session survives: {answer:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_of_an_active_and_a_revoked_token() {
    let oidc = Oidc::start(3600);
    let server = spawn_for(&oidc).start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("frank").await;
    let created = sessions.create_session(create("frank", &login, "")).await.unwrap().into_inner();

    let ask = |token: &str| pb::IntrospectTokenRequest { token: token.into(), ..Default::default() };
    let active = tokens.introspect_token(ask(&login.access_token)).await.unwrap().into_inner();
    assert!(active.active && !active.cached);
    assert_eq!(active.sub, "frank");
    assert_eq!(active.client_id, oidc.client_id);
    assert!(active.exp.is_some() && active.cache_ttl.is_some());
    let again = tokens.introspect_token(ask(&login.access_token)).await.unwrap().into_inner();
    assert!(again.active && again.cached);
    let cache_ttl = again.cache_ttl.unwrap();
    assert!(cache_ttl.seconds <= 30, "the cache is short: {cache_ttl:?}");

    // RevokeSession cascades to the provider (RFC 7009), which revokes the grant.
    let mut revocations = server.revocations(Some(SERVICE_KEY)).await;
    revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionToken(created.session_token.clone())),
            reason: "user_logout".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(oidc.stats().await["revocation"].as_i64().unwrap() >= 1);
    let revoked = tokens.introspect_token(ask(&login.access_token)).await.unwrap().into_inner();
    assert!(!revoked.active && !revoked.cached && revoked.cache_ttl.is_none());
    let refresh = pb::IntrospectTokenRequest {
        token: login.refresh_token.clone(),
        token_type_hint: "refresh_token".into(),
        ..Default::default()
    };
    assert!(!tokens.introspect_token(refresh).await.unwrap().into_inner().active);

    // A provider name nobody configured.
    let e = tokens
        .introspect_token(pb::IntrospectTokenRequest {
            token: "x".into(),
            provider: "nowhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_then_unavailable_and_invalid_grant_ends_the_session() {
    let oidc = Oidc::start(3600);
    let server = spawn_for(&oidc).start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("gina").await;
    let created = sessions.create_session(create("gina", &login, "")).await.unwrap().into_inner();

    // 503s with Retry-After (refused unprocessed): 1 attempt + 3 retries, then UNAVAILABLE; the
    // session is intact.
    oidc.fail_with(serde_json::json!({"mode": "503", "count": 4, "grant_type": "refresh_token", "retry_after": 0}))
        .await;
    let e = tokens.refresh_session(force(&created.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    let stats = oidc.stats().await;
    assert_eq!(stats["token"]["injected"]["503"], 4);
    assert_eq!(stats["token"]["by_grant_type"]["refresh_token"], 4);
    assert!(valid(&server, &created.session_token).await.valid);

    // A 503 without Retry-After, and a timeout after sending (700 ms per request), may have been
    // processed: never sent again (a rotating provider would see the spent token reused).
    oidc.fail("503", 4).await;
    let e = tokens.refresh_session(force(&created.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("refresh outcome unknown"), "{}", e.message());
    assert_eq!(oidc.stats().await["token"]["injected"]["503"], 5);
    oidc.fail("timeout", 4).await;
    let started = std::time::Instant::now();
    let e = tokens.refresh_session(force(&created.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("refresh outcome unknown"), "{}", e.message());
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(oidc.stats().await["token"]["injected"]["timeout"], 1);
    assert!(valid(&server, &created.session_token).await.valid);

    // The provider is back: the untouched refresh token still works.
    oidc.reset().await;
    let ok = tokens.refresh_session(force(&created.session_token)).await.unwrap().into_inner();
    assert!(ok.refreshed && ok.rotated);

    let mut admin = server.tokens(Some(ADMIN_KEY)).await;
    let session_id = created.session.as_ref().unwrap().session_id.clone();
    let history = admin
        .get_refresh_history(pb::GetRefreshHistoryRequest { session_id, limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(history.len(), 4);
    assert!(history[0].success);
    for (failed, attempts) in history[1..].iter().zip([1, 1, 4]) {
        assert!(!failed.success && failed.attempts == attempts && !failed.error.is_empty(), "{failed:?}");
    }

    // invalid_grant: someone else redeemed the refresh token first (rotation consumed it); the
    // service's refresh with it is refused, which ends the session as REFRESH_FAILED.
    let login = oidc.tokens("hugo").await;
    let doomed = sessions.create_session(create("hugo", &login, "")).await.unwrap().into_inner();
    let (status, _) = oidc.redeem(&login.refresh_token).await;
    assert_eq!(status, 200);
    let before = oidc.refresh_requests().await;
    let e = tokens.refresh_session(force(&doomed.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert_eq!(oidc.refresh_requests().await, before + 1, "invalid_grant is never retried");
    let answer = valid(&server, &doomed.session_token).await;
    assert!(!answer.valid);
    assert_eq!(answer.end_reason, "refresh_failed");
    let mut watcher = server.revocations(Some(WATCHER_KEY)).await;
    let list = watcher
        .list_revocations(pb::ListRevocationsRequest { user_id: "hugo".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(list.entries[0].kind, pb::RevocationKind::RefreshFailed as i32);
    assert_eq!(list.entries[0].session_id, doomed.session.as_ref().unwrap().session_id);
    // Asking again does not call the provider: the session has ended.
    let e = tokens.get_access_token(by_token(&doomed.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(oidc.refresh_requests().await, before + 1);
}

/// A full flow whose logs (stderr of the real binary) must not contain a secret.
async fn full_flow(server: &Process, oidc: &Oidc) -> Vec<String> {
    let mut secrets = vec![oidc.client_secret.clone()];
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("ivan").await;
    secrets.extend([login.access_token.clone(), login.refresh_token.clone(), login.id_token.clone()]);
    let created = sessions.create_session(create("ivan", &login, "")).await.unwrap().into_inner();
    let refreshed = tokens.refresh_session(force(&created.session_token)).await.unwrap().into_inner();
    assert!(refreshed.rotated);
    secrets.push(tokens.get_access_token(by_token(&created.session_token)).await.unwrap().into_inner().access_token);
    let ask = pb::IntrospectTokenRequest { token: login.access_token.clone(), ..Default::default() };
    tokens.introspect_token(ask).await.unwrap();
    oidc.fail("503", 4).await;
    tokens.refresh_session(force(&created.session_token)).await.unwrap_err();
    oidc.reset().await;
    // invalid_grant, then a revocation with the upstream cascade.
    let login2 = oidc.tokens("ivan").await;
    secrets.extend([login2.access_token.clone(), login2.refresh_token.clone(), login2.id_token.clone()]);
    let second = sessions.create_session(create("ivan", &login2, "")).await.unwrap().into_inner();
    oidc.redeem(&login2.refresh_token).await;
    tokens.refresh_session(force(&second.session_token)).await.unwrap_err();
    let mut revocations = server.revocations(Some(SERVICE_KEY)).await;
    revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionToken(created.session_token.clone())),
            ..Default::default()
        })
        .await
        .unwrap();
    secrets.push(created.session_token);
    secrets.push(second.session_token);
    secrets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_client_secret_appears_in_the_logs() {
    let oidc = Oidc::start(3600);
    for format in ["json", "text"] {
        let server = spawn_for(&oidc).log_format(format).env("RUST_LOG", "debug").start();
        let secrets = full_flow(&server, &oidc).await;
        let (_, server) = server.terminate().await;
        let logs = server.logs();
        assert!(logs.contains("refresh"), "the flow was logged ({format}):\n{logs}");
        for secret in &secrets {
            assert!(!logs.contains(secret.as_str()), "a secret appears in the {format} logs");
        }
        // Every id token is a JWT ("eyJ..."): none in any form.
        assert!(!logs.contains("eyJ"), "a JWT appears in the {format} logs");
    }
}

/// Issue 17 point 6: the guide's token-level calls. A backend that cached an upstream access
/// token asks IsRevoked by that token (also after a rotation replaced it), RevokeSession by an
/// upstream token revokes the session that holds it, and a token nobody holds is not revoked.
#[tokio::test]
async fn upstream_tokens_are_looked_up_and_revoked_through_a_rotation() {
    use pb::revoke_session_request::Selector as RevokeBy;

    let oidc = Oidc::start(3600);
    let server = spawn_for(&oidc).start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let mut revocations = server.revocations(Some(SERVICE_KEY)).await;
    let mut watcher = server.revocations(Some(WATCHER_KEY)).await;
    let login = oidc.tokens("erin").await;
    let other = oidc.tokens("erin").await;
    let created = sessions.create_session(create("erin", &login, "")).await.unwrap().into_inner();
    let session_id = created.session.as_ref().unwrap().session_id.clone();
    let bystander = sessions.create_session(create("erin", &other, "")).await.unwrap().into_inner();
    let by_token = |t: &str| pb::IsRevokedRequest { upstream_token: t.into(), ..Default::default() };

    // Live session: its tokens are not revoked; an unknown token is simply not revoked.
    for t in [&login.access_token, &login.refresh_token, "never-issued-by-anyone"] {
        let answer = watcher.is_revoked(by_token(t)).await.unwrap().into_inner();
        assert!(!answer.revoked && answer.event.is_none(), "{answer:?}");
    }

    // A rotation replaces both tokens; the old ones still name the session.
    let refreshed = tokens.refresh_session(force(&created.session_token)).await.unwrap().into_inner();
    assert!(refreshed.refreshed && refreshed.rotated);
    let current = tokens
        .get_access_token(pb::GetAccessTokenRequest {
            selector: Some(AccessSelector::SessionToken(created.session_token.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_ne!(current, login.access_token);

    // The guide's revoke_token(refresh_token): the session that held it is revoked, once.
    let revoked = revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(RevokeBy::UpstreamToken(login.refresh_token.clone())),
            reason: "refresh_token_revoked".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.already_ended);
    let event = revoked.event.unwrap();
    assert_eq!(event.session_id, session_id);
    assert_eq!(event.reason, "refresh_token_revoked");

    // Every token it held, before and after the rotation, is revoked now; the bystander's not.
    for t in [&login.access_token, &login.refresh_token, &current] {
        let answer = watcher.is_revoked(by_token(t)).await.unwrap().into_inner();
        assert!(answer.revoked, "{answer:?}");
        assert_eq!(answer.event.unwrap().session_id, session_id);
    }
    let answer = watcher.is_revoked(by_token(&other.access_token)).await.unwrap().into_inner();
    assert!(!answer.revoked, "{answer:?}");
    // By session id, the same entry (the guide's get_session_revocations: a session ends once).
    let by_id = watcher
        .is_revoked(pb::IsRevokedRequest { session_id: session_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.event.unwrap().cursor, event.cursor);
    let again = revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(RevokeBy::UpstreamToken(current.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_ended);

    // Precise refusals.
    let e = revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(RevokeBy::UpstreamToken("never-issued-by-anyone".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("upstream token"), "{}", e.message());
    let both = pb::IsRevokedRequest { session_id: session_id.clone(), upstream_token: current.clone() };
    let e = watcher.is_revoked(both).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = watcher.is_revoked(pb::IsRevokedRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // The service never logs an upstream token.
    assert!(!server.logs().contains(&login.refresh_token));
    let _ = bystander;
}

/// Issue 16 point 10: the refresh lease is exclusive across replicas on Redis even when one
/// replica's clock is ten minutes ahead (it would otherwise take the other's lease for expired,
/// and the provider's new token for one to refresh again at once).
#[tokio::test]
async fn two_replicas_with_skewed_clocks_make_one_refresh_on_redis() {
    let oidc = Oidc::start(60);
    let redis = crate::servers::shared_redis();
    let prefix = crate::servers::unique_prefix("skew-lease");
    let replica = |skew: Option<&str>| {
        let mut spawn = spawn_for(&oidc)
            .arg("--storage")
            .arg("redis")
            .env("REDIS_URL", redis.url())
            .env("SESSION_AUTHORITY_REDIS_KEY_PREFIX", &prefix)
            .env("SESSION_AUTHORITY_ENCRYPTION_KEY", session_authority::crypto::encode_key(&[7u8; 32]));
        if let Some(skew) = skew {
            spawn = spawn.env("SESSION_AUTHORITY_CLOCK_OFFSET", skew);
        }
        spawn.start()
    };
    let (a, ahead) = (replica(None), replica(Some("600s")));
    let mut sessions = a.sessions(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("skewed").await;
    let created = sessions.create_session(create("skewed", &login, "")).await.unwrap().into_inner();
    oidc.reset().await;

    let clients = [a.tokens(Some(SERVICE_KEY)).await, ahead.tokens(Some(SERVICE_KEY)).await];
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let mut client = clients[i % 2].clone();
            let token = created.session_token.clone();
            tokio::spawn(async move { client.get_access_token(by_token(&token)).await.map(|r| r.into_inner()) })
        })
        .collect();
    let mut seen = HashSet::new();
    for call in calls {
        seen.insert(call.await.unwrap().unwrap().access_token);
    }
    assert_eq!(oidc.refresh_requests().await, 1, "exactly one token request at the provider");
    assert_eq!(seen.len(), 1, "every caller got the one refreshed token");
}

/// Issue 16 point 5 (its first half): logout-all ends every session in storage before any
/// upstream call, so a provider whose revocation endpoint never answers cannot cut it off.
#[tokio::test]
async fn logout_all_ends_every_session_first_while_the_provider_hangs() {
    // A revocation endpoint that accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let _held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in hole.incoming() {
            open.push(stream);
        }
    });
    let oidc = Oidc::start(3600);
    let server = spawn_for(&oidc)
        .env("SESSION_AUTHORITY_TOKEN_REVOCATION_ENDPOINT", format!("http://{hole_addr}/revoke"))
        .env("SESSION_AUTHORITY_TOKEN_REQUEST_TIMEOUT", "3s")
        .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", "50")
        .start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut revocations = server.revocations(Some(SERVICE_KEY)).await;
    let mut ids = HashSet::new();
    for _ in 0..20 {
        let login = oidc.tokens("fay").await;
        let created = sessions.create_session(create("fay", &login, "")).await.unwrap().into_inner();
        ids.insert(created.session.unwrap().session_id);
    }

    let started = std::time::Instant::now();
    let answer = revocations
        .revoke_user_sessions(pb::RevokeUserSessionsRequest { user_id: "fay".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert_eq!(answer.revoked_count, 20, "{answer:?}");
    assert_eq!(answer.session_ids.iter().cloned().collect::<HashSet<_>>(), ids);
    assert!(took < Duration::from_secs(2), "logout-all waited for the provider: {took:?}");
    let mut admin = server.sessions(Some(ADMIN_KEY)).await;
    let left = admin
        .list_user_sessions(pb::ListUserSessionsRequest { user_id: "fay".into(), page_size: 100, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(left.is_empty(), "still active: {left:?}");
}

/// Issue 16 point 5 (its second half): the upstream revocations of a logout-all come from a
/// durable queue. The provider's revocation endpoint is slow (10 s) and then down: logout-all
/// of 20 sessions still returns at once with 20 ended, the queue counts its failures and keeps
/// the work pending across a SIGKILL, and once the provider is back the restarted server
/// revokes every one of the 20 grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_revokes_upstream_tokens_from_a_durable_queue_across_a_restart() {
    use crate::operability::{free_port, scrape};

    let oidc = Oidc::start(3600);
    oidc.revocation_fail(serde_json::json!({"mode": "delay", "delay_ms": 10_000})).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let metrics_port = free_port();
    let spawn = || {
        spawn_for(&oidc)
            .data_dir(&data)
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", "50")
    };
    let mut server = spawn().start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut revocations = server.revocations(Some(SERVICE_KEY)).await;
    let mut logins = Vec::new();
    for _ in 0..20 {
        let login = oidc.tokens("gus").await;
        sessions.create_session(create("gus", &login, "")).await.unwrap();
        logins.push(login);
    }

    let started = std::time::Instant::now();
    let answer = revocations
        .revoke_user_sessions(pb::RevokeUserSessionsRequest { user_id: "gus".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert_eq!(answer.revoked_count, 20, "{answer:?}");
    // Well under the provider's 10 s delay, with room for a slow machine.
    assert!(took < Duration::from_secs(5), "logout-all waited for the provider: {took:?}");

    // Slow: the provider has seen revocation requests and processed none of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while oidc.stats().await["revocation_injected"].as_i64().unwrap() < 2 {
        assert!(std::time::Instant::now() < deadline, "the queue made no upstream call");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Down.
    oidc.revocation_fail(serde_json::json!({"mode": "503"})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let exposition = scrape(metrics_port);
        let failed = exposition.value("upstream_revocations_total", &[("outcome", "failed")]).unwrap_or(0.0);
        let pending = exposition.value("upstream_revocations_pending", &[]).unwrap_or(0.0);
        // Every event failed at least twice (each pass of the queue tries all that are due).
        if failed >= 40.0 && pending == 20.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "failed {failed}, pending {pending}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(oidc.stats().await["revocation_processed"].as_i64().unwrap(), 0);
    // One security event per session whose upstream revocation is failing, not one per retry.
    let events = server
        .security(Some(ADMIN_KEY))
        .await
        .list_security_events(pb::ListSecurityEventsRequest {
            user_id: "gus".into(),
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let failures: Vec<&str> = events
        .iter()
        .filter(|e| e.details.starts_with("Upstream token revocation failed"))
        .map(|e| e.session_id.as_str())
        .collect();
    let distinct: std::collections::BTreeSet<&str> = failures.iter().copied().collect();
    assert_eq!((failures.len(), distinct.len()), (20, 20), "{failures:?}");
    for login in &logins {
        assert!(oidc.is_active(&login.refresh_token).await, "revoked while the provider was down");
    }

    // A crash, the provider comes back, and the server starts again on the same data.
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10));
    oidc.revocation_fail(serde_json::json!({"mode": "none"})).await;
    let _server = spawn().start();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for login in &logins {
        while oidc.is_active(&login.refresh_token).await || oidc.is_active(&login.access_token).await {
            assert!(std::time::Instant::now() < deadline, "a grant of the logout-all was never revoked upstream");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Each once: 20 revoked, nothing left pending.
    loop {
        let exposition = scrape(metrics_port);
        let revoked = exposition.value("upstream_revocations_total", &[("outcome", "revoked")]);
        let pending = exposition.value("upstream_revocations_pending", &[]);
        if pending == Some(0.0) {
            assert_eq!(revoked, Some(20.0));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "revoked {revoked:?}, pending {pending:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 16 point 5 on shared storage: two replicas on one Redis run one upstream revocation
/// queue between them (a lease), so each revoked session's tokens are revoked upstream once,
/// not once per replica; when a replica stops, the other goes on with the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_redis_share_one_upstream_revocation_queue() {
    let oidc = Oidc::start(3600);
    let redis = crate::servers::shared_redis();
    let prefix = crate::servers::unique_prefix("upstream-queue");
    let replica = || {
        spawn_for(&oidc)
            .arg("--storage")
            .arg("redis")
            .env("REDIS_URL", redis.url())
            .env("SESSION_AUTHORITY_REDIS_KEY_PREFIX", &prefix)
            .env("SESSION_AUTHORITY_ENCRYPTION_KEY", session_authority::crypto::encode_key(&[7u8; 32]))
            .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", "50")
    };
    let (a, b) = (replica().start(), replica().start());
    let logout_all = async |server: &Process, user: &str, n: usize| {
        let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
        let mut logins = Vec::new();
        for _ in 0..n {
            let login = oidc.tokens(user).await;
            sessions.create_session(create(user, &login, "")).await.unwrap();
            logins.push(login);
        }
        let answer = server
            .revocations(Some(SERVICE_KEY))
            .await
            .revoke_user_sessions(pb::RevokeUserSessionsRequest { user_id: user.into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.revoked_count as usize, n);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for login in &logins {
            while oidc.is_active(&login.refresh_token).await {
                assert!(std::time::Instant::now() < deadline, "a grant was never revoked upstream");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    oidc.reset().await;
    logout_all(&a, "hal", 10).await;
    // Time for a second worker, if there were one, to make its calls too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = oidc.stats().await;
    assert_eq!(stats["revocation"], 20, "one refresh and one access token revocation per session: {stats}");

    // One replica stops; the other leads the queue from where it was.
    let (code, _a) = a.terminate().await;
    assert_eq!(code, Some(0));
    logout_all(&b, "ida", 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(oidc.stats().await["revocation"], 30);
}
