//! API keys rotate without a restart: SIGHUP re-reads the configuration file.

use std::time::Duration;

use session_authority::grpc::pb;
use tonic::Code;

use crate::support::{Process, Spawn};

fn key_file(path: &std::path::Path, key: &str) {
    let hash = session_authority::crypto::api_key_hash_string(key);
    std::fs::write(
        path,
        format!("storage = \"memory\"\n[[api_keys]]\nname = \"backend\"\nrole = \"service\"\nhash = \"{hash}\"\n"),
    )
    .unwrap();
}

async fn code_with(server: &Process, key: &str) -> Code {
    let request = pb::ValidateSessionRequest { session_token: "sat_0000_x".into(), ..Default::default() };
    match server.sessions(Some(key)).await.validate_session(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn eventually(server: &Process, key: &str, want: Code) -> bool {
    for _ in 0..100 {
        if code_with(server, key).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn sighup_rotates_keys_and_a_broken_file_keeps_the_current_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("authority.toml");
    let old_key = "old-service-key-000000000001";
    let new_key = "new-service-key-000000000002";
    key_file(&config, old_key);
    let server = Spawn::default().without_keys().arg("--config").arg(config.to_str().unwrap()).start();
    assert_eq!(code_with(&server, old_key).await, Code::Ok);
    assert_eq!(code_with(&server, new_key).await, Code::Unauthenticated);

    key_file(&config, new_key);
    server.signal("HUP");
    assert!(eventually(&server, new_key, Code::Ok).await, "the new key is accepted after SIGHUP");
    assert_eq!(code_with(&server, old_key).await, Code::Unauthenticated, "the old key is gone");

    std::fs::write(&config, "this is not toml [").unwrap();
    server.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(code_with(&server, new_key).await, Code::Ok, "a broken reload keeps the current keys");
    assert!(
        (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            server.logs().contains("configuration reload failed")
        }),
        "the failed reload is reported"
    );
}
