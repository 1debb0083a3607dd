//! Issue 17 (the guide's calls) through the real binary: `security.hijack_detection = false`
//! means off everywhere, device mismatches count as suspicious, and a summary window longer
//! than event retention is refused.

use session_authority::grpc::pb;
use tonic::Code;

use crate::support::{ADMIN_KEY, SERVICE_KEY, Spawn, laptop, thief_device};

const HOME_IP: &str = "192.0.2.10";
const THIEF_IP: &str = "203.0.113.5";

#[tokio::test]
async fn hijack_detection_off_means_off_and_device_mismatches_are_suspicious() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[security]\nhijack_detection = false\nevent_retention = \"1h\"\n").unwrap();
    let server = Spawn::default().arg("--storage").arg("memory").arg("--config").arg(config.to_str().unwrap()).start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut security = server.security(Some(SERVICE_KEY)).await;
    let mut admin = server.security(Some(ADMIN_KEY)).await;
    let mut admin_sessions = server.sessions(Some(ADMIN_KEY)).await;

    let created = sessions
        .create_session(pb::CreateSessionRequest {
            user_id: "nora".into(),
            access_token: "upstream-access".into(),
            expires_in: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
            device_fingerprint: Some(laptop("UA/1")),
            ip_address: HOME_IP.into(),
            user_agent: "UA/1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let session_id = created.session.unwrap().session_id;

    // ValidateSession does not score: a stolen token from another device is a device mismatch
    // (not valid), with no risk, and the session is not ended.
    let answer = sessions
        .validate_session(pb::ValidateSessionRequest {
            session_token: created.session_token.clone(),
            device_fingerprint: Some(thief_device()),
            ip_address: THIEF_IP.into(),
            user_agent: "Evil/9".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.valid);
    assert_eq!(answer.reason, pb::InvalidReason::DeviceMismatch as i32, "{answer:?}");
    assert_eq!(answer.risk_score, 0.0, "{answer:?}");

    // DetectHijacking says honestly that detection is off, and ends nothing.
    let e = security
        .detect_hijacking(pb::DetectHijackingRequest {
            selector: Some(pb::detect_hijacking_request::Selector::SessionToken(created.session_token.clone())),
            current_ip: THIEF_IP.into(),
            current_user_agent: "Evil/9".into(),
            current_fingerprint: Some(thief_device()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("security.hijack_detection"), "{}", e.message());
    let session = admin_sessions
        .get_session(pb::GetSessionRequest {
            selector: Some(pb::get_session_request::Selector::SessionId(session_id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(session.state, pb::SessionState::Active as i32, "{session:?}");

    // The device mismatch counts as a suspicious event in the summary.
    let summary = admin
        .get_security_summary(pb::GetSecuritySummaryRequest { user_id: "nora".into(), hours: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.suspicious_events, 1, "{summary:?}");

    // A window longer than retention (1 h here) is refused, naming the setting and its value.
    let e = admin
        .get_security_summary(pb::GetSecuritySummaryRequest { user_id: "nora".into(), hours: 2 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("security.event_retention") && e.message().contains("1h"), "{}", e.message());
}

/// CheckRateLimit then CreateSession for one key costs one unit: unset `consume` peeks at
/// `session_create` (which CreateSession enforces itself).
#[tokio::test]
async fn check_rate_limit_before_create_session_costs_one_unit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[security.rules.session_create]\nlimit = 2\nperiod = \"300s\"\n").unwrap();
    let server = Spawn::default().arg("--storage").arg("memory").arg("--config").arg(config.to_str().unwrap()).start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut security = server.security(Some(SERVICE_KEY)).await;
    let check = |consume: Option<bool>| pb::CheckRateLimitRequest {
        rule_name: "session_create".into(),
        key: "ines".into(),
        cost: 1,
        consume,
    };
    let create = || pb::CreateSessionRequest {
        user_id: "ines".into(),
        access_token: "upstream-access".into(),
        expires_in: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
        ..Default::default()
    };
    for round in 0..2 {
        let answer = security.check_rate_limit(check(None)).await.unwrap().into_inner();
        assert!(answer.allowed, "round {round}: {answer:?}");
        // An explicit peek changes nothing either.
        let peek = security.check_rate_limit(check(Some(false))).await.unwrap().into_inner();
        assert_eq!(peek.remaining, answer.remaining, "round {round}: {peek:?}");
        sessions.create_session(create()).await.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
    }
    let answer = security.check_rate_limit(check(None)).await.unwrap().into_inner();
    assert!(!answer.allowed, "{answer:?}");
    let e = sessions.create_session(create()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

/// The guide's variables alone (`OPENROUTER_CLIENT_ID`, `OPENROUTER_CLIENT_SECRET`, and where the
/// guide hard-coded openrouter.ai, `OPENROUTER_ISSUER`) configure the provider `openrouter`:
/// CreateSession with `provider = "openrouter"`, or with no provider when it is the only one,
/// makes sessions whose refresh reaches that provider.
#[tokio::test]
async fn the_guides_openrouter_variables_configure_the_provider_openrouter() {
    use crate::oidc::Oidc;
    use pb::refresh_session_request::Selector as RefreshSelector;

    let oidc = Oidc::start(3600);
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .without_create_limit()
        .env("OPENROUTER_CLIENT_ID", &oidc.client_id)
        .env("OPENROUTER_CLIENT_SECRET", &oidc.client_secret)
        .env("OPENROUTER_ISSUER", &oidc.issuer)
        .start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;

    for (user, provider) in [("olga", "openrouter"), ("omar", "")] {
        let login = oidc.tokens(user).await;
        let created = sessions
            .create_session(pb::CreateSessionRequest {
                user_id: user.into(),
                access_token: login.access_token.clone(),
                refresh_token: login.refresh_token.clone(),
                expires_in: Some(prost_types::Duration { seconds: login.expires_in, nanos: 0 }),
                provider: provider.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("provider {provider:?}: {e:?}"))
            .into_inner();
        assert_eq!(created.session.as_ref().unwrap().provider, "openrouter", "provider {provider:?}");
        let before = oidc.refresh_requests().await;
        let refreshed = tokens
            .refresh_session(pb::RefreshSessionRequest {
                selector: Some(RefreshSelector::SessionToken(created.session_token.clone())),
                force: true,
                reason: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("refresh through openrouter, provider {provider:?}: {e:?}"))
            .into_inner();
        assert!(refreshed.refreshed, "{refreshed:?}");
        assert_eq!(oidc.refresh_requests().await, before + 1);
    }

    // Another name is still refused, naming what is configured.
    let e = sessions
        .create_session(pb::CreateSessionRequest {
            user_id: "otto".into(),
            access_token: "a".into(),
            provider: "github".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("configured: openrouter"), "{}", e.message());
}

/// `REDIS_URL` alone (no `storage` anywhere) puts the server on Redis and says so; without an
/// encryption key it refuses in one line that says how to make one, and `gen-key` makes one that
/// works. Both `REDIS_URL` and `KV_REST_API_URL` without `storage` is an error naming both.
#[tokio::test]
async fn redis_url_alone_selects_redis_and_a_missing_key_says_how_to_make_one() {
    use crate::support::run_to_exit;

    let redis = crate::servers::shared_redis();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let keys = crate::support::api_keys_env();
    let args = ["serve", "--listen", "127.0.0.1:0", "--data-dir", data];

    let (code, stderr) =
        run_to_exit(&args, &[("SESSION_AUTHORITY_API_KEYS", keys.as_str()), ("REDIS_URL", url.as_str())], dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("session-authority gen-key") && stderr.contains("SESSION_AUTHORITY_ENCRYPTION_KEY"),
        "{stderr}"
    );

    let both = [
        ("SESSION_AUTHORITY_API_KEYS", keys.as_str()),
        ("REDIS_URL", url.as_str()),
        ("KV_REST_API_URL", "https://kv.example.com"),
        ("KV_REST_API_TOKEN", "kv-token-secret"),
    ];
    let (code, stderr) = run_to_exit(&args, &both, dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("REDIS_URL") && stderr.contains("KV_REST_API_URL") && stderr.contains("--storage"),
        "{stderr}"
    );
    assert!(!stderr.contains("kv-token-secret"), "{stderr}");

    let out = std::process::Command::new(crate::support::binary()).arg("gen-key").output().unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    use base64::Engine as _;
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(&key).unwrap().len(), 32, "{key}");

    let prefix = crate::servers::unique_prefix("guide-redis-url");
    let server = Spawn::default()
        .without_create_limit()
        .env("REDIS_URL", &url)
        .env("SESSION_AUTHORITY_REDIS_KEY_PREFIX", &prefix)
        .env("SESSION_AUTHORITY_ENCRYPTION_KEY", &key)
        .start();
    let serving = server.logs();
    assert!(
        serving.contains("\"storage\":\"redis\"")
            || serving.contains("storage=\"redis\"")
            || serving.contains("storage=redis"),
        "{serving}"
    );
    assert!(serving.contains("REDIS_URL"), "the startup log names the variable that chose the backend: {serving}");
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    sessions
        .create_session(pb::CreateSessionRequest {
            user_id: "rita".into(),
            access_token: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan", "--pattern", &format!("{prefix}*")])
        .output()
        .unwrap();
    let stored = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stored.lines().any(|k| k.contains(":s:")), "the session is in Redis under {prefix}: {stored}");
}

/// GetSession takes the guide's `ip_address`: set, it is a use that slides the idle timeout (the
/// stored address stays, for the DetectHijacking that follows); malformed, INVALID_ARGUMENT.
#[tokio::test]
async fn get_session_with_an_ip_address_is_a_use_that_slides_the_idle_timeout() {
    use pb::get_session_request::Selector;

    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .without_create_limit()
        .env("SESSION_AUTHORITY_SESSION_IDLE_SLIDE_STEP", "0s")
        .start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let created = sessions
        .create_session(pb::CreateSessionRequest {
            user_id: "gina".into(),
            access_token: "a".into(),
            ip_address: HOME_IP.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let get = |ip: &str| pb::GetSessionRequest {
        selector: Some(Selector::SessionToken(created.session_token.clone())),
        device_fingerprint: None,
        ip_address: ip.into(),
    };
    let idle = |s: &pb::Session| s.idle_expires_at.unwrap();
    let first = idle(created.session.as_ref().unwrap());

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let unused = sessions.get_session(get("")).await.unwrap().into_inner().session.unwrap();
    assert_eq!(idle(&unused), first, "without an address GetSession only reads");

    let used = sessions.get_session(get(THIEF_IP)).await.unwrap().into_inner().session.unwrap();
    assert!(idle(&used).seconds > first.seconds, "{:?} -> {:?}", first, idle(&used));
    assert_eq!(used.ip_address, HOME_IP, "the stored address is not replaced by GetSession");

    let e = sessions.get_session(get("not-an-ip")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("ip_address"), "{}", e.message());
}

#[tokio::test]
async fn sessions_that_time_out_unused_are_ended_by_the_sweep_with_an_event_and_a_metric() {
    use crate::operability::{free_port, scrape};

    let port = free_port();
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .without_create_limit()
        .env("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT", "2s")
        .env("SESSION_AUTHORITY_SESSION_CLEANUP_INTERVAL", "1s")
        .start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut admin = server.security(Some(ADMIN_KEY)).await;
    let mut admin_sessions = server.sessions(Some(ADMIN_KEY)).await;
    let created = sessions
        .create_session(pb::CreateSessionRequest {
            user_id: "otto".into(),
            access_token: "a".into(),
            ip_address: HOME_IP.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let session_id = created.session.unwrap().session_id;
    assert_eq!(scrape(port).value("session_expired_total", &[]).unwrap_or(0.0), 0.0);

    // Nobody validates it again: the sweep ends it once its idle timeout passed.
    let expired = pb::SecurityEventType::SessionExpired as i32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let event = loop {
        let events = admin
            .list_security_events(pb::ListSecurityEventsRequest {
                user_id: "otto".into(),
                event_types: vec![expired],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        if let Some(event) = events.into_iter().next() {
            break event;
        }
        assert!(std::time::Instant::now() < deadline, "no session_expired event within 15 s");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(event.session_id, session_id, "{event:?}");
    let session = admin_sessions
        .get_session(pb::GetSessionRequest {
            selector: Some(pb::get_session_request::Selector::SessionId(session_id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(session.state, pb::SessionState::Expired as i32, "{session:?}");
    assert_eq!(session.end_reason, "idle_timeout", "{session:?}");
    assert_eq!(scrape(port).value("session_expired_total", &[]), Some(1.0));

    // A validation afterwards says expired and records nothing more.
    let answer = sessions
        .validate_session(pb::ValidateSessionRequest {
            session_token: created.session_token,
            ip_address: HOME_IP.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.valid);
    assert_eq!(answer.reason, pb::InvalidReason::Expired as i32, "{answer:?}");
    assert_eq!(scrape(port).value("session_expired_total", &[]), Some(1.0));
}
