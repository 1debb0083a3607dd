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
