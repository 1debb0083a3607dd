//! SessionService through the real binary: the cap under concurrency over gRPC, durability
//! across SIGKILL, secrets at rest, and who may act on a session by id.

use session_authority::grpc::pb;
use tonic::Code;

use crate::support::{ADMIN_KEY, Process, SERVICE_KEY, Spawn};

fn create(user: &str, access: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user.into(),
        access_token: access.into(),
        expires_in: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
        ip_address: "198.51.100.7".into(),
        ..Default::default()
    }
}

async fn active_sessions(server: &Process, user: &str) -> usize {
    let mut admin = server.sessions(Some(ADMIN_KEY)).await;
    let response = admin
        .list_user_sessions(pb::ListUserSessionsRequest { user_id: user.into(), page_size: 500, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(response.sessions.iter().all(|s| s.state == pb::SessionState::Active as i32));
    response.sessions.len()
}

async fn fifty_concurrent_creates_leave_the_cap(server: Process) {
    let client = server.sessions(Some(SERVICE_KEY)).await;
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { client.create_session(create("racer", &format!("at-{i}"))).await })
        })
        .collect();
    let mut evicted = 0;
    for call in calls {
        evicted += call.await.unwrap().unwrap().into_inner().evicted_session_ids.len();
    }
    assert_eq!(active_sessions(&server, "racer").await, 5);
    assert_eq!(evicted, 45);
}

#[tokio::test]
async fn fifty_concurrent_creates_leave_exactly_the_cap_on_memory() {
    fifty_concurrent_creates_leave_the_cap(
        Spawn::default().arg("--storage").arg("memory").without_create_limit().start(),
    )
    .await;
}

#[tokio::test]
async fn fifty_concurrent_creates_leave_exactly_the_cap_on_embedded() {
    fifty_concurrent_creates_leave_the_cap(
        Spawn::default().arg("--storage").arg("embedded").without_create_limit().start(),
    )
    .await;
}

#[tokio::test]
async fn acknowledged_sessions_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Spawn::default()
        .data_dir(&data)
        .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", "1000")
        .without_create_limit()
        .start();
    let client = server.sessions(Some(SERVICE_KEY)).await;
    let mut tokens = Vec::new();
    for batch in 0..20 {
        let calls: Vec<_> = (0..50)
            .map(|i| {
                let mut client = client.clone();
                let user = format!("user-{}", (batch * 50 + i) % 37);
                tokio::spawn(async move { client.create_session(create(&user, "access")).await })
            })
            .collect();
        for call in calls {
            tokens.push(call.await.unwrap().unwrap().into_inner().session_token);
        }
    }
    assert_eq!(tokens.len(), 1000);
    server.signal("KILL");
    drop(server);

    let restarted = Spawn::default().data_dir(&data).start();
    let client = restarted.sessions(Some(SERVICE_KEY)).await;
    let checks: Vec<_> = tokens
        .chunks(100)
        .map(|chunk| {
            let mut client = client.clone();
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                let mut valid = 0;
                for token in chunk {
                    let response = client
                        .validate_session(pb::ValidateSessionRequest { session_token: token, ..Default::default() })
                        .await
                        .unwrap()
                        .into_inner();
                    valid += usize::from(response.valid);
                }
                valid
            })
        })
        .collect();
    let mut valid = 0;
    for check in checks {
        valid += check.await.unwrap();
    }
    assert_eq!(valid, 1000, "every acknowledged session validates after SIGKILL and restart");
}

#[tokio::test]
async fn the_data_directory_holds_no_token_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Spawn::default().data_dir(&data).without_create_limit().start();
    let mut client = server.sessions(Some(SERVICE_KEY)).await;
    let mut secrets = Vec::new();
    for i in 0..20 {
        let access = format!("ACCESS-{i}-9d8c7b6a5f4e3d2c1b0a");
        let refresh = format!("REFRESH-{i}-0a1b2c3d4e5f6a7b8c9d");
        let id = format!("IDTOKEN-{i}-ffeeddccbbaa99887766");
        let mut request = create("secretive", &access);
        request.refresh_token = refresh.clone();
        request.id_token = id.clone();
        let response = client.create_session(request).await.unwrap().into_inner();
        secrets.extend([access, refresh, id, response.session_token]);
    }
    drop(client);
    let (code, _server) = server.terminate().await;
    assert_eq!(code, Some(0));

    let mut files = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        for secret in &secrets {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{} contains a secret in the clear", path.display());
        }
    }
    assert!(files >= 2, "the store and the key files exist");
    assert!(data.join("sessions.redb").exists());
}

