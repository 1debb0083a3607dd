//! Refresh under faults (issue 16, points 6 to 8), against the OIDC peer (`tests/peers/oidc`,
//! rotating refresh tokens) and, for the write after a rotation, Redis behind the TCP fault
//! proxy: no refresh ever logs a user out by mistake.

use std::time::{Duration, Instant};

use serde_json::json;
use session_authority::grpc::pb;
use session_authority::grpc::pb::refresh_session_request::Selector as RefreshSelector;
use tonic::Code;

use crate::oidc::{Oidc, Tokens};
use crate::servers::{RedisServer, unique_prefix};
use crate::shared_storage::on_redis;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{Process, SERVICE_KEY, Spawn};

fn with_oidc(spawn: Spawn, oidc: &Oidc, request_timeout: &str) -> Spawn {
    spawn
        .env("SESSION_AUTHORITY_TOKEN_ISSUER", &oidc.issuer)
        .env("OAUTH_CLIENT_ID", &oidc.client_id)
        .env("OAUTH_CLIENT_SECRET", &oidc.client_secret)
        .env("SESSION_AUTHORITY_TOKEN_RETRY_INITIAL_DELAY", "20ms")
        .env("SESSION_AUTHORITY_TOKEN_RETRY_MAX_DELAY", "100ms")
        .env("SESSION_AUTHORITY_TOKEN_REQUEST_TIMEOUT", request_timeout)
}

fn create(user: &str, tokens: &Tokens) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user.into(),
        access_token: tokens.access_token.clone(),
        refresh_token: tokens.refresh_token.clone(),
        id_token: tokens.id_token.clone(),
        token_type: "Bearer".into(),
        expires_in: Some(prost_types::Duration { seconds: tokens.expires_in, nanos: 0 }),
        scopes: tokens.scope.split(' ').map(str::to_owned).collect(),
        ..Default::default()
    }
}

fn force(token: &str) -> pb::RefreshSessionRequest {
    pb::RefreshSessionRequest {
        selector: Some(RefreshSelector::SessionToken(token.into())),
        force: true,
        reason: String::new(),
    }
}

