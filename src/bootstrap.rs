//! Secure first run: the API keys and the encryption key ring the server starts with.
//!
//! With no API key configured, the server generates an admin key, writes it once to
//! `<data-dir>/admin.key` (mode 0600) for the operator, and keeps only its digest
//! (`<data-dir>/admin.key.sha256`), which later starts reuse. With no encryption key configured,
//! the embedded store generates one into `<data-dir>/encryption.key` and warns; shared backends
//! refuse to start, since every replica must seal with the same key. The memory store persists
//! nothing: it generates ephemeral keys and prints the admin key.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::SecretString;

use crate::config::{Config, ConfigError, Role, StorageKind};
use crate::crypto::{self, KeyRing};
use crate::grpc::auth::ApiKeys;

/// What the server starts with.
#[derive(Debug)]
pub struct Secrets {
    /// Accepted API keys.
    pub api_keys: ApiKeys,
    /// The encryption key ring.
    pub key_ring: Arc<KeyRing>,
}

fn problem(setting: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("setting `{setting}`: {message}"))
}

/// Creates the data directory (mode 0700) if it does not exist.
pub fn ensure_data_dir(dir: &Path) -> Result<(), ConfigError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| problem("data_dir", format!("cannot create {}: {e}", dir.display())))
}

/// Writes `contents` to a new file readable only by the owner; fails if it exists.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// Re-reads the accepted API keys from a freshly loaded configuration (SIGHUP) into the live
/// set. With no key configured, an embedded or shared store keeps accepting its generated admin
/// key (read back from the data directory, never regenerated); the memory store keeps the keys
/// it has. Returns how many keys are accepted now.
pub fn reload_api_keys(config: &Config, live: &ApiKeys) -> Result<usize, ConfigError> {
    let fresh = ApiKeys::from_config(&config.auth);
    if fresh.is_empty() {
        if config.storage.kind == StorageKind::Memory {
            return Ok(live.len());
        }
        let digest = first_run_admin_key(&config.storage.data_dir)?;
        fresh.add("generated-admin", Role::Admin, digest);
    }
    live.replace_with(&fresh);
    Ok(live.len())
}

/// Resolves API keys and the key ring for `config`, generating first-run keys as described in
/// the module documentation.
pub fn prepare(config: &Config) -> Result<Secrets, ConfigError> {
    let api_keys = ApiKeys::from_config(&config.auth);
    let kind = config.storage.kind;
    if kind != StorageKind::Memory {
        ensure_data_dir(&config.storage.data_dir)?;
    }
    if api_keys.is_empty() {
        if kind == StorageKind::Memory {
            let key = crypto::new_api_key();
            api_keys.add("ephemeral-admin", Role::Admin, crypto::sha256(key.as_bytes()));
            eprintln!(
                "session-authority: no API keys configured; ephemeral admin key for this process (memory storage persists nothing): {key}"
            );
        } else {
            let digest = first_run_admin_key(&config.storage.data_dir)?;
            api_keys.add("generated-admin", Role::Admin, digest);
        }
    }
    let key_ring = Arc::new(key_ring(config)?);
    Ok(Secrets { api_keys, key_ring })
}