#[tokio::test]
async fn acting_by_session_id_needs_the_admin_role() {
    let server = Spawn::default().arg("--storage").arg("memory").start();
    let mut service = server.sessions(Some(SERVICE_KEY)).await;
    let created = service.create_session(create("olga", "at")).await.unwrap().into_inner();
    let id = created.session.unwrap().session_id;

    let by_id = || pb::GetSessionRequest {
        selector: Some(pb::get_session_request::Selector::SessionId(id.clone())),
        device_fingerprint: None,
        ip_address: String::new(),
    };
    let e = service.get_session(by_id()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut admin = server.sessions(Some(ADMIN_KEY)).await;
    let session = admin.get_session(by_id()).await.unwrap().into_inner().session.unwrap();
    assert_eq!(session.user_id, "olga");

    let terminate = pb::TerminateSessionRequest {
        selector: Some(pb::terminate_session_request::Selector::SessionId(id.clone())),
        reason: String::new(),
    };
    assert_eq!(service.terminate_session(terminate.clone()).await.unwrap_err().code(), Code::PermissionDenied);
    let ended = admin.terminate_session(terminate).await.unwrap().into_inner();
    assert_eq!(ended.session.unwrap().end_reason, "admin_termination");
    let validation = service
        .validate_session(pb::ValidateSessionRequest { session_token: created.session_token, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!validation.valid);
    assert_eq!(validation.reason, pb::InvalidReason::Terminated as i32);

    let e = admin
        .get_session(pb::GetSessionRequest {
            selector: Some(pb::get_session_request::Selector::SessionId("ses_0000_missing".into())),
            device_fingerprint: None,
            ip_address: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// A session created with the tests' laptop, and a client for it.
async fn session_with_a_device(
    server: &Process,
) -> (
    pb::session_service_client::SessionServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, crate::support::Auth>,
    >,
    String,
) {
    let mut client = server.sessions(Some(SERVICE_KEY)).await;
    let mut request = create("nadia", "at");
    request.device_fingerprint = Some(crate::support::laptop("UA/1"));
    let created = client.create_session(request).await.unwrap().into_inner();
    assert!(created.session.unwrap().has_device_fingerprint);
    (client, created.session_token)
}

fn validate_with(token: &str, fingerprint: Option<pb::DeviceFingerprint>) -> pb::ValidateSessionRequest {
    pb::ValidateSessionRequest { session_token: token.into(), device_fingerprint: fingerprint, ..Default::default() }
}

fn get_with(token: &str, fingerprint: Option<pb::DeviceFingerprint>) -> pb::GetSessionRequest {
    pb::GetSessionRequest {
        selector: Some(pb::get_session_request::Selector::SessionToken(token.into())),
        device_fingerprint: fingerprint,
        ip_address: String::new(),
    }
}

/// Issue 16 point 14: a presented fingerprint with no field set, on a session that stored one,
/// is a device mismatch (ValidateSession) and a refused device check (GetSession), not a pass.
/// No fingerprint at all is still no device check, and a session without a stored device has
/// nothing to compare.
#[tokio::test]
async fn an_empty_fingerprint_on_a_session_with_one_is_a_mismatch() {
    let server = Spawn::default().arg("--storage").arg("memory").start();
    let (mut client, token) = session_with_a_device(&server).await;

    let empty = Some(pb::DeviceFingerprint::default());
    let answer = client.validate_session(validate_with(&token, empty.clone())).await.unwrap().into_inner();
    assert!(!answer.valid, "{answer:?}");
    assert_eq!(answer.reason, pb::InvalidReason::DeviceMismatch as i32, "{answer:?}");
    let e = client.get_session(get_with(&token, empty.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("device"), "{}", e.message());

    // The device itself still matches, and presenting none is no device check.
    let same = Some(crate::support::laptop("UA/1"));
    assert!(client.validate_session(validate_with(&token, same)).await.unwrap().into_inner().valid);
    assert!(client.validate_session(validate_with(&token, None)).await.unwrap().into_inner().valid);

    // A session that stored no device: an empty one has nothing to mismatch.
    let bare = client.create_session(create("nadia", "at2")).await.unwrap().into_inner().session_token;
    assert!(client.validate_session(validate_with(&bare, empty.clone())).await.unwrap().into_inner().valid);
    client.get_session(get_with(&bare, empty)).await.unwrap();
}

/// `session.device_fingerprint_required = false` restores the earlier rule: an empty presented
/// fingerprint skips the device check.
#[tokio::test]
async fn an_empty_fingerprint_passes_with_device_fingerprint_required_off() {
    // In the file, where an unknown key is refused: the setting exists.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[session]\ndevice_fingerprint_required = false\n").unwrap();
    let server = Spawn::default().arg("--storage").arg("memory").arg("--config").arg(config.to_str().unwrap()).start();
    let (mut client, token) = session_with_a_device(&server).await;
    let empty = Some(pb::DeviceFingerprint::default());
    let answer = client.validate_session(validate_with(&token, empty.clone())).await.unwrap().into_inner();
    assert!(answer.valid, "{answer:?}");
    client.get_session(get_with(&token, empty)).await.unwrap();
    // A different device is still a mismatch.
    let answer = client
        .validate_session(validate_with(&token, Some(crate::support::thief_device())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.reason, pb::InvalidReason::DeviceMismatch as i32, "{answer:?}");
}