async fn is_valid(server: &Process, token: &str) -> bool {
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    sessions
        .validate_session(pb::ValidateSessionRequest { session_token: token.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .valid
}

/// Polls the peer's stats until `key` of the token stats reaches `want` (or 10 s pass).
async fn token_stat_reaches(oidc: &Oidc, key: &str, want: i64) -> i64 {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = oidc.stats().await["token"][key].as_i64().unwrap_or(0);
        if seen >= want || Instant::now() > until {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The provider receives the refresh but the client's timeout (700 ms) passes before it answers;
/// the peer then drops the request unprocessed. The service cannot tell this from "processed,
/// answer lost", so it must not send the spent-or-not token again: UNAVAILABLE "refresh outcome
/// unknown", the session kept, and (the token was not spent) a later refresh succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_timed_out_after_sending_is_not_repeated_and_a_later_one_succeeds() {
    let oidc = Oidc::start(3600);
    let server = with_oidc(Spawn::default().without_create_limit(), &oidc, "700ms").start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("ivan").await;
    let created = sessions.create_session(create("ivan", &login)).await.unwrap().into_inner();

    oidc.refresh_hook(json!({"delay_ms": 2000})).await;
    let before = oidc.refresh_requests().await;
    let e = tokens.refresh_session(force(&created.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("refresh outcome unknown"), "{}", e.message());
    assert!(is_valid(&server, &created.session_token).await);
    assert_eq!(token_stat_reaches(&oidc, "dropped", 1).await, 1, "the peer dropped the delayed request");
    assert_eq!(oidc.refresh_requests().await, before + 1, "an ambiguous refresh is never sent again");

    let ok = tokens.refresh_session(force(&created.session_token)).await.unwrap().into_inner();
    assert!(ok.refreshed && ok.rotated);
    assert!(is_valid(&server, &created.session_token).await);
}

/// The provider processes the refresh (rotating the token) but its answer comes after the
/// client's timeout: the new tokens are lost. The service does not repeat the request, and when
/// a later refresh with the old token gets invalid_grant, it reports the outcome as unknown
/// (UNAVAILABLE) instead of ending the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_processed_but_unanswered_never_ends_the_session() {
    let oidc = Oidc::start(3600);
    let server = with_oidc(Spawn::default().without_create_limit(), &oidc, "700ms").start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("jana").await;
    let created = sessions.create_session(create("jana", &login)).await.unwrap().into_inner();

    oidc.refresh_hook(json!({"delay_ms": 2000, "processed": true})).await;
    let before = oidc.refresh_requests().await;
    let e = tokens.refresh_session(force(&created.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("refresh outcome unknown"), "{}", e.message());
    assert_eq!(oidc.refresh_requests().await, before + 1, "an ambiguous refresh is never sent again");
    assert!(is_valid(&server, &created.session_token).await);

    // The old token was spent by the processed request: the provider refuses it now.
    let e = tokens.refresh_session(force(&created.session_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("refresh outcome unknown") && e.message().contains("invalid_grant"),
        "{}",
        e.message()
    );
    assert!(
        is_valid(&server, &created.session_token).await,
        "the service never ends the session on an unknown outcome"
    );
}

/// Redis is cut (connections reset) while the provider's answer to a rotating refresh is on its
/// way, and healed 2.5 s later: the holder keeps the lease and retries the write, so the rotated
/// tokens are stored, and the next refresh presents the new refresh token (no reuse at the
/// provider, which would answer 400 invalid_grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_write_failure_after_rotation_keeps_the_new_tokens() {
    let oidc = Oidc::start(3600);
    let redis = RedisServer::start();
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let prefix = unique_prefix("refresh-write");
    let server = with_oidc(on_redis(&proxy.redis_url(), &prefix), &oidc, "5s").start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("kemal").await;
    let created = sessions.create_session(create("kemal", &login)).await.unwrap().into_inner();

    // Processed at once, answered after 1.5 s; Redis is cut from 0.5 s to 3 s.
    oidc.refresh_hook(json!({"delay_ms": 1500, "processed": true})).await;
    let mut caller = tokens.clone();
    let token = created.session_token.clone();
    let call = tokio::spawn(async move { caller.refresh_session(force(&token)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Mode::Reset);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.set(Mode::Forward);
    let first = call.await.unwrap();
    let first = first.map(|r| r.into_inner()).map_err(|e| format!("{:?}: {}", e.code(), e.message()));
    assert!(first.as_ref().is_ok_and(|r| r.refreshed && r.rotated), "{first:?}");

    let next = tokens.refresh_session(force(&created.session_token)).await;
    let next = next.map(|r| r.into_inner()).map_err(|e| format!("{:?}: {}", e.code(), e.message()));
    assert!(next.as_ref().is_ok_and(|r| r.refreshed && r.rotated), "{next:?}");
    assert!(oidc.stats().await["token"]["by_status"]["400"].is_null(), "the provider saw a reuse");
    assert!(is_valid(&server, &created.session_token).await);
}

/// A refresh answered without `expires_in`, or with 0, keeps the previous lifetime (here 3600 s)
/// instead of storing "never expires" (which would stop proactive refreshes for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_without_expires_in_keeps_the_previous_lifetime() {
    let oidc = Oidc::start(3600);
    let server = with_oidc(Spawn::default().without_create_limit(), &oidc, "2s").start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    let login = oidc.tokens("lale").await;
    assert_eq!(login.expires_in, 3600);
    let created = sessions.create_session(create("lale", &login)).await.unwrap().into_inner();

    for (n, expires_in) in [json!("omit"), json!(0)].into_iter().enumerate() {
        oidc.refresh_hook(json!({ "expires_in": expires_in })).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let ok = tokens.refresh_session(force(&created.session_token)).await.unwrap().into_inner();
        assert!(ok.refreshed && ok.rotated);
        let exp = ok.access_token_expires_at.as_ref().map(|t| t.seconds);
        assert!(exp.is_some_and(|e| (now + 3590..=now + 3610).contains(&e)), "{expires_in}: expiry {exp:?}, now {now}");
        assert_eq!(
            oidc.stats().await["token"]["hooked"].as_i64(),
            Some(n as i64 + 1),
            "the hook answered this refresh"
        );
    }
}
