//! TLS and mTLS with rustls: certificates made by rcgen, the real binary, tonic clients.

use session_authority::grpc::pb;
use session_authority::grpc::pb::session_service_client::SessionServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::{ADMIN_KEY, Auth, Process, SERVICE_KEY, Spawn};

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert =
        CertificateParams::new(vec!["backend.test".to_string()]).unwrap().signed_by(&client_key, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    Pki { dir, ca_pem: ca_cert.pem(), client_cert_pem: client_cert.pem(), client_key_pem: client_key.serialize_pem() }
}

fn tls_server(pki: &Pki, mutual: bool) -> Process {
    let path = |name: &str| pki.dir.path().join(name).to_str().unwrap().to_owned();
    let mut spawn = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .env("SESSION_AUTHORITY_TLS_CERT", path("server.pem"))
        .env("SESSION_AUTHORITY_TLS_KEY", path("server.key"));
    if mutual {
        spawn = spawn.env("SESSION_AUTHORITY_TLS_CLIENT_CA", path("ca.pem"));
    }
    spawn.start()
}

async fn tls_channel(server: &Process, pki: &Pki, with_client_cert: bool) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client_cert_pem, &pki.client_key_pem));
    }
    Channel::from_shared(format!("https://localhost:{}", server.addr.port())).unwrap().tls_config(tls)?.connect().await
}

fn create() -> pb::CreateSessionRequest {
    pb::CreateSessionRequest { user_id: "tls-user".into(), access_token: "at".into(), ..Default::default() }
}

fn list() -> pb::ListUserSessionsRequest {
    pb::ListUserSessionsRequest { user_id: "tls-user".into(), ..Default::default() }
}

#[tokio::test]
async fn tls_serves_and_still_requires_a_key() {
    let pki = pki();
    let server = tls_server(&pki, false);
    let channel = tls_channel(&server, &pki, false).await.unwrap();
    let mut anonymous = SessionServiceClient::with_interceptor(channel.clone(), Auth::new(None));
    assert_eq!(anonymous.create_session(create()).await.unwrap_err().code(), Code::Unauthenticated);
    let mut service = SessionServiceClient::with_interceptor(channel, Auth::new(Some(SERVICE_KEY)));
    let created = service.create_session(create()).await.unwrap().into_inner();
    assert!(created.session_token.starts_with("sat_"));

    // A plaintext client cannot talk to the TLS port.
    let plain = Channel::from_shared(server.url()).unwrap().connect().await;
    if let Ok(channel) = plain {
        let mut client = SessionServiceClient::with_interceptor(channel, Auth::new(Some(SERVICE_KEY)));
        assert!(client.create_session(create()).await.is_err());
    }
}

#[tokio::test]
async fn mtls_grants_the_certificate_role_and_keys_still_raise_it() {
    let pki = pki();
    let server = tls_server(&pki, true);
    let channel = tls_channel(&server, &pki, true).await.unwrap();

    // A verified client certificate alone authenticates as the configured role (service).
    let mut by_cert = SessionServiceClient::with_interceptor(channel.clone(), Auth::new(None));
    by_cert.create_session(create()).await.unwrap();
    assert_eq!(by_cert.list_user_sessions(list()).await.unwrap_err().code(), Code::PermissionDenied);

    // A bearer key over the same connection is what decides the role when present.
    let mut admin = SessionServiceClient::with_interceptor(channel, Auth::new(Some(ADMIN_KEY)));
    assert_eq!(admin.list_user_sessions(list()).await.unwrap().into_inner().sessions.len(), 1);
    let mut wrong = SessionServiceClient::with_interceptor(
        tls_channel(&server, &pki, true).await.unwrap(),
        Auth::new(Some("not-a-valid-key-000000")),
    );
    assert_eq!(wrong.create_session(create()).await.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate() {
    let pki = pki();
    let server = tls_server(&pki, true);
    let refused = match tls_channel(&server, &pki, false).await {
        Err(_) => true,
        Ok(channel) => {
            let mut client = SessionServiceClient::with_interceptor(channel, Auth::new(Some(ADMIN_KEY)));
            client.create_session(create()).await.is_err()
        }
    };
    assert!(refused, "a client without a certificate must not get through mTLS");
}
