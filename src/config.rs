//! Configuration: one struct per component, resolved from command-line flags, the environment
//! and an optional TOML file, in that order of precedence, and validated before anything binds.
//!
//! Every setting has a dotted name (`session.idle_timeout`), which is also its TOML path; its
//! environment variable is `SESSION_AUTHORITY_` plus the name in upper case with dots as
//! underscores, and a few settings also answer to the names the integration guide uses
//! (`REDIS_URL`, `KV_REST_API_URL`, ...). Errors name the setting and where its value came from,
//! in one line. The process environment is read only through the lookup function handed to
//! [`Config::load`], so tests pass a map.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use crate::model::RecordFormat;
use crate::revocation::RevocationSettings;
use crate::security::SecuritySettings;
use crate::security::hijack::HijackRules;
use crate::security::limiter::{Backoff, Rule};
use crate::session::SessionSettings;
use crate::token::TokenSettings;
use crate::token::provider::ProviderSettings;
use crate::token::retry::RetryPolicy;

mod resolve;

pub use resolve::*;

pub use crate::error::ConfigError;

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// Which storage backend holds sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// The durable embedded store in the data directory (default).
    Embedded,
    /// Process memory: for tests and ephemeral use.
    Memory,
    /// Redis or Redis Cluster.
    Redis,
    /// Vercel KV / Upstash over its REST API.
    KvRest,
}

impl StorageKind {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Embedded => "embedded",
            StorageKind::Memory => "memory",
            StorageKind::Redis => "redis",
            StorageKind::KvRest => "kv-rest",
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (default).
    Text,
    /// One JSON object per line.
    Json,
}

/// A caller role. Roles are not hierarchical except that `admin` may call everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Backends: create, validate and end sessions, get tokens, check limits.
    Service,
    /// Operators: everything, including listing and acting on sessions by id.
    Admin,
    /// Sidecars: read the revocation list and watch it.
    Watcher,
    /// Proxies (Envoy): the ext_authz `Check` and rate-limit `ShouldRateLimit` services, and
    /// reading the revocation feed a caching sidecar needs; nothing that creates or ends.
    Proxy,
}

impl Role {
    /// Parses a role name as written in configuration.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "service" => Some(Role::Service),
            "admin" => Some(Role::Admin),
            "watcher" => Some(Role::Watcher),
            "proxy" => Some(Role::Proxy),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Admin => "admin",
            Role::Watcher => "watcher",
            Role::Proxy => "proxy",
        }
    }
}

/// One configured API key: its SHA-256 digest, never the key itself.
#[derive(Debug, Clone)]
pub struct ApiKeyEntry {
    /// A name for logs and metrics ("payments-backend").
    pub name: String,
    /// What the key may do.
    pub role: Role,
    /// SHA-256 of the key's UTF-8 bytes.
    pub sha256: [u8; 32],
}

/// Transport security.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the server.
    pub key_pem: Vec<u8>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    pub client_ca_pem: Option<Vec<u8>>,
    /// Role granted to a caller authenticated by a client certificate alone.
    pub client_cert_role: Role,
}

/// The gRPC server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Longest time one unary call (or the start of a stream) may take.
    pub request_timeout: Duration,
    /// Calls in flight at once across all connections; more are refused with RESOURCE_EXHAUSTED.
    pub concurrency_limit: usize,
    /// `grpc.health.v1.Health/Watch` streams open at once; more are refused with
    /// RESOURCE_EXHAUSTED. Health needs no key and is never shed, so this is its only bound.
    pub max_health_watch_streams: usize,
    /// Reflection streams (v1 and v1alpha together) open at once; more are refused with
    /// RESOURCE_EXHAUSTED. Reflection needs no key, and a client may hold its stream open.
    pub max_reflection_streams: usize,
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// How long shutdown waits for in-flight calls before it gives up on them.
    pub shutdown_grace: Duration,
    /// TLS, when configured.
    pub tls: Option<TlsConfig>,
}

