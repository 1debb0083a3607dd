//! The authorisation matrix: every RPC (and the by-id variants that need more than the method
//! allows) × {no key, wrong key, service, watcher, admin}, against the real binary. A caller the
//! table allows may still get a domain error (NOT_FOUND, UNIMPLEMENTED...) but never
//! UNAUTHENTICATED or PERMISSION_DENIED; every other caller gets exactly one of those two.

use session_authority::grpc::pb;
use tonic::Code;

use crate::support::{ADMIN_KEY, Process, SERVICE_KEY, Spawn, WATCHER_KEY};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Nobody,
    WrongKey,
    Service,
    Watcher,
    Admin,
}

impl Who {
    fn key(self) -> Option<&'static str> {
        match self {
            Who::Nobody => None,
            Who::WrongKey => Some("definitely-not-a-configured-key"),
            Who::Service => Some(SERVICE_KEY),
            Who::Watcher => Some(WATCHER_KEY),
            Who::Admin => Some(ADMIN_KEY),
        }
    }
}

const S: &[Who] = &[Who::Service, Who::Admin];
const A: &[Who] = &[Who::Admin];
const R: &[Who] = &[Who::Service, Who::Watcher, Who::Admin];

async fn call(server: &Process, rpc: &str, who: Who, token: &str, id: &str) -> Code {
    let key = who.key();
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let by_token = || Some(pb::get_session_request::Selector::SessionToken(token.into()));
    let by_id = || Some(pb::get_session_request::Selector::SessionId(id.into()));
    match rpc {
        "CreateSession" => code(
            server
                .sessions(key)
                .await
                .create_session(pb::CreateSessionRequest {
                    user_id: "authz".into(),
                    access_token: "a".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "ValidateSession" => code(
            server
                .sessions(key)
                .await
                .validate_session(pb::ValidateSessionRequest { session_token: token.into(), ..Default::default() })
                .await
                .map(|_| ()),
        ),
        "GetSession" => code(
            server
                .sessions(key)
                .await
                .get_session(pb::GetSessionRequest {
                    selector: by_token(),
                    device_fingerprint: None,
                    ip_address: String::new(),
                })
                .await
                .map(|_| ()),
        ),
        "GetSession(by id)" => code(
            server
                .sessions(key)
                .await
                .get_session(pb::GetSessionRequest {
                    selector: by_id(),
                    device_fingerprint: None,
                    ip_address: String::new(),
                })
                .await
                .map(|_| ()),
        ),
        "ListUserSessions" => code(
            server
                .sessions(key)
                .await
                .list_user_sessions(pb::ListUserSessionsRequest { user_id: "authz".into(), ..Default::default() })
                .await
                .map(|_| ()),
        ),
        "UpdateSession(by id)" => code(
            server
                .sessions(key)
                .await
                .update_session(pb::UpdateSessionRequest {
                    selector: Some(pb::update_session_request::Selector::SessionId(id.into())),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "UpdateSession" => code(
            server
                .sessions(key)
                .await
                .update_session(pb::UpdateSessionRequest {
                    selector: Some(pb::update_session_request::Selector::SessionToken(token.into())),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "TerminateSession(by id)" => code(
            server
                .sessions(key)
                .await
                .terminate_session(pb::TerminateSessionRequest {
                    selector: Some(pb::terminate_session_request::Selector::SessionId("ses_0000_absent".into())),
                    reason: String::new(),
                })
                .await
                .map(|_| ()),
        ),
        "TerminateSession" => code(
            server
                .sessions(key)
                .await
                .terminate_session(pb::TerminateSessionRequest {
                    selector: Some(pb::terminate_session_request::Selector::SessionToken("sat_0000_absent".into())),
                    reason: String::new(),
                })
                .await
                .map(|_| ()),
        ),
        "GetAccessToken" => code(
            server
                .tokens(key)
                .await
                .get_access_token(pb::GetAccessTokenRequest {
                    selector: Some(pb::get_access_token_request::Selector::SessionToken(token.into())),
                })
                .await
                .map(|_| ()),
        ),
        "RefreshSession" => code(
            server
                .tokens(key)
                .await
                .refresh_session(pb::RefreshSessionRequest {
                    selector: Some(pb::refresh_session_request::Selector::SessionToken(token.into())),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "IntrospectToken" => code(
            server
                .tokens(key)
                .await
                .introspect_token(pb::IntrospectTokenRequest { token: "opaque".into(), ..Default::default() })
                .await
                .map(|_| ()),
        ),
        "GetRefreshHistory" => code(
            server
                .tokens(key)
                .await
                .get_refresh_history(pb::GetRefreshHistoryRequest { session_id: id.into(), limit: 0 })
                .await
                .map(|_| ()),
        ),
        "RevokeSession" => code(
            server
                .revocations(key)
                .await
                .revoke_session(pb::RevokeSessionRequest {
                    selector: Some(pb::revoke_session_request::Selector::SessionId("ses_0000_absent".into())),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "RevokeUserSessions" => code(
            server
                .revocations(key)
                .await
                .revoke_user_sessions(pb::RevokeUserSessionsRequest {
                    user_id: "nobody-here".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "IsRevoked" => code(
            server
                .revocations(key)
                .await
                .is_revoked(pb::IsRevokedRequest { session_id: id.into(), ..Default::default() })
                .await
                .map(|_| ()),
        ),
        "ListRevocations" => code(
            server.revocations(key).await.list_revocations(pb::ListRevocationsRequest::default()).await.map(|_| ()),
        ),
        "WatchRevocations" => code(
            server.revocations(key).await.watch_revocations(pb::WatchRevocationsRequest::default()).await.map(|_| ()),
        ),
        "CheckRateLimit" => code(
            server
                .security(key)
                .await
                .check_rate_limit(pb::CheckRateLimitRequest {
                    rule_name: "token_refresh".into(),
                    key: "k".into(),
                    cost: 1,
                    consume: None,
                })
                .await
                .map(|_| ()),
        ),
        "DetectHijacking" => code(
            server
                .security(key)
                .await
                .detect_hijacking(pb::DetectHijackingRequest {
                    selector: Some(pb::detect_hijacking_request::Selector::SessionToken(token.into())),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "DetectSuspiciousActivity" => code(
            server
                .security(key)
                .await
                .detect_suspicious_activity(pb::DetectSuspiciousActivityRequest {
                    user_id: "authz".into(),
                    activity_type: "login".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "LogSecurityEvent" => code(
            server
                .security(key)
                .await
                .log_security_event(pb::LogSecurityEventRequest {
                    event_type: pb::SecurityEventType::LoginSuccess as i32,
                    user_id: "authz".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "ListSecurityEvents" => code(
            server
                .security(key)
                .await
                .list_security_events(pb::ListSecurityEventsRequest { user_id: "authz".into(), ..Default::default() })
                .await
                .map(|_| ()),
        ),
        "GetSecuritySummary" => code(
            server
                .security(key)
                .await
                .get_security_summary(pb::GetSecuritySummaryRequest { user_id: "authz".into(), hours: 0 })
                .await
                .map(|_| ()),
        ),
        other => panic!("no call for {other}"),
    }
}

const TABLE: &[(&str, &[Who])] = &[
    ("CreateSession", S),
    ("ValidateSession", S),
    ("GetSession", S),
    ("GetSession(by id)", A),
    ("ListUserSessions", A),
    ("UpdateSession", S),
    ("UpdateSession(by id)", A),
    ("TerminateSession", S),
    ("TerminateSession(by id)", A),
    ("GetAccessToken", S),
    ("RefreshSession", S),
    ("IntrospectToken", S),
    ("GetRefreshHistory", A),
    ("RevokeSession", S),
    ("RevokeUserSessions", S),
    ("IsRevoked", R),
    ("ListRevocations", R),
    ("WatchRevocations", R),
    ("CheckRateLimit", S),
    ("DetectHijacking", S),
    ("DetectSuspiciousActivity", S),
    ("LogSecurityEvent", S),
    ("ListSecurityEvents", A),
    ("GetSecuritySummary", A),
];

#[tokio::test]
async fn every_rpc_against_every_caller() {
    let server = Spawn::default().arg("--storage").arg("memory").without_create_limit().start();
    let created = server
        .sessions(Some(SERVICE_KEY))
        .await
        .create_session(pb::CreateSessionRequest {
            user_id: "authz".into(),
            access_token: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let token = created.session_token;
    let id = created.session.unwrap().session_id;
    let mut failures = Vec::new();
    let mut checked = 0;
    for (rpc, allowed) in TABLE {
        for who in [Who::Nobody, Who::WrongKey, Who::Service, Who::Watcher, Who::Admin] {
            let got = call(&server, rpc, who, &token, &id).await;
            let ok = match who {
                Who::Nobody | Who::WrongKey => got == Code::Unauthenticated,
                _ if allowed.contains(&who) => !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
                _ => got == Code::PermissionDenied,
            };
            checked += 1;
            if !ok {
                failures.push(format!("{rpc} as {who:?}: got {got:?}"));
            }
        }
    }
    assert_eq!(checked, TABLE.len() * 5);
    assert!(failures.is_empty(), "authorisation matrix failures:\n{}", failures.join("\n"));
}

/// Paths the server does not serve, among them a method of one service under the name of
/// another (an admin-only name, a watcher name) and an unknown method under each public prefix.
const UNKNOWN_METHODS: &[&str] = &[
    "/atoms.session.v1.SessionService/NoSuchMethod",
    "/atoms.session.v1.TokenService/ListUserSessions",
    "/atoms.session.v1.SecurityService/GetRefreshHistory",
    "/atoms.session.v1.SessionService/IsRevoked",
    "/atoms.session.v1.NoSuchService/ValidateSession",
    "/atoms.session.v1.SessionService/ValidateSession/extra",
    "/grpc.health.v1.Health/NoSuchMethod",
    "/grpc.reflection.v1.ServerReflection/NoSuchMethod",
    "/grpc.reflection.v1alpha.Made/Up",
];

#[tokio::test]
async fn unknown_methods_are_unimplemented_and_never_get_a_role() {
    let server = Spawn::default().arg("--storage").arg("memory").start();
    let mut failures = Vec::new();
    for path in UNKNOWN_METHODS {
        for who in [Who::Nobody, Who::WrongKey, Who::Service, Who::Watcher, Who::Admin] {
            match server.call_path(path, who.key()).await {
                Err(status) if status.code() == Code::Unimplemented => {
                    if !status.message().contains(path) {
                        failures.push(format!("{path} as {who:?}: the message does not name the path: {status:?}"));
                    }
                }
                other => failures.push(format!("{path} as {who:?}: got {other:?}")),
            }
        }
    }
    assert!(failures.is_empty(), "unknown methods not refused as UNIMPLEMENTED:\n{}", failures.join("\n"));
}
