//! Operability through the real binary: the exact values of the metrics after a scripted flow
//! (and a strict parse of the exposition), OTLP trace export continuing a caller's
//! `traceparent` into a loopback collector, and logs in both formats free of every secret.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use futures_util::StreamExt as _;
use session_authority::grpc::pb;
use tonic::Code;

use crate::support::otlp::Collector;
use crate::support::prometheus::{self, Exposition};
use crate::support::{ADMIN_KEY, Process, SERVICE_KEY, Spawn, WATCHER_KEY, laptop, thief_device};

const HOME_IP: &str = "192.0.2.10";
const THIEF_IP: &str = "203.0.113.5";

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET /metrics (HTTP/1.0, so the body is not chunked) and parse it strictly.
pub(crate) fn scrape(port: u16) -> Exposition {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200"), "{head}");
    prometheus::parse(body).unwrap_or_else(|e| panic!("the exposition does not parse: {e}\n{body}"))
}

fn login(user: &str, access: &str, refresh: &str, id: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user.into(),
        access_token: access.into(),
        refresh_token: refresh.into(),
        id_token: id.into(),
        expires_in: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
        device_fingerprint: Some(laptop("UA/1")),
        ip_address: HOME_IP.into(),
        user_agent: "UA/1".into(),
        provider: String::new(),
        ..Default::default()
    }
}

fn validate(token: &str, thief: bool) -> pb::ValidateSessionRequest {
    pb::ValidateSessionRequest {
        session_token: token.into(),
        device_fingerprint: Some(if thief { thief_device() } else { laptop("UA/1") }),
        ip_address: if thief { THIEF_IP } else { HOME_IP }.into(),
        user_agent: if thief { "Evil/9" } else { "UA/1" }.into(),
    }
}

/// What the scripted flow produced, for the checks that follow it.
#[derive(Default)]
struct Flow {
    /// Every secret the flow handled: session tokens, upstream tokens.
    secrets: Vec<String>,
    /// Session and user ids, which must never be metric labels.
    ids: Vec<String>,
}

/// A login with distinct upstream tokens, remembered as secrets.
fn new_login(flow: &mut Flow, user: &str) -> pb::CreateSessionRequest {
    let n = flow.secrets.len();
    let access = format!("upstream-access-{user}-Xq7Lp2Mz{n}");
    let refresh = format!("upstream-refresh-{user}-Rv3Kd8Wn{n}");
    let id = format!("upstream-idtoken-{user}-Jt5Hb1Qc{n}");
    flow.secrets.extend([access.clone(), refresh.clone(), id.clone()]);
    flow.ids.push(user.to_owned());
    login(user, &access, &refresh, &id)
}