/// Storage selection and backend settings.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The backend.
    pub kind: StorageKind,
    /// Directory of the embedded store and of generated keys.
    pub data_dir: PathBuf,
    /// Redis URL (`REDIS_URL`).
    pub redis_url: Option<String>,
    /// Prefix of every Redis / KV key.
    pub key_prefix: String,
    /// Vercel KV / Upstash REST URL (`KV_REST_API_URL`).
    pub kv_rest_url: Option<String>,
    /// Vercel KV / Upstash REST token (`KV_REST_API_TOKEN`).
    pub kv_rest_token: Option<SecretString>,
    /// Longest time one storage operation may take before the call fails UNAVAILABLE.
    pub operation_timeout: Duration,
    /// Keys of live state one rate-limit rule may hold in a backend that keeps limiter state in
    /// this process (memory) or its data directory (embedded); at the bound new keys are refused
    /// (`security.max_limiter_keys`).
    pub max_limiter_keys: usize,
    /// Bytes of database pages the embedded store keeps in memory (`embedded.cache_mb`); pages
    /// beyond it are read from the file again (from the OS page cache, one syscall each).
    pub embedded_cache_bytes: usize,
    /// How Redis and kv-rest write session records (`redis.record_format`): JSON, which every
    /// earlier build reads, unless set to binary. Both are always read. The embedded store
    /// always writes binary.
    pub record_format: RecordFormat,
    /// Why this backend: where `storage` was set, or the variable that chose it when it was not.
    pub chosen_by: String,
}

/// `embedded.cache_mb` in bytes: at least 1 MiB, and not more than this machine can address.
fn embedded_cache_bytes(mb: usize) -> Result<usize, ConfigError> {
    if mb == 0 {
        return Err(err("setting `embedded.cache_mb`: must be at least 1"));
    }
    mb.checked_mul(1024 * 1024)
        .ok_or_else(|| err(format!("setting `embedded.cache_mb`: {mb} MiB is more than this machine can address")))
}

/// The fields of a `[token.providers.NAME]` table.
const PROVIDER_FIELDS: &[&str] = &[
    "client_id",
    "client_secret",
    "token_endpoint",
    "introspection_endpoint",
    "revocation_endpoint",
    "issuer",
    "client_auth",
];

/// The provider name of a `token.providers.NAME.FIELD` key whose field is known.
fn provider_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("token.providers.")?;
    let (name, field) = rest.rsplit_once('.')?;
    let valid_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (valid_name && PROVIDER_FIELDS.contains(&field)).then_some(name)
}

/// The Envoy integration: how the ext_authz `Check` reads a request and what it adds to it, and
/// how rate-limit descriptors name our rules.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyConfig {
    /// The cookie holding the session token (`Authorization: Bearer` is read first).
    pub cookie: String,
    /// Proxies whose `x-forwarded-for` entries are trusted, as Envoy's `xff_num_trusted_hops`
    /// counts them; `None`: the client is the source address Envoy reports.
    pub trusted_hops: Option<usize>,
    /// The request header that carries the user id upstream.
    pub user_id_header: String,
    /// The request header that carries the session id upstream.
    pub session_id_header: String,
    /// Put the session's upstream access token (refreshed when due) into `authorization`.
    pub forward_access_token: bool,
    /// The descriptor entry whose value names the rule.
    pub rule_entry: String,
    /// The descriptor entry whose value is the limiter key; without it, the other entries.
    pub key_entry: String,
}

/// The fields of a `[security.rules.NAME]` table.
const RULE_FIELDS: &[&str] = &["limit", "period", "burst", "backoff", "backoff_multiplier", "max_backoff"];

/// The rule name of a `security.rules.NAME.FIELD` key whose field is known.
fn rule_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("security.rules.")?;
    let (name, field) = rest.rsplit_once('.')?;
    let valid_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (valid_name && RULE_FIELDS.contains(&field)).then_some(name)
}

/// Caller authentication and encryption at rest.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Hashed API keys from the config file.
    pub api_keys: Vec<ApiKeyEntry>,
    /// Plaintext keys from `SESSION_AUTHORITY_API_KEYS` ("role:key,role:key"), for development.
    pub plaintext_api_keys: Vec<(Role, SecretString)>,
    /// The current encryption key (base64 of 32 bytes), if configured.
    pub encryption_key: Option<SecretString>,
    /// Earlier encryption keys, still accepted for decryption during a rotation.
    pub previous_encryption_keys: Vec<SecretString>,
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gRPC server.
    pub server: ServerConfig,
    pub storage: StorageConfig,
    /// Session lifecycle.
    pub session: SessionSettings,
    /// Upstream token work.
    pub token: TokenSettings,
    /// Every configured OAuth2 provider: `default` from the flat `token.*` settings (when they
    /// name a token endpoint or an issuer), then each `[token.providers.NAME]`.
    pub providers: Vec<ProviderSettings>,
    pub revocation: RevocationSettings,
    pub security: SecuritySettings,
    /// Callers and keys.
    pub auth: AuthConfig,
    /// The Envoy ext_authz and rate-limit services.
    pub envoy: EnvoyConfig,
    /// Address of the Prometheus `/metrics` listener; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Every setting resolution read (dotted names), for [`Config::unread_env_vars`].
    pub settings_read: BTreeSet<String>,
}