fn first_run_admin_key(dir: &Path) -> Result<[u8; 32], ConfigError> {
    let digest_path = dir.join("admin.key.sha256");
    match std::fs::read_to_string(&digest_path) {
        Ok(text) => {
            return crate::config::parse_key_hash(&text)
                .ok_or_else(|| problem("api_keys", format!("{} is not a sha256:<hex> digest", digest_path.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(problem("api_keys", format!("cannot read {}: {e}", digest_path.display())));
        }
    }
    let key = crypto::new_api_key();
    let key_path: PathBuf = dir.join("admin.key");
    write_private(&key_path, &format!("{key}\n"))
        .map_err(|e| problem("api_keys", format!("cannot write {}: {e}", key_path.display())))?;
    write_private(&digest_path, &format!("{}\n", crypto::api_key_hash_string(&key)))
        .map_err(|e| problem("api_keys", format!("cannot write {}: {e}", digest_path.display())))?;
    // Through the log (so JSON logs stay one object per line); the key itself is only in the file.
    tracing::warn!(
        path = %key_path.display(),
        "no API keys configured; generated an admin key into {} (mode 0600). \
         Move it to your secret store and delete the file: the server keeps only its hash.",
        key_path.display()
    );
    Ok(crypto::sha256(key.as_bytes()))
}

fn key_ring(config: &Config) -> Result<KeyRing, ConfigError> {
    let decode = |secret: &SecretString, setting: &str| {
        crypto::decode_key(secret)
            .map_err(|e| problem(setting, format!("(SESSION_AUTHORITY_{}) {e}", setting.to_uppercase())))
    };
    let previous = config
        .auth
        .previous_encryption_keys
        .iter()
        .map(|k| decode(k, "previous_encryption_keys"))
        .collect::<Result<Vec<_>, _>>()?;
    let current = match &config.auth.encryption_key {
        Some(secret) => decode(secret, "encryption_key")?,
        None => match config.storage.kind {
            StorageKind::Redis | StorageKind::KvRest => {
                return Err(problem(
                    "encryption_key",
                    "required with shared storage: every replica must seal with the same key; make one with `session-authority gen-key` and give it to every replica as SESSION_AUTHORITY_ENCRYPTION_KEY",
                ));
            }
            StorageKind::Memory => {
                tracing::warn!("no encryption key configured; using an ephemeral one (memory storage)");
                crypto::random_bytes()
            }
            StorageKind::Embedded => generated_encryption_key(&config.storage.data_dir)?,
        },
    };
    Ok(KeyRing::new(&current, &previous))
}

fn generated_encryption_key(dir: &Path) -> Result<[u8; 32], ConfigError> {
    let path = dir.join("encryption.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => crypto::decode_key(&SecretString::from(text))
            .map_err(|e| problem("encryption_key", format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = crypto::random_bytes();
            write_private(&path, &format!("{}\n", crypto::encode_key(&key)))
                .map_err(|e| problem("encryption_key", format!("cannot write {}: {e}", path.display())))?;
            tracing::warn!(
                path = %path.display(),
                "no encryption key configured; generated one into {}. \
                 Production should supply its own in SESSION_AUTHORITY_ENCRYPTION_KEY (base64, 32 bytes).",
                path.display()
            );
            Ok(key)
        }
        Err(e) => Err(problem("encryption_key", format!("cannot read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;
    use std::os::unix::fs::PermissionsExt as _;

    fn config(dir: &Path, storage: &str) -> Config {
        let flags: Flags = [("data_dir", dir.to_str().unwrap()), ("storage", storage)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(&flags, &|name| (name == "REDIS_URL").then(|| "redis://127.0.0.1:1".to_string())).unwrap()
    }

    #[test]
    fn first_run_generates_keys_once_and_keeps_only_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = prepare(&config(dir.path(), "embedded")).unwrap();
        let key = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
        let key = key.trim();
        assert_eq!(secrets.api_keys.authenticate(key).unwrap().role, Role::Admin);
        let mode = std::fs::metadata(dir.path().join("admin.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.path().join("encryption.key")).unwrap().permissions().mode() & 0o777, 0o600);

        // The operator moves the key away; the next start still accepts it, and makes no new one.
        std::fs::remove_file(dir.path().join("admin.key")).unwrap();
        let again = prepare(&config(dir.path(), "embedded")).unwrap();
        assert!(again.api_keys.authenticate(key).is_some());
        assert!(!dir.path().join("admin.key").exists());
        assert_eq!(again.key_ring.current_key_id(), secrets.key_ring.current_key_id());
    }

    #[test]
    fn shared_storage_requires_an_encryption_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = prepare(&config(dir.path(), "redis")).unwrap_err().to_string();
        assert!(e.contains("encryption_key"), "{e}");
    }

    #[test]
    fn memory_storage_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("never");
        let secrets = prepare(&config(&data, "memory")).unwrap();
        assert_eq!(secrets.api_keys.len(), 1);
        assert!(!data.exists());
    }
}