/// The scripted flow: create, validate, hijack by ValidateSession and by DetectHijacking,
/// revoke, an idle expiry, a rate-limit denial, with one watcher open throughout. Returns the
/// watcher's stream (still open) after it received the three revocations.
async fn scripted_flow(
    server: &Process,
    keys: (&str, &str, &str),
    flow: &mut Flow,
) -> tonic::Streaming<pb::WatchRevocationsResponse> {
    let (service_key, admin_key, watcher_key) = keys;
    let mut sessions = server.sessions(Some(service_key)).await;
    let mut security = server.security(Some(admin_key)).await;
    let mut revocations = server.revocations(Some(service_key)).await;
    let mut watcher = server.revocations(Some(watcher_key)).await;

    let mut watch = watcher.watch_revocations(pb::WatchRevocationsRequest::default()).await.unwrap().into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(matches!(first.message, Some(pb::watch_revocations_response::Message::Heartbeat(_))), "{first:?}");

    let mut created = Vec::new();
    for user in ["ada", "bob", "cyd"] {
        let response = sessions.create_session(new_login(flow, user)).await.unwrap().into_inner();
        flow.secrets.push(response.session_token.clone());
        flow.ids.push(response.session.unwrap().session_id);
        created.push(response.session_token);
    }
    let (ada, bob, cyd) = (created[0].clone(), created[1].clone(), created[2].clone());

    // Valid, then a hijack found by ValidateSession.
    assert!(sessions.validate_session(validate(&ada, false)).await.unwrap().into_inner().valid);
    let hijacked = sessions.validate_session(validate(&ada, true)).await.unwrap().into_inner();
    assert_eq!(hijacked.reason, pb::InvalidReason::HijackSuspected as i32, "{hijacked:?}");

    // A hijack found by DetectHijacking.
    let detected = security
        .detect_hijacking(pb::DetectHijackingRequest {
            selector: Some(pb::detect_hijacking_request::Selector::SessionToken(bob.clone())),
            current_ip: THIEF_IP.into(),
            current_fingerprint: Some(thief_device()),
            current_user_agent: "Evil/9".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(detected.session_terminated, "{detected:?}");

    // A revocation.
    revocations
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionToken(cyd.clone())),
            reason: "user_logout".into(),
            revoked_by: "cyd".into(),
        })
        .await
        .unwrap();

    // An idle expiry, recorded when a validation finds it.
    let mut short = new_login(flow, "dee");
    short.idle_timeout = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let dee = sessions.create_session(short).await.unwrap().into_inner();
    flow.secrets.push(dee.session_token.clone());
    flow.ids.push(dee.session.unwrap().session_id);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = sessions.validate_session(validate(&dee.session_token, false)).await.unwrap().into_inner();
    assert_eq!(expired.reason, pb::InvalidReason::Expired as i32, "{expired:?}");

    // A rate-limit denial: login_attempt allows 5 per 300 s.
    for attempt in 0..6 {
        let decision = security
            .check_rate_limit(pb::CheckRateLimitRequest {
                rule_name: "login_attempt".into(),
                key: "mallory@example.org".into(),
                cost: 1,
                consume: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(decision.allowed, attempt < 5, "attempt {attempt}: {decision:?}");
    }

    // The watcher received the three revocations (two hijacks and the revoke), in order.
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
        if let Some(pb::watch_revocations_response::Message::Event(event)) = message.message {
            kinds.push(event.kind);
        }
    }
    assert_eq!(
        kinds,
        vec![pb::RevocationKind::Hijack as i32, pb::RevocationKind::Hijack as i32, pb::RevocationKind::Revoked as i32]
    );
    watch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_scripted_flow_have_exact_values_and_parse() {
    let port = free_port();
    let server = Spawn::default().arg("--metrics-listen").arg(format!("127.0.0.1:{port}")).start();
    let mut flow = Flow::default();
    let watch = scripted_flow(&server, (SERVICE_KEY, ADMIN_KEY, WATCHER_KEY), &mut flow).await;

    let m = scrape(port);
    let value = |name: &str, labels: &[(&str, &str)]| m.value(name, labels);
    // The guide's counters. This flow refreshes nothing, so the refresh counters stay at their
    // pre-registered zero; `refresh_counters_count_real_refreshes_and_failures` covers them.
    assert_eq!(value("session_created_total", &[]), Some(4.0));
    assert_eq!(value("session_expired_total", &[]), Some(1.0));
    assert_eq!(value("session_hijack_detected_total", &[]), Some(2.0));
    assert_eq!(value("token_refreshed_total", &[]), Some(0.0));
    assert_eq!(value("token_refresh_failed_total", &[]), Some(0.0));
    // Revocations issued by kind (an expiry is not a revocation), delivered to the one watcher.
    assert_eq!(value("revocations_issued_total", &[("kind", "hijack")]), Some(2.0));
    assert_eq!(value("revocations_issued_total", &[("kind", "revoked")]), Some(1.0));
    assert_eq!(m.label_values("revocations_issued_total", "kind").len(), 2);
    assert_eq!(value("revocations_delivered_total", &[]), Some(3.0));
    assert_eq!(value("revocation_watchers_connected", &[]), Some(1.0));
    assert_eq!(value("rate_limit_denied_total", &[("rule", "login_attempt")]), Some(1.0));
    assert_eq!(m.label_values("rate_limit_denied_total", "rule").len(), 1);
    // RPCs by method and code.
    let handled =
        |method: &str, code: &str| value("grpc_server_handled_total", &[("grpc_method", method), ("grpc_code", code)]);
    assert_eq!(handled("CreateSession", "OK"), Some(4.0));
    assert_eq!(handled("ValidateSession", "OK"), Some(3.0));
    assert_eq!(handled("DetectHijacking", "OK"), Some(1.0));
    assert_eq!(handled("RevokeSession", "OK"), Some(1.0));
    assert_eq!(handled("CheckRateLimit", "OK"), Some(6.0));
    assert_eq!(value("grpc_server_handling_seconds_count", &[("grpc_method", "CreateSession")]), Some(4.0));
    // Storage by backend and operation: four creates; four ends (two hijacks, a revoke, an expiry).
    let storage = |operation: &str| {
        value("storage_operation_seconds_count", &[("backend", "embedded"), ("operation", operation)])
    };
    assert_eq!(storage("create"), Some(4.0));
    assert_eq!(storage("end"), Some(4.0));
    // Six CheckRateLimit calls and the hijack's validate_failure unit; the four session_create
    // checks are decided inside their `create` (one transaction with the session).
    assert_eq!(storage("rate_limit_check"), Some(7.0));
    assert!(m.samples.iter().all(|s| s.name != "storage_operation_errors_total"), "no storage call failed");
    assert_eq!(m.types.get("storage_operation_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(m.types.get("sessions_active").map(String::as_str), Some("gauge"));
    // Bounded labels: no id, token or key appears in any label value.
    for sample in &m.samples {
        for value in sample.labels.values() {
            for forbidden in flow.ids.iter().chain(&flow.secrets) {
                assert!(!value.contains(forbidden.as_str()), "{} has label value {value:?}", sample.name);
            }
            assert!(!value.contains("mallory"), "{} has the rate-limit key as a label", sample.name);
        }
    }

    // The watcher leaves: the gauge follows.
    drop(watch);
    let mut connected = None;
    for _ in 0..100 {
        connected = scrape(port).value("revocation_watchers_connected", &[]);
        if connected == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connected, Some(0.0));
}

fn traceparent(trace_id: &str, span_id: &str) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("00-{trace_id}-{span_id}-01").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_continues_through_the_authority_to_the_storage_span() {
    let collector = Collector::start().await;
    let server = Spawn::default()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let caller_span = format!("{:016x}", rand::random::<u64>() | 1);
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let mut request = tonic::Request::new(login("tia", "upstream-access-tia", "", ""));
    request.metadata_mut().insert("traceparent", traceparent(&trace_id, &caller_span));
    let token = sessions.create_session(request).await.unwrap().into_inner().session_token;
    // A call without a traceparent starts a trace of its own.
    assert!(sessions.validate_session(validate(&token, false)).await.unwrap().into_inner().valid);
    // An invalid traceparent is ignored, not an error.
    let mut request = tonic::Request::new(validate(&token, false));
    request.metadata_mut().insert("traceparent", "00-zz-yy-01".parse().unwrap());
    assert!(sessions.validate_session(request).await.unwrap().into_inner().valid);
    drop(sessions);

    // Shutdown flushes what the batch processor still holds.
    let (code, server) = server.terminate().await;
    assert_eq!(code, Some(0), "{}", server.logs());
    let spans = collector.spans();
    let hex = |bytes: &[u8]| hex::encode(bytes);
    let in_trace: Vec<_> = spans.iter().filter(|s| hex(&s.span.trace_id) == trace_id).collect();
    let names: Vec<&str> = in_trace.iter().map(|s| s.span.name.as_str()).collect();
    let rpc = in_trace
        .iter()
        .find(|s| s.span.name == "atoms.session.v1.SessionService/CreateSession")
        .unwrap_or_else(|| panic!("no CreateSession span in the caller's trace; got {names:?}; all: {spans:#?}"));
    assert_eq!(hex(&rpc.span.parent_span_id), caller_span, "the RPC span's parent is the caller's span");
    assert!(rpc.service_name.contains("session-authority"), "{}", rpc.service_name);
    let storage = in_trace
        .iter()
        .find(|s| s.span.name == "storage create")
        .unwrap_or_else(|| panic!("no storage span in the caller's trace; got {names:?}"));
    assert_eq!(storage.span.parent_span_id, rpc.span.span_id, "the storage span is a child of the RPC span");
    // The two validations are traces of their own, with their storage reads.
    let validations: Vec<_> =
        spans.iter().filter(|s| s.span.name == "atoms.session.v1.SessionService/ValidateSession").collect();
    assert_eq!(validations.len(), 2, "{names:?}");
    for validation in validations {
        assert_ne!(hex(&validation.span.trace_id), trace_id);
        assert!(validation.span.parent_span_id.is_empty(), "a root span");
        assert!(
            spans
                .iter()
                .any(|s| s.span.name == "storage get_by_token" && s.span.parent_span_id == validation.span.span_id),
            "ValidateSession has its storage read"
        );
    }
}

/// The full flow, plus the calls that tend to leak: a wrong API key, an unknown session token,
/// TokenService calls carrying a session token, a session read and update, a termination.
async fn flow_with_every_secret(server: &Process, keys: (&str, &str, &str), flow: &mut Flow) {
    let watch = scripted_flow(server, keys, flow).await;
    drop(watch);
    let (service_key, admin_key, _) = keys;
    let wrong_key = "wrong-key-Hn4Ys9Ue2Bf6Zk1Lw";
    flow.secrets.push(wrong_key.into());
    let mut intruder = server.sessions(Some(wrong_key)).await;
    let denied = intruder.validate_session(validate("sat_0000_unknown", false)).await.unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);

    let mut sessions = server.sessions(Some(service_key)).await;
    let mut tokens = server.tokens(Some(service_key)).await;
    let created =
        sessions.create_session(login("eve", "upstream-access-eve-Pp9Qm3", "", "")).await.unwrap().into_inner();
    flow.secrets.extend(["upstream-access-eve-Pp9Qm3".to_string(), created.session_token.clone()]);
    let token = created.session_token;
    let unknown = format!("{}X", &token[..token.len() - 1]);
    flow.secrets.push(unknown.clone());
    assert!(!sessions.validate_session(validate(&unknown, false)).await.unwrap().into_inner().valid);
    let refused = tokens
        .refresh_session(pb::RefreshSessionRequest {
            selector: Some(pb::refresh_session_request::Selector::SessionToken(token.clone())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "no refresh token to use: {refused:?}");
    let _ = tokens
        .get_access_token(pb::GetAccessTokenRequest {
            selector: Some(pb::get_access_token_request::Selector::SessionToken(token.clone())),
        })
        .await;
    sessions
        .get_session(pb::GetSessionRequest {
            selector: Some(pb::get_session_request::Selector::SessionToken(token.clone())),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut admin = server.sessions(Some(admin_key)).await;
    admin
        .terminate_session(pb::TerminateSessionRequest {
            selector: Some(pb::terminate_session_request::Selector::SessionToken(token.clone())),
            reason: "user_logout".into(),
        })
        .await
        .unwrap();
}

fn assert_no_secret(logs: &str, secrets: &[String], format: &str) {
    assert!(!logs.is_empty());
    for secret in secrets {
        assert!(!logs.contains(secret.as_str()), "{format} logs contain the secret {secret:?}:\n{logs}");
        // A truncated copy is a leak too.
        let tail = &secret[secret.len().saturating_sub(12)..];
        assert!(!logs.contains(tail), "{format} logs contain the end of the secret {secret:?}:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_full_flow_hold_no_secret_in_either_format() {
    let keys = ("service-key-Va8Tg3Rj6Wd1Ns5Q", "admin-key-Ce2Mx7Hp4Ly9Kb3F", "watcher-key-Ju5Dq1Zs8Gt6Re2W");
    let client_secret = "client-secret-Fk3Wn8Sb2Yh6Pq";
    for format in ["text", "json"] {
        let server = Spawn::default()
            .log_format(format)
            .env("SESSION_AUTHORITY_API_KEYS", format!("service:{},admin:{},watcher:{}", keys.0, keys.1, keys.2))
            .env("OAUTH_CLIENT_ID", "authority-client")
            .env("OAUTH_CLIENT_SECRET", client_secret)
            .env("RUST_LOG", "debug")
            .start();
        let mut flow = Flow::default();
        flow_with_every_secret(&server, keys, &mut flow).await;
        flow.secrets.extend([keys.0, keys.1, keys.2, client_secret].map(String::from));
        let (code, server) = server.terminate().await;
        assert_eq!(code, Some(0));
        let logs = server.logs();
        // The logs are in the format asked for, and the security events are in them with ids.
        let lines: Vec<&str> = logs.lines().collect();
        assert!(lines.len() > 20, "{logs}");
        let json_lines = lines.iter().filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()).count();
        match format {
            "json" => {
                let other: Vec<&&str> =
                    lines.iter().filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err()).collect();
                assert!(other.is_empty(), "lines that are not JSON: {other:#?}");
                // A line logged inside a call names the call's method through its span, and with
                // no OTLP exporter the span carries nothing else (see telemetry::grpc_span).
                let hijack: serde_json::Value = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|l| l.to_string().contains("session_hijack_attempt"))
                    .expect("the hijack attempt is logged");
                let span = hijack["span"].as_object().unwrap_or_else(|| panic!("no span on {hijack}"));
                let method = span.get("method").and_then(|m| m.as_str()).unwrap_or_default();
                assert!(method.starts_with("/atoms.session.v1."), "{hijack}");
                assert!(span.keys().all(|k| k == "method" || k == "name"), "{hijack}");
            }
            _ => assert_eq!(json_lines, 0, "text lines are not JSON"),
        }
        let hijack_logged = lines
            .iter()
            .any(|l| l.contains("security event") && l.contains("session_hijack_attempt") && l.contains("ses_"));
        assert!(hijack_logged, "the hijack attempt is logged with its type and ids:\n{logs}");
        assert_no_secret(&logs, &flow.secrets, format);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_admin_key_is_written_to_its_file_not_to_the_log() {
    let server = Spawn::default().without_keys().start();
    let key = std::fs::read_to_string(server.data_dir.join("admin.key")).unwrap();
    let key = key.trim().to_owned();
    assert!(key.len() >= 16);
    let mut sessions = server.sessions(Some(&key)).await;
    sessions.create_session(login("fay", "upstream-access-fay-Gg4Tt7", "", "")).await.unwrap();
    let (_, server) = server.terminate().await;
    assert_no_secret(&server.logs(), &[key], "json");
}

/// The refresh counters and the upstream timings, against the real OpenID Connect provider: two
/// forced refreshes count two, and a provider answering 503 until the retries run out counts one
/// failure with its cause.
#[tokio::test]
async fn refresh_counters_count_real_refreshes_and_failures() {
    let oidc = crate::oidc::Oidc::start(3600);
    let port = free_port();
    let server = Spawn::default()
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("SESSION_AUTHORITY_TOKEN_ISSUER", &oidc.issuer)
        .env("OAUTH_CLIENT_ID", &oidc.client_id)
        .env("OAUTH_CLIENT_SECRET", &oidc.client_secret)
        .env("SESSION_AUTHORITY_TOKEN_RETRY_INITIAL_DELAY", "20ms")
        .env("SESSION_AUTHORITY_TOKEN_RETRY_MAX_DELAY", "100ms")
        .start();
    let upstream = oidc.tokens("rita").await;
    let created = server
        .sessions(Some(SERVICE_KEY))
        .await
        .create_session(pb::CreateSessionRequest {
            user_id: "rita".into(),
            access_token: upstream.access_token.clone(),
            refresh_token: upstream.refresh_token.clone(),
            expires_in: Some(prost_types::Duration { seconds: upstream.expires_in, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let force = || pb::RefreshSessionRequest {
        selector: Some(pb::refresh_session_request::Selector::SessionToken(created.session_token.clone())),
        force: true,
        reason: "forced".into(),
    };
    let mut tokens = server.tokens(Some(SERVICE_KEY)).await;
    for _ in 0..2 {
        assert!(tokens.refresh_session(force()).await.unwrap().into_inner().refreshed);
    }
    // With Retry-After (refused unprocessed), so the refresh is retried.
    oidc.fail_with(serde_json::json!({"mode": "503", "count": 10, "grant_type": "refresh_token", "retry_after": 0}))
        .await;
    let failed = tokens.refresh_session(force()).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");

    let m = scrape(port);
    assert_eq!(m.value("token_refreshed_total", &[]), Some(2.0));
    assert_eq!(m.value("token_refresh_failed_total", &[("cause", "server_error")]), Some(1.0));
    let timed = |outcome: &str| {
        m.value(
            "upstream_request_seconds_count",
            &[("provider", "default"), ("endpoint", "refresh"), ("outcome", outcome)],
        )
    };
    assert_eq!(timed("ok"), Some(2.0), "each successful refresh request is timed once");
    assert!(timed("error").unwrap_or(0.0) >= 2.0, "every failed attempt (retries included) is timed");
    // Labels stay bounded: the provider's configured name, never a token or a user.
    assert_eq!(m.label_values("upstream_request_seconds_count", "provider"), ["default".to_string()].into());
}

/// Made-up method paths, under the public prefixes (no key needed to reach them) and under the
/// contract's services, are counted under the one label `unknown`: a caller cannot add a series
/// per path it invents.
#[tokio::test]
async fn unknown_method_paths_are_one_metric_label() {
    let port = free_port();
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .start();
    let made_up: Vec<(String, Option<&str>)> = (0..5)
        .flat_map(|n| {
            [
                (format!("/grpc.health.v1.Health/MadeUpHealth{n}"), None),
                (format!("/grpc.reflection.v1alpha.MadeUpReflection{n}/Info"), None),
                (format!("/atoms.session.v1.SessionService/MadeUpSession{n}"), Some(SERVICE_KEY)),
                (format!("/made.up.v{n}.Service/Method"), Some(ADMIN_KEY)),
            ]
        })
        .collect();
    for (path, key) in &made_up {
        let refused = server.call_path(path, *key).await.expect_err(path);
        assert_eq!(refused.code(), Code::Unimplemented, "{path}: {refused:?}");
    }
    // A known method keeps its own labels.
    server.call_path("/grpc.health.v1.Health/Check", None).await.unwrap();

    let m = scrape(port);
    let total = made_up.len() as f64;
    let unknown = [("grpc_service", "unknown"), ("grpc_method", "unknown")];
    assert_eq!(
        m.value("grpc_server_handled_total", &[unknown[0], unknown[1], ("grpc_code", "Unimplemented")]),
        Some(total)
    );
    assert_eq!(m.value("grpc_server_handling_seconds_count", &unknown), Some(total));
    for name in ["grpc_server_handled_total", "grpc_server_handling_seconds_count"] {
        let methods = m.label_values(name, "grpc_method");
        assert_eq!(methods, ["unknown".to_string(), "Check".to_string()].into(), "{name}");
        let services = m.label_values(name, "grpc_service");
        assert_eq!(services, ["unknown".to_string(), "grpc.health.v1.Health".to_string()].into(), "{name}");
    }
    for sample in &m.samples {
        for value in sample.labels.values() {
            assert!(
                !value.contains("MadeUp") && !value.contains("made.up"),
                "{} has label value {value:?}",
                sample.name
            );
        }
    }
}