/// Variables with our prefix that are no setting: the config file's path, the test clock, and
/// the clients' key variables (the load generator and the examples read them, and they may
/// share the server's environment).
const OTHER_ENV_VARS: &[&str] = &[
    "SESSION_AUTHORITY_CONFIG",
    "SESSION_AUTHORITY_CLOCK_OFFSET",
    "SESSION_AUTHORITY_KEY",
    "SESSION_AUTHORITY_PROXY_KEY",
];

/// Health Watch streams one replica serves at once unless configured
/// (`server.max_health_watch_streams`). Probes poll `Check`; `Watch` is for clients that use
/// gRPC client-side health checking (one stream per channel to this replica), so this leaves
/// room for thousands of them while bounding what callers without a key can hold open.
pub const DEFAULT_MAX_HEALTH_WATCH_STREAMS: usize = 4096;

/// Reflection streams one replica serves at once unless configured
/// (`server.max_reflection_streams`). Reflection is for tools (`grpcurl`, IDEs), whose streams
/// last one command; this bounds what callers without a key can hold open.
pub const DEFAULT_MAX_REFLECTION_STREAMS: usize = 256;

/// Settings given on the command line, by dotted name.
pub type Flags = BTreeMap<String, String>;

impl Config {
    /// Resolves the configuration from command-line `flags`, the environment seen through
    /// `env`, and the TOML file named by the `config` flag or `SESSION_AUTHORITY_CONFIG`.
    pub fn load(flags: &Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let config_path = flags.get("config").cloned().or_else(|| env("SESSION_AUTHORITY_CONFIG"));
        let mut file = BTreeMap::new();
        let mut api_keys = Vec::new();
        let mut file_name = String::from("config file");
        if let Some(path) = config_path {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| err(format!("setting `config`: cannot read {path:?}: {e}")))?;
            let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                err(format!("setting `config`: {path:?} is not valid TOML: {}", e.message()))
            })?;
            if let Some(keys) = table.remove("api_keys") {
                let array = keys.as_array().ok_or_else(|| err("setting `api_keys`: expected [[api_keys]] tables"))?;
                for (index, value) in array.iter().enumerate() {
                    api_keys.push(parse_api_key_table(index, value)?);
                }
            }
            flatten("", table, &mut file)?;
            if file.contains_key("token.rotation") {
                // It never did anything: a rotated refresh token is always stored (dropping it
                // would leave a spent one), and the old one is kept when the provider sends none.
                return Err(err(format!(
                    "setting `token.rotation` in {path:?} was removed: a rotated refresh token is always stored and the old one kept when the provider sends none; delete the setting"
                )));
            }
            file_name = format!("config file {path:?}");
        }
        let r = Resolver { flags, env, file, file_name, asked: Default::default() };
        let config = Config::resolve(&r, api_keys)?;
        // Resolving asked for every setting there is, so a file key it never asked for is a typo
        // or a setting of another version: an error, instead of a silently kept default.
        let asked = r.asked.borrow();
        if let Some(unknown) = r.file.keys().find(|k| !asked.contains(k.as_str())) {
            return Err(err(format!("setting `{unknown}` in the {} is not a known setting", r.file_name)));
        }
        Ok(Config { settings_read: asked.clone(), ..config })
    }

    /// Of the environment variables `names`, those with the `SESSION_AUTHORITY_` prefix that no
    /// setting of this configuration reads: a typo, a setting of another version, or a field of
    /// a rate rule or provider that no config file declares. Each comes with the variable of the
    /// nearest setting when one is near (a few letters apart). The environment cannot be an
    /// error the way a file key is: it is shared with other programs.
    pub fn unread_env_vars<I, S>(&self, names: I) -> Vec<(String, Option<String>)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let read: BTreeSet<String> = self.settings_read.iter().map(|key| resolve::env_name(key)).collect();
        let mut unread: Vec<(String, Option<String>)> = names
            .into_iter()
            .map(|name| name.as_ref().to_owned())
            .filter(|name| name.starts_with("SESSION_AUTHORITY_"))
            .filter(|name| !read.contains(name) && !OTHER_ENV_VARS.contains(&name.as_str()))
            .map(|name| {
                let nearest = read
                    .iter()
                    .map(|known| (strsim::levenshtein(&name, known), known))
                    .filter(|(distance, _)| *distance <= 3)
                    .min()
                    .map(|(_, known)| known.clone());
                (name, nearest)
            })
            .collect();
        unread.sort();
        unread.dedup();
        unread
    }

    /// The configuration with every default and the given flags only (no environment).
    pub fn from_flags(flags: &Flags) -> Result<Config, ConfigError> {
        Config::load(flags, &|_| None)
    }

    fn resolve(r: &Resolver<'_>, api_keys: Vec<ApiKeyEntry>) -> Result<Config, ConfigError> {
        let listen = r.socket_addr("listen")?.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
        let client_cert_role =
            r.parsed("tls.client_cert_role", &[], Role::Service, "service, admin, watcher or proxy", Role::parse)?;
        let tls = match (r.file_bytes("tls.cert")?, r.file_bytes("tls.key")?) {
            (None, None) => {
                if r.raw("tls.client_ca", &[]).is_some() {
                    return Err(err("setting `tls.client_ca`: needs `tls.cert` and `tls.key` as well"));
                }
                None
            }
            (Some(cert_pem), Some(key_pem)) => {
                Some(TlsConfig { cert_pem, key_pem, client_ca_pem: r.file_bytes("tls.client_ca")?, client_cert_role })
            }
            (Some(_), None) => {
                return Err(err("setting `tls.key`: missing while `tls.cert` is set"));
            }
            (None, Some(_)) => {
                return Err(err("setting `tls.cert`: missing while `tls.key` is set"));
            }
        };
        let server = ServerConfig {
            listen,
            request_timeout: r.positive_duration("server.request_timeout", Duration::from_secs(10))?,
            concurrency_limit: r.number("server.concurrency_limit", 1024usize)?,
            max_health_watch_streams: r.number("server.max_health_watch_streams", DEFAULT_MAX_HEALTH_WATCH_STREAMS)?,
            max_reflection_streams: r.number("server.max_reflection_streams", DEFAULT_MAX_REFLECTION_STREAMS)?,
            max_message_bytes: r.number("server.max_message_bytes", 1024 * 1024usize)?,
            shutdown_grace: r.duration("server.shutdown_grace", Duration::from_secs(20))?,
            tls,
        };
        if server.concurrency_limit == 0 {
            return Err(err("setting `server.concurrency_limit`: must be at least 1"));
        }
        if server.max_health_watch_streams == 0 {
            return Err(err("setting `server.max_health_watch_streams`: must be at least 1"));
        }
        if server.max_reflection_streams == 0 {
            return Err(err("setting `server.max_reflection_streams`: must be at least 1"));
        }
        if server.max_message_bytes < 1024 {
            return Err(err("setting `server.max_message_bytes`: must be at least 1024"));
        }

        let redis_url = r.raw("redis.url", &["REDIS_URL"]).filter(|(v, _)| !v.trim().is_empty());
        let kv_rest_url = r.raw("kv_rest.url", &["KV_REST_API_URL"]).filter(|(v, _)| !v.trim().is_empty());
        let kv_rest_token = r.string("kv_rest.token", &["KV_REST_API_TOKEN"]);
        // `storage` unset anywhere: the guide's variables choose the shared backend they name.
        let (default_kind, chosen_by) = match (&redis_url, &kv_rest_url) {
            (Some((_, from_redis)), Some((_, from_kv))) if r.raw("storage", &[]).is_none() => {
                return Err(err(format!(
                    "setting `storage`: both a Redis URL ({from_redis}) and a KV REST URL ({from_kv}) are set; \
                     choose one with --storage redis|kv-rest (SESSION_AUTHORITY_STORAGE)"
                )));
            }
            (Some((_, from)), None) => (StorageKind::Redis, from.clone()),
            (None, Some((_, from))) if kv_rest_token.is_some() => (StorageKind::KvRest, from.clone()),
            _ => (StorageKind::Embedded, "the default".to_owned()),
        };
        let chosen_by = match r.raw("storage", &[]) {
            Some((_, origin)) => origin,
            None => chosen_by,
        };
        let kind = r.parsed("storage", &[], default_kind, "one of embedded, memory, redis, kv-rest", |s| match s {
            "embedded" => Some(StorageKind::Embedded),
            "memory" => Some(StorageKind::Memory),
            "redis" => Some(StorageKind::Redis),
            "kv-rest" => Some(StorageKind::KvRest),
            _ => None,
        })?;
        let storage = StorageConfig {
            kind,
            data_dir: PathBuf::from(r.string("data_dir", &[]).unwrap_or_else(|| "./data".into())),
            redis_url: redis_url.map(|(v, _)| v),
            key_prefix: r.string("redis.key_prefix", &[]).unwrap_or_else(|| "atoms:session:".into()),
            kv_rest_url: kv_rest_url.map(|(v, _)| v),
            kv_rest_token: kv_rest_token.map(SecretString::from),
            operation_timeout: r.positive_duration("storage_timeout", Duration::from_secs(2))?,
            max_limiter_keys: r.number("security.max_limiter_keys", crate::security::limiter::DEFAULT_MAX_KEYS)?,
            embedded_cache_bytes: embedded_cache_bytes(
                r.number("embedded.cache_mb", crate::store::embedded::DEFAULT_CACHE_MB)?,
            )?,
            record_format: r.parsed("redis.record_format", &[], RecordFormat::Json, "json or binary", |s| match s {
                "json" => Some(RecordFormat::Json),
                "binary" => Some(RecordFormat::Binary),
                _ => None,
            })?,
            chosen_by,
        };
        if storage.max_limiter_keys == 0 {
            return Err(err("setting `security.max_limiter_keys`: must be at least 1"));
        }
        match kind {
            StorageKind::Redis if storage.redis_url.is_none() => {
                return Err(err("setting `redis.url` (REDIS_URL): required when storage is redis"));
            }
            StorageKind::KvRest if storage.kv_rest_url.is_none() || storage.kv_rest_token.is_none() => {
                return Err(err(
                    "settings `kv_rest.url` and `kv_rest.token` (KV_REST_API_URL, KV_REST_API_TOKEN): required when storage is kv-rest",
                ));
            }
            _ => {}
        }

        let d = SessionSettings::default();
        let session = SessionSettings {
            idle_timeout: r.positive_duration("session.idle_timeout", d.idle_timeout)?,
            absolute_timeout: r.positive_duration("session.absolute_timeout", d.absolute_timeout)?,
            max_sessions_per_user: r.number("session.max_sessions_per_user", d.max_sessions_per_user)?,
            device_validation: r.bool("session.device_validation", d.device_validation)?,
            device_match_threshold: r.fraction("session.device_match_threshold", d.device_match_threshold)?,
            device_fingerprint_required: r
                .bool("session.device_fingerprint_required", d.device_fingerprint_required)?,
            idle_slide_step: r.duration("session.idle_slide_step", d.idle_slide_step)?,
            tombstone_ttl: r.positive_duration("revocation.list_ttl", d.tombstone_ttl)?,
            proactive_refresh: r.duration("token.proactive_refresh", d.proactive_refresh)?,
            cleanup_interval: r.positive_duration("session.cleanup_interval", d.cleanup_interval)?,
        };
        if session.max_sessions_per_user == 0 {
            return Err(err("setting `session.max_sessions_per_user`: must be at least 1"));
        }

        let d = TokenSettings::default();
        let lease_ttl = r.positive_duration("token.lease_ttl", d.lease_ttl)?;
        let token = TokenSettings {
            proactive_refresh: session.proactive_refresh,
            grace_period: r.duration("token.grace_period", d.grace_period)?,
            retry: RetryPolicy {
                max_retries: r.number("token.max_retries", d.retry.max_retries)?,
                initial_delay: r.positive_duration("token.retry_initial_delay", d.retry.initial_delay)?,
                max_delay: r.positive_duration("token.retry_max_delay", d.retry.max_delay)?,
            },
            lease_ttl,
            // Another replica's refresh holds the lease for at most a few renewals.
            wait_timeout: lease_ttl.saturating_mul(4).max(d.wait_timeout),
            introspection_cache_ttl: r.duration("token.introspection_cache_ttl", d.introspection_cache_ttl)?,
            history_keep: d.history_keep,
        };
        let providers = resolve_providers(r)?;

        let d = RevocationSettings::default();
        let revocation = RevocationSettings {
            cascade: r.bool("revocation.cascade", d.cascade)?,
            watch_buffer: r.number("revocation.watch_buffer", d.watch_buffer)?,
            max_watchers: r.number("revocation.max_watchers", d.max_watchers)?,
            default_heartbeat: d.default_heartbeat,
            list_ttl: session.tombstone_ttl,
            cleanup_interval: r.positive_duration("revocation.cleanup_interval", d.cleanup_interval)?,
        };
        if revocation.watch_buffer < 16 {
            return Err(err("setting `revocation.watch_buffer`: must be at least 16"));
        }
        if revocation.max_watchers == 0 {
            return Err(err("setting `revocation.max_watchers`: must be at least 1"));
        }

        let d = SecuritySettings::default();
        let h = HijackRules::default();
        let security = SecuritySettings {
            rate_limiting: r.bool("security.rate_limiting", d.rate_limiting)?,
            hijack_detection: r.bool("security.hijack_detection", d.hijack_detection)?,
            rules: resolve_rules(r, &d.rules)?,
            hijack: HijackRules {
                ip_same_network: r.fraction("security.hijack.ip_same_network", h.ip_same_network)?,
                ip_new_network: r.fraction("security.hijack.ip_new_network", h.ip_new_network)?,
                user_agent: r.fraction("security.hijack.user_agent", h.user_agent)?,
                fingerprint_mismatch: r.fraction("security.hijack.fingerprint_mismatch", h.fingerprint_mismatch)?,
                fingerprint_changed: r.fraction("security.hijack.fingerprint_changed", h.fingerprint_changed)?,
                accept_language: r.fraction("security.hijack.accept_language", h.accept_language)?,
                ip_velocity: r.fraction("security.hijack.ip_velocity", h.ip_velocity)?,
                velocity_window: r.positive_duration("security.hijack.velocity_window", h.velocity_window)?,
                velocity_max_ips: r.number("security.hijack.velocity_max_ips", h.velocity_max_ips)?,
                device_match_threshold: session.device_match_threshold,
                threshold: r.fraction("security.hijack_threshold", h.threshold)?,
            },
            event_retention: r.positive_duration("security.event_retention", d.event_retention)?,
        };

        let envoy = EnvoyConfig {
            cookie: r.header_name("envoy.cookie", "session_id", false)?,
            trusted_hops: r.optional_number("envoy.trusted_hops")?,
            user_id_header: r.header_name("envoy.user_id_header", "x-user-id", true)?,
            session_id_header: r.header_name("envoy.session_id_header", "x-session-id", true)?,
            forward_access_token: r.bool("envoy.forward_access_token", false)?,
            rule_entry: r.header_name("envoy.ratelimit.rule_entry", "rule", false)?,
            key_entry: r.header_name("envoy.ratelimit.key_entry", "key", false)?,
        };
        if envoy.rule_entry == envoy.key_entry {
            return Err(err("settings `envoy.ratelimit.rule_entry` and `envoy.ratelimit.key_entry`: must differ"));
        }

        let plaintext_api_keys = match r.string("api_keys", &[]) {
            Some(text) => parse_plaintext_keys(&text)?,
            None => Vec::new(),
        };
        let encryption_key = r.string("encryption_key", &[]).map(SecretString::from);
        let previous_encryption_keys = r
            .string("previous_encryption_keys", &[])
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(|k| SecretString::from(k.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let auth = AuthConfig { api_keys, plaintext_api_keys, encryption_key, previous_encryption_keys };

        let log_format = r.parsed("log_format", &[], LogFormat::Text, "text or json", |s| match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        })?;

        Ok(Config {
            server,
            storage,
            session,
            token,
            providers,
            revocation,
            security,
            auth,
            envoy,
            metrics_listen: r.socket_addr("metrics_listen")?,
            log_format,
            settings_read: BTreeSet::new(),
        })
    }
}

#[cfg(test)]
mod tests;
