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

/// A configuration problem, already phrased for a person: it names the setting.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

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
}

impl Role {
    /// Parses a role name as written in configuration.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "service" => Some(Role::Service),
            "admin" => Some(Role::Admin),
            "watcher" => Some(Role::Watcher),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Admin => "admin",
            Role::Watcher => "watcher",
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
    /// Why this backend: where `storage` was set, or the variable that chose it when it was not.
    pub chosen_by: String,
}

/// Session lifecycle.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Idle timeout (sliding).
    pub idle_timeout: Duration,
    /// Absolute timeout from creation.
    pub absolute_timeout: Duration,
    /// Active sessions one user may hold; creating one more evicts the oldest.
    pub max_sessions_per_user: u32,
    /// Whether presented device fingerprints are checked.
    pub device_validation: bool,
    /// Share of scored fingerprint fields that must agree (0 to 1).
    pub device_match_threshold: f64,
    /// A session that stored a fingerprint requires one: an empty presented fingerprint is a
    /// device mismatch (`false`: it skips the device check, the earlier rule).
    pub device_fingerprint_required: bool,
    /// The idle expiry is rewritten only when it would move by more than this.
    pub idle_slide_step: Duration,
    /// How often expired sessions are swept.
    pub cleanup_interval: Duration,
}

/// Upstream token handling.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Refresh when the access token expires within this window.
    pub proactive_refresh: Duration,
    /// After a refresh, further refresh requests within this window reuse its result.
    pub grace_period: Duration,
    /// Retries after a failed upstream call.
    pub max_retries: u32,
    /// First backoff delay.
    pub retry_initial_delay: Duration,
    /// Largest backoff delay.
    pub retry_max_delay: Duration,
    /// OAuth2 client id (`OAUTH_CLIENT_ID`, or the guide's `OPENROUTER_CLIENT_ID`).
    pub client_id: Option<String>,
    /// OAuth2 client secret (`OAUTH_CLIENT_SECRET`, or `OPENROUTER_CLIENT_SECRET`).
    pub client_secret: Option<SecretString>,
    /// Token endpoint of the default provider.
    pub token_endpoint: Option<String>,
    /// Introspection endpoint of the default provider.
    pub introspection_endpoint: Option<String>,
    /// Revocation endpoint of the default provider.
    pub revocation_endpoint: Option<String>,
    /// Issuer URL, resolved through OpenID discovery.
    pub issuer: Option<String>,
    /// Client authentication of the default provider.
    pub client_auth: crate::token::ClientAuth,
    /// Timeout of one HTTP request to a provider.
    pub request_timeout: Duration,
    /// Lifetime of the refresh lease (renewed while the provider call runs).
    pub lease_ttl: Duration,
    /// Longest time an active introspection answer is cached (never past the token's `exp`).
    pub introspection_cache_ttl: Duration,
    /// Every configured provider: `default` from the flat settings (when it has a token
    /// endpoint or an issuer), then each `[token.providers.NAME]`.
    pub providers: Vec<crate::token::ProviderSettings>,
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

/// Revocation list and feed.
#[derive(Debug, Clone)]
pub struct RevocationConfig {
    /// Revoking a session also revokes its upstream tokens; revoking a user revokes each session.
    pub cascade: bool,
    /// How long an entry stays on the revocation list (and an ended session's tombstone lives).
    pub list_ttl: Duration,
    /// How often expired entries are swept.
    pub cleanup_interval: Duration,
    /// Events the per-replica live feed buffers; a watcher further behind is ended with
    /// ABORTED and resumes from its cursor.
    pub watch_buffer: usize,
    /// WatchRevocations streams this replica serves at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
}

/// Rate limits and hijack detection.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// Whether rate-limit rules are enforced.
    pub rate_limiting: bool,
    /// Whether ValidateSession scores requests for hijacking.
    pub hijack_detection: bool,
    /// Risk score above which a session is terminated.
    pub hijack_threshold: f64,
    /// How long security events are kept.
    pub event_retention: Duration,
    /// Rate-limit rules by name (`[security.rules.NAME]`).
    pub rules: BTreeMap<String, RateRuleConfig>,
    /// Keys of live state one rule may hold in a backend that keeps limiter state in this
    /// process (memory) or its data directory (embedded); at the bound new keys are refused.
    pub max_limiter_keys: usize,
    /// Weights of the hijack rule table (`[security.hijack]`).
    pub hijack: HijackConfig,
}

/// One rate-limit rule (`[security.rules.NAME]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RateRuleConfig {
    /// Requests per period.
    pub limit: u32,
    /// The period.
    pub period: Duration,
    /// Requests allowed at once (default: `limit`).
    pub burst: u32,
    /// Exponential backoff for repeat offenders.
    pub backoff: bool,
    /// Factor between successive backoff blocks.
    pub backoff_multiplier: f64,
    /// Longest backoff block.
    pub max_backoff: Duration,
}

/// Weights and thresholds of hijack detection (`[security.hijack]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HijackConfig {
    /// IP changed within the same /24 or /64.
    pub ip_same_network: f64,
    /// IP changed to another network.
    pub ip_new_network: f64,
    /// User agent changed.
    pub user_agent: f64,
    /// Device fingerprint mismatch.
    pub fingerprint_mismatch: f64,
    /// Fingerprint changed but still the same device.
    pub fingerprint_changed: f64,
    /// Accept-Language changed.
    pub accept_language: f64,
    /// Many IPs within the velocity window.
    pub ip_velocity: f64,
    /// The velocity window.
    pub velocity_window: Duration,
    /// Distinct IPs allowed within the window.
    pub velocity_max_ips: u32,
}

/// The fields of a `[security.rules.NAME]` table.
const RULE_FIELDS: &[&str] = &["limit", "period", "burst", "backoff", "backoff_multiplier", "max_backoff"];

/// The rules every deployment has unless configured otherwise: (name, limit, period s, max
/// backoff s). The first three are the original library's; `validate_failure` counts "not valid"
/// ValidateSession answers per client IP.
const DEFAULT_RULES: &[(&str, u32, u64, u64)] = &[
    ("token_refresh", 10, 60, 3600),
    ("session_create", 5, 300, 3600),
    ("login_attempt", 5, 300, 1800),
    ("validate_failure", 30, 60, 900),
];

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
    /// Storage.
    pub storage: StorageConfig,
    /// Session lifecycle.
    pub session: SessionConfig,
    /// Upstream tokens.
    pub token: TokenConfig,
    /// Revocation.
    pub revocation: RevocationConfig,
    /// Security.
    pub security: SecurityConfig,
    /// Callers and keys.
    pub auth: AuthConfig,
    /// Address of the Prometheus `/metrics` listener; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
}

/// Health Watch streams one replica serves at once unless configured
/// (`server.max_health_watch_streams`). Probes poll `Check`; `Watch` is for clients that use
/// gRPC client-side health checking (one stream per channel to this replica), so this leaves
/// room for thousands of them while bounding what callers without a key can hold open.
pub const DEFAULT_MAX_HEALTH_WATCH_STREAMS: usize = 4096;

/// Settings given on the command line, by dotted name.
pub type Flags = BTreeMap<String, String>;

/// Every setting the file may contain, so that a typo is an error instead of a silent default.
const KNOWN_KEYS: &[&str] = &[
    "listen",
    "storage",
    "data_dir",
    "metrics_listen",
    "log_format",
    "server.request_timeout",
    "server.concurrency_limit",
    "server.max_health_watch_streams",
    "server.max_message_bytes",
    "server.shutdown_grace",
    "tls.cert",
    "tls.key",
    "tls.client_ca",
    "tls.client_cert_role",
    "redis.url",
    "redis.key_prefix",
    "kv_rest.url",
    "kv_rest.token",
    "storage_timeout",
    "session.idle_timeout",
    "session.absolute_timeout",
    "session.max_sessions_per_user",
    "session.device_validation",
    "session.device_match_threshold",
    "session.device_fingerprint_required",
    "session.idle_slide_step",
    "session.cleanup_interval",
    "token.proactive_refresh",
    "token.grace_period",
    "token.max_retries",
    "token.retry_initial_delay",
    "token.retry_max_delay",
    "token.client_id",
    "token.client_secret",
    "token.token_endpoint",
    "token.introspection_endpoint",
    "token.revocation_endpoint",
    "token.issuer",
    "token.client_auth",
    "token.request_timeout",
    "token.lease_ttl",
    "token.introspection_cache_ttl",
    "revocation.cascade",
    "revocation.list_ttl",
    "revocation.cleanup_interval",
    "revocation.watch_buffer",
    "revocation.max_watchers",
    "security.rate_limiting",
    "security.hijack_detection",
    "security.hijack_threshold",
    "security.event_retention",
    "security.max_limiter_keys",
    "security.hijack.ip_same_network",
    "security.hijack.ip_new_network",
    "security.hijack.user_agent",
    "security.hijack.fingerprint_mismatch",
    "security.hijack.fingerprint_changed",
    "security.hijack.accept_language",
    "security.hijack.ip_velocity",
    "security.hijack.velocity_window",
    "security.hijack.velocity_max_ips",
    "encryption_key",
    "previous_encryption_keys",
];

/// Resolves one setting through flags, then the environment, then the file.
struct Resolver<'a> {
    flags: &'a Flags,
    env: &'a dyn Fn(&str) -> Option<String>,
    file: BTreeMap<String, toml::Value>,
    file_name: String,
}

/// The environment variable of a setting: `SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT`.
pub fn env_name(key: &str) -> String {
    format!("SESSION_AUTHORITY_{}", key.replace('.', "_").to_uppercase())
}

impl Resolver<'_> {
    /// The raw value and a description of where it came from.
    fn raw(&self, key: &str, aliases: &[&str]) -> Option<(String, String)> {
        if let Some(value) = self.flags.get(key) {
            return Some((value.clone(), format!("flag --{}", key.replace(['.', '_'], "-"))));
        }
        let primary = env_name(key);
        for name in std::iter::once(primary.as_str()).chain(aliases.iter().copied()) {
            if let Some(value) = (self.env)(name) {
                return Some((value, format!("environment variable {name}")));
            }
        }
        let value = self.file.get(key)?;
        let text = match value {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some((text, format!("{} key `{key}`", self.file_name)))
    }

    fn parsed<T>(
        &self,
        key: &str,
        aliases: &[&str],
        default: T,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        match self.raw(key, aliases) {
            None => Ok(default),
            Some((text, origin)) => parse(text.trim())
                .ok_or_else(|| err(format!("setting `{key}` ({origin}): expected {expected}, got {text:?}"))),
        }
    }

    fn duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        self.parsed(key, &[], default, "a duration such as 30s, 15m or 24h", |s| humantime::parse_duration(s).ok())
    }

    fn positive_duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let value = self.duration(key, default)?;
        if value.is_zero() {
            return Err(err(format!("setting `{key}`: must be greater than zero")));
        }
        Ok(value)
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        self.parsed(key, &[], default, "true or false", |s| match s {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        })
    }

    fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ConfigError> {
        self.parsed(key, &[], default, "a whole number", |s| s.parse().ok())
    }

    fn fraction(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        self.parsed(key, &[], default, "a number between 0 and 1", |s| {
            s.parse::<f64>().ok().filter(|v| (0.0..=1.0).contains(v))
        })
    }

    fn string(&self, key: &str, aliases: &[&str]) -> Option<String> {
        self.raw(key, aliases).map(|(v, _)| v).filter(|v| !v.trim().is_empty())
    }

    fn socket_addr(&self, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
        match self.raw(key, &[]) {
            None => Ok(None),
            Some((text, _)) if text.trim().is_empty() => Ok(None),
            Some((text, origin)) => text.trim().parse().map(Some).map_err(|_| {
                err(format!("setting `{key}` ({origin}): expected an address such as 127.0.0.1:50051, got {text:?}"))
            }),
        }
    }

    fn file_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, ConfigError> {
        match self.raw(key, &[]) {
            None => Ok(None),
            Some((path, origin)) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| err(format!("setting `{key}` ({origin}): cannot read {path:?}: {e}"))),
        }
    }
}

/// Flattens a TOML document to dotted keys; `[[api_keys]]` is returned apart.
fn flatten(prefix: &str, table: toml::Table, out: &mut BTreeMap<String, toml::Value>) -> Result<(), ConfigError> {
    for (name, value) in table {
        let key = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
        match value {
            toml::Value::Table(inner) => flatten(&key, inner, out)?,
            other => {
                out.insert(key, other);
            }
        }
    }
    Ok(())
}

fn parse_api_key_table(index: usize, value: &toml::Value) -> Result<ApiKeyEntry, ConfigError> {
    let at = |field: &str| format!("setting `api_keys[{index}].{field}`");
    let table = value.as_table().ok_or_else(|| err(format!("setting `api_keys[{index}]`: expected a table")))?;
    let text = |field: &str| -> Result<String, ConfigError> {
        table
            .get(field)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| err(format!("{}: missing (a string)", at(field))))
    };
    let name = text("name")?;
    let role_name = text("role")?;
    let role = Role::parse(&role_name)
        .ok_or_else(|| err(format!("{}: expected service, admin or watcher, got {role_name:?}", at("role"))))?;
    let hash = text("hash")?;
    let sha256 = parse_key_hash(&hash).ok_or_else(|| {
        err(format!("{}: expected \"sha256:<64 hex digits>\" as printed by `session-authority hash-key`", at("hash")))
    })?;
    Ok(ApiKeyEntry { name, role, sha256 })
}

/// Parses `sha256:<hex>` as printed by `session-authority hash-key`.
pub fn parse_key_hash(text: &str) -> Option<[u8; 32]> {
    let hex_digits = text.trim().strip_prefix("sha256:")?;
    let bytes = hex::decode(hex_digits).ok()?;
    bytes.try_into().ok()
}

fn parse_plaintext_keys(text: &str) -> Result<Vec<(Role, SecretString)>, ConfigError> {
    let mut keys = Vec::new();
    for (index, item) in text.split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
        let (role_name, key) = item.split_once(':').ok_or_else(|| {
            err(format!(
                "setting `api_keys` (environment variable SESSION_AUTHORITY_API_KEYS): entry {} is not \"role:key\"",
                index + 1
            ))
        })?;
        let role = Role::parse(role_name.trim()).ok_or_else(|| {
            err(format!(
                "setting `api_keys` (environment variable SESSION_AUTHORITY_API_KEYS): entry {} has role {:?}; expected service, admin or watcher",
                index + 1,
                role_name
            ))
        })?;
        if key.len() < 16 {
            return Err(err(format!(
                "setting `api_keys` (environment variable SESSION_AUTHORITY_API_KEYS): entry {} has a key shorter than 16 characters",
                index + 1
            )));
        }
        keys.push((role, SecretString::from(key.to_owned())));
    }
    Ok(keys)
}

/// The rate-limit rules: the defaults, overridden field by field, plus every rule named in the
/// file. A new rule needs at least `limit` and `period`.
fn resolve_rules(r: &Resolver<'_>) -> Result<BTreeMap<String, RateRuleConfig>, ConfigError> {
    let mut names: BTreeSet<String> = DEFAULT_RULES.iter().map(|(name, ..)| (*name).to_owned()).collect();
    names.extend(r.file.keys().filter_map(|k| rule_key(k)).map(str::to_owned));
    let mut rules = BTreeMap::new();
    for name in names {
        let key = |field: &str| format!("security.rules.{name}.{field}");
        let default = DEFAULT_RULES.iter().find(|(n, ..)| *n == name);
        let (limit, period, max_backoff) = match default {
            Some((_, limit, period, max)) => (
                r.number(&key("limit"), *limit)?,
                r.positive_duration(&key("period"), Duration::from_secs(*period))?,
                r.positive_duration(&key("max_backoff"), Duration::from_secs(*max))?,
            ),
            None => {
                for field in ["limit", "period"] {
                    if r.raw(&key(field), &[]).is_none() {
                        return Err(err(format!("setting `{}`: required for the new rule {name:?}", key(field))));
                    }
                }
                let period = r.positive_duration(&key("period"), Duration::from_secs(60))?;
                (
                    r.number(&key("limit"), 1u32)?,
                    period,
                    r.positive_duration(&key("max_backoff"), Duration::from_secs(3600))?,
                )
            }
        };
        if limit == 0 {
            return Err(err(format!("setting `{}`: must be at least 1", key("limit"))));
        }
        let burst = r.number(&key("burst"), limit)?;
        if burst == 0 {
            return Err(err(format!("setting `{}`: must be at least 1", key("burst"))));
        }
        let backoff_multiplier = r.parsed(&key("backoff_multiplier"), &[], 2.0, "a number of at least 1", |s| {
            s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 1.0)
        })?;
        let rule = RateRuleConfig {
            limit,
            period,
            burst,
            backoff: r.bool(&key("backoff"), true)?,
            backoff_multiplier,
            max_backoff,
        };
        rules.insert(name, rule);
    }
    Ok(rules)
}

fn client_auth(r: &Resolver<'_>, key: &str) -> Result<crate::token::ClientAuth, ConfigError> {
    r.parsed(
        key,
        &[],
        crate::token::ClientAuth::Basic,
        "client_secret_basic or client_secret_post",
        crate::token::ClientAuth::parse,
    )
}

fn check_url(key: &str, value: &Option<String>) -> Result<(), ConfigError> {
    if let Some(url) = value
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(err(format!("setting `{key}`: expected an http(s) URL, got {url:?}")));
    }
    Ok(())
}

/// Providers that the integration guide's environment variables configure by name:
/// `OPENROUTER_CLIENT_ID`, `OPENROUTER_CLIENT_SECRET`, and `OPENROUTER_ISSUER` or
/// `OPENROUTER_TOKEN_ENDPOINT` (with `_INTROSPECTION_ENDPOINT`, `_REVOCATION_ENDPOINT`) make the
/// provider `openrouter`, as `[token.providers.openrouter]` would.
pub const ENV_PROVIDERS: &[&str] = &["openrouter"];

/// The providers: `default` from the flat `token.*` settings when they name an endpoint or an
/// issuer, then every `[token.providers.NAME]` of the file (whose fields also resolve from flags
/// and the environment, e.g. `SESSION_AUTHORITY_TOKEN_PROVIDERS_NAME_CLIENT_SECRET`).
fn resolve_providers(r: &Resolver<'_>, flat: &TokenConfig) -> Result<Vec<crate::token::ProviderSettings>, ConfigError> {
    use crate::token::{DEFAULT_PROVIDER, ProviderSettings};
    let mut providers = Vec::new();
    if flat.token_endpoint.is_some() || flat.issuer.is_some() {
        for key in ["token.token_endpoint", "token.introspection_endpoint", "token.revocation_endpoint", "token.issuer"]
        {
            check_url(key, &r.string(key, &[]))?;
        }
        providers.push(ProviderSettings {
            name: DEFAULT_PROVIDER.into(),
            client_id: flat.client_id.clone(),
            client_secret: flat.client_secret.clone(),
            token_endpoint: flat.token_endpoint.clone(),
            introspection_endpoint: flat.introspection_endpoint.clone(),
            revocation_endpoint: flat.revocation_endpoint.clone(),
            issuer: flat.issuer.clone(),
            client_auth: flat.client_auth,
            request_timeout: flat.request_timeout,
        });
    } else if flat.introspection_endpoint.is_some() || flat.revocation_endpoint.is_some() {
        return Err(err(
            "setting `token.token_endpoint`: required (or `token.issuer`) when other token endpoints are set",
        ));
    }
    let mut names: BTreeSet<String> = r.file.keys().filter_map(|k| provider_key(k)).map(str::to_owned).collect();
    // The integration guide's variables configure a provider named after them (`OPENROUTER_*`:
    // `openrouter`) when they name its client and where it is (an issuer or a token endpoint).
    for name in ENV_PROVIDERS {
        let var = |field: &str| format!("{}_{}", name.to_uppercase(), field.to_uppercase());
        let set = |field: &str| (r.env)(&var(field)).is_some_and(|v| !v.trim().is_empty());
        if set("client_id") && (set("issuer") || set("token_endpoint")) {
            names.insert((*name).to_owned());
        }
    }
    for name in names {
        if name == DEFAULT_PROVIDER && !providers.is_empty() {
            return Err(err(
                "setting `token.providers.default`: the default provider is the flat token.* settings; choose another name",
            ));
        }
        let key = |field: &str| format!("token.providers.{name}.{field}");
        // `OPENROUTER_CLIENT_ID` and so on, for the providers of ENV_PROVIDERS.
        let alias = |field: &str| {
            ENV_PROVIDERS.contains(&name.as_str()).then(|| format!("{}_{}", name.to_uppercase(), field.to_uppercase()))
        };
        let string = |field: &str| match alias(field) {
            Some(a) => r.string(&key(field), &[a.as_str()]),
            None => r.string(&key(field), &[]),
        };
        let settings = ProviderSettings {
            name: name.clone(),
            client_id: string("client_id"),
            client_secret: string("client_secret").map(SecretString::from),
            token_endpoint: string("token_endpoint"),
            introspection_endpoint: string("introspection_endpoint"),
            revocation_endpoint: string("revocation_endpoint"),
            issuer: string("issuer"),
            client_auth: client_auth(r, &key("client_auth"))?,
            request_timeout: flat.request_timeout,
        };
        if settings.token_endpoint.is_none() && settings.issuer.is_none() {
            return Err(err(format!("setting `{}`: required (or `{}`)", key("token_endpoint"), key("issuer"))));
        }
        if settings.client_id.is_none() {
            return Err(err(format!("setting `{}`: required", key("client_id"))));
        }
        for field in ["token_endpoint", "introspection_endpoint", "revocation_endpoint", "issuer"] {
            check_url(&key(field), &string(field))?;
        }
        providers.push(settings);
    }
    Ok(providers)
}

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
            let known: BTreeSet<&str> = KNOWN_KEYS.iter().copied().collect();
            if let Some(unknown) =
                file.keys().find(|k| !known.contains(k.as_str()) && rule_key(k).is_none() && provider_key(k).is_none())
            {
                return Err(err(format!("setting `{unknown}` in {path:?} is not a known setting")));
            }
            file_name = format!("config file {path:?}");
        }
        let r = Resolver { flags, env, file, file_name };
        Config::resolve(&r, api_keys)
    }

    /// The configuration with every default and the given flags only (no environment).
    pub fn from_flags(flags: &Flags) -> Result<Config, ConfigError> {
        Config::load(flags, &|_| None)
    }

    fn resolve(r: &Resolver<'_>, api_keys: Vec<ApiKeyEntry>) -> Result<Config, ConfigError> {
        let minutes = |m: u64| Duration::from_secs(m * 60);

        let listen = r.socket_addr("listen")?.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
        let tls = match (r.file_bytes("tls.cert")?, r.file_bytes("tls.key")?) {
            (None, None) => {
                if r.raw("tls.client_ca", &[]).is_some() {
                    return Err(err("setting `tls.client_ca`: needs `tls.cert` and `tls.key` as well"));
                }
                None
            }
            (Some(cert_pem), Some(key_pem)) => Some(TlsConfig {
                cert_pem,
                key_pem,
                client_ca_pem: r.file_bytes("tls.client_ca")?,
                client_cert_role: r.parsed(
                    "tls.client_cert_role",
                    &[],
                    Role::Service,
                    "service, admin or watcher",
                    Role::parse,
                )?,
            }),
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
            chosen_by,
        };
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

        let session = SessionConfig {
            idle_timeout: r.positive_duration("session.idle_timeout", minutes(30))?,
            absolute_timeout: r.positive_duration("session.absolute_timeout", minutes(480))?,
            max_sessions_per_user: r.number("session.max_sessions_per_user", 5u32)?,
            device_validation: r.bool("session.device_validation", true)?,
            device_match_threshold: r.fraction("session.device_match_threshold", 0.8)?,
            device_fingerprint_required: r.bool("session.device_fingerprint_required", true)?,
            idle_slide_step: r.duration("session.idle_slide_step", Duration::from_secs(60))?,
            cleanup_interval: r.positive_duration("session.cleanup_interval", minutes(15))?,
        };
        if session.max_sessions_per_user == 0 {
            return Err(err("setting `session.max_sessions_per_user`: must be at least 1"));
        }

        let token = TokenConfig {
            proactive_refresh: r.duration("token.proactive_refresh", minutes(5))?,
            grace_period: r.duration("token.grace_period", minutes(5))?,
            max_retries: r.number("token.max_retries", 3u32)?,
            retry_initial_delay: r.positive_duration("token.retry_initial_delay", Duration::from_secs(1))?,
            retry_max_delay: r.positive_duration("token.retry_max_delay", Duration::from_secs(30))?,
            client_id: r.string("token.client_id", &["OAUTH_CLIENT_ID", "OPENROUTER_CLIENT_ID"]),
            client_secret: r
                .string("token.client_secret", &["OAUTH_CLIENT_SECRET", "OPENROUTER_CLIENT_SECRET"])
                .map(SecretString::from),
            token_endpoint: r.string("token.token_endpoint", &[]),
            introspection_endpoint: r.string("token.introspection_endpoint", &[]),
            revocation_endpoint: r.string("token.revocation_endpoint", &[]),
            issuer: r.string("token.issuer", &[]),
            client_auth: client_auth(r, "token.client_auth")?,
            request_timeout: r.positive_duration("token.request_timeout", Duration::from_secs(10))?,
            lease_ttl: r.positive_duration("token.lease_ttl", Duration::from_secs(15))?,
            introspection_cache_ttl: r.duration("token.introspection_cache_ttl", Duration::from_secs(30))?,
            providers: Vec::new(),
        };
        let token = TokenConfig { providers: resolve_providers(r, &token)?, ..token };

        let revocation = RevocationConfig {
            cascade: r.bool("revocation.cascade", true)?,
            list_ttl: r.positive_duration("revocation.list_ttl", Duration::from_secs(24 * 3600))?,
            cleanup_interval: r.positive_duration("revocation.cleanup_interval", Duration::from_secs(3600))?,
            watch_buffer: r.number("revocation.watch_buffer", 4096usize)?,
            max_watchers: r.number("revocation.max_watchers", crate::revocation::DEFAULT_MAX_WATCHERS)?,
        };
        if revocation.watch_buffer < 16 {
            return Err(err("setting `revocation.watch_buffer`: must be at least 16"));
        }
        if revocation.max_watchers == 0 {
            return Err(err("setting `revocation.max_watchers`: must be at least 1"));
        }

        let security = SecurityConfig {
            rate_limiting: r.bool("security.rate_limiting", true)?,
            hijack_detection: r.bool("security.hijack_detection", true)?,
            hijack_threshold: r.fraction("security.hijack_threshold", 0.7)?,
            event_retention: r.positive_duration("security.event_retention", Duration::from_secs(30 * 24 * 3600))?,
            rules: resolve_rules(r)?,
            max_limiter_keys: r.number("security.max_limiter_keys", crate::security::limiter::DEFAULT_MAX_KEYS)?,
            hijack: HijackConfig {
                ip_same_network: r.fraction("security.hijack.ip_same_network", 0.1)?,
                ip_new_network: r.fraction("security.hijack.ip_new_network", 0.3)?,
                user_agent: r.fraction("security.hijack.user_agent", 0.2)?,
                fingerprint_mismatch: r.fraction("security.hijack.fingerprint_mismatch", 0.5)?,
                fingerprint_changed: r.fraction("security.hijack.fingerprint_changed", 0.1)?,
                accept_language: r.fraction("security.hijack.accept_language", 0.1)?,
                ip_velocity: r.fraction("security.hijack.ip_velocity", 0.3)?,
                velocity_window: r.positive_duration("security.hijack.velocity_window", minutes(5))?,
                velocity_max_ips: r.number("security.hijack.velocity_max_ips", 3u32)?,
            },
        };
        if security.max_limiter_keys == 0 {
            return Err(err("setting `security.max_limiter_keys`: must be at least 1"));
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
            revocation,
            security,
            auth,
            metrics_listen: r.socket_addr("metrics_listen")?,
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(flags: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let flags: Flags = flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::load(&flags, &|name| env.get(name).cloned())
    }

    #[test]
    fn defaults_are_the_guides() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.storage.kind, StorageKind::Embedded);
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.key_prefix, "atoms:session:");
        assert_eq!(c.session.idle_timeout, Duration::from_secs(30 * 60));
        assert_eq!(c.session.absolute_timeout, Duration::from_secs(480 * 60));
        assert_eq!(c.session.max_sessions_per_user, 5);
        assert!(c.session.device_validation);
        assert_eq!(c.session.device_match_threshold, 0.8);
        assert!(c.session.device_fingerprint_required);
        assert_eq!(c.session.cleanup_interval, Duration::from_secs(15 * 60));
        assert_eq!(c.token.proactive_refresh, Duration::from_secs(300));
        assert_eq!(c.token.grace_period, Duration::from_secs(300));
        assert_eq!(c.token.max_retries, 3);
        assert_eq!(c.token.retry_initial_delay, Duration::from_secs(1));
        assert_eq!(c.token.retry_max_delay, Duration::from_secs(30));
        assert_eq!(c.revocation.list_ttl, Duration::from_secs(24 * 3600));
        assert!(c.revocation.cascade);
        assert_eq!(c.revocation.watch_buffer, 4096);
        assert_eq!(c.revocation.max_watchers, 20_000);
        assert_eq!(c.server.concurrency_limit, 1024);
        assert_eq!(c.server.max_health_watch_streams, 4096);
        assert_eq!(c.security.hijack_threshold, 0.7);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.metrics_listen.is_none());
    }

    #[test]
    fn flags_beat_environment_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1\"\n[session]\nidle_timeout = \"10m\"\nmax_sessions_per_user = 9\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let c = load(
            &[("config", path), ("listen", "127.0.0.1:3")],
            &[("SESSION_AUTHORITY_LISTEN", "127.0.0.1:2"), ("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT", "20m")],
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 3);
        assert_eq!(c.session.idle_timeout, Duration::from_secs(20 * 60));
        assert_eq!(c.session.max_sessions_per_user, 9);
    }

    #[test]
    fn guide_environment_names_work() {
        let c = load(
            &[("storage", "redis")],
            &[
                ("REDIS_URL", "redis://127.0.0.1:6379"),
                ("OPENROUTER_CLIENT_ID", "cid"),
                ("KV_REST_API_URL", "https://kv"),
            ],
        )
        .unwrap();
        assert_eq!(c.storage.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(c.token.client_id.as_deref(), Some("cid"));
        assert_eq!(c.storage.kv_rest_url.as_deref(), Some("https://kv"));
    }

    #[test]
    fn errors_name_the_setting() {
        let e = load(&[("storage", "mongo")], &[]).unwrap_err().to_string();
        assert!(e.contains("`storage`") && e.contains("mongo"), "{e}");
        let e = load(&[], &[("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT", "soon")]).unwrap_err().to_string();
        assert!(e.contains("session.idle_timeout") && e.contains("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT"), "{e}");
        let e = load(&[("storage", "redis")], &[]).unwrap_err().to_string();
        assert!(e.contains("REDIS_URL"), "{e}");
        let e =
            load(&[], &[("SESSION_AUTHORITY_TLS_CERT", "/nonexistent/cert.pem"), ("SESSION_AUTHORITY_TLS_KEY", "/x")])
                .unwrap_err()
                .to_string();
        assert!(e.contains("tls.cert") && e.contains("/nonexistent/cert.pem"), "{e}");
        let e = load(&[], &[("SESSION_AUTHORITY_SESSION_DEVICE_MATCH_THRESHOLD", "1.5")]).unwrap_err().to_string();
        assert!(e.contains("device_match_threshold"), "{e}");
        let e = load(&[], &[("SESSION_AUTHORITY_REVOCATION_MAX_WATCHERS", "0")]).unwrap_err().to_string();
        assert!(e.contains("revocation.max_watchers"), "{e}");
        let c = load(&[], &[("SESSION_AUTHORITY_REVOCATION_MAX_WATCHERS", "3")]).unwrap();
        assert_eq!(c.revocation.max_watchers, 3);
        let e = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_HEALTH_WATCH_STREAMS", "0")]).unwrap_err().to_string();
        assert!(e.contains("server.max_health_watch_streams"), "{e}");
        let e = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_HEALTH_WATCH_STREAMS", "many")]).unwrap_err().to_string();
        assert!(e.contains("server.max_health_watch_streams"), "{e}");
        let c = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_HEALTH_WATCH_STREAMS", "2")]).unwrap();
        assert_eq!(c.server.max_health_watch_streams, 2);
    }

    #[test]
    fn unknown_file_keys_and_bad_api_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[session]\nidle_timout = \"10m\"\n").unwrap();
        let e = load(&[("config", path.to_str().unwrap())], &[]).unwrap_err().to_string();
        assert!(e.contains("session.idle_timout"), "{e}");

        std::fs::write(&path, "[token]\nrotation = false\n").unwrap();
        let e = load(&[("config", path.to_str().unwrap())], &[]).unwrap_err().to_string();
        assert!(e.contains("`token.rotation`") && e.contains("removed"), "{e}");

        std::fs::write(&path, "[[api_keys]]\nname = \"x\"\nrole = \"root\"\nhash = \"sha256:00\"\n").unwrap();
        let e = load(&[("config", path.to_str().unwrap())], &[]).unwrap_err().to_string();
        assert!(e.contains("api_keys[0].role"), "{e}");

        let e = load(&[], &[("SESSION_AUTHORITY_API_KEYS", "admin")]).unwrap_err().to_string();
        assert!(e.contains("SESSION_AUTHORITY_API_KEYS"), "{e}");
    }

    #[test]
    fn rate_limit_rules_have_defaults_overrides_and_new_names() {
        let c = load(&[], &[]).unwrap();
        let rules = &c.security.rules;
        assert_eq!(rules["token_refresh"].limit, 10);
        assert_eq!(rules["token_refresh"].period, Duration::from_secs(60));
        assert_eq!(rules["session_create"].limit, 5);
        assert_eq!(rules["session_create"].period, Duration::from_secs(300));
        assert_eq!(rules["session_create"].max_backoff, Duration::from_secs(3600));
        assert_eq!(rules["login_attempt"].max_backoff, Duration::from_secs(1800));
        assert_eq!(rules["validate_failure"].burst, 30);
        assert_eq!(c.security.max_limiter_keys, 100_000);
        assert!(rules.values().all(|r| r.backoff && r.backoff_multiplier == 2.0));
        assert_eq!(c.security.hijack.ip_new_network, 0.3);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[security.rules.session_create]\nlimit = 2\n[security.rules.api_call]\nlimit = 100\nperiod = \"1m\"\nburst = 20\nbackoff = false\n[security.hijack]\nip_new_network = 0.4\n",
        )
        .unwrap();
        let c =
            load(&[("config", path.to_str().unwrap())], &[("SESSION_AUTHORITY_SECURITY_RULES_API_CALL_LIMIT", "50")])
                .unwrap();
        let rules = &c.security.rules;
        assert_eq!(rules["session_create"].limit, 2);
        assert_eq!(rules["session_create"].burst, 2);
        assert_eq!(rules["session_create"].period, Duration::from_secs(300));
        assert_eq!(rules["api_call"].limit, 50);
        assert_eq!(rules["api_call"].burst, 20);
        assert!(!rules["api_call"].backoff);
        assert_eq!(c.security.hijack.ip_new_network, 0.4);
    }

    #[test]
    fn rule_errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let path_str = path.to_str().unwrap();
        for (text, expected) in [
            ("[security.rules.x]\nlimt = 3\n", "security.rules.x.limt"),
            ("[security.rules.x]\nlimit = 3\n", "security.rules.x.period"),
            ("[security.rules.session_create]\nlimit = 0\n", "security.rules.session_create.limit"),
            ("[security.rules.session_create]\nperiod = \"soon\"\n", "security.rules.session_create.period"),
            ("[security.rules.y]\nlimit = 1\nperiod = \"1s\"\nbackoff_multiplier = 0.5\n", "backoff_multiplier"),
            ("[security.hijack]\nuser_agent = 2\n", "security.hijack.user_agent"),
            ("[security.hijack]\nuser_agnt = 0.1\n", "security.hijack.user_agnt"),
            ("[security]\nmax_limiter_keys = 0\n", "security.max_limiter_keys"),
            ("[security]\nmax_limiter_keys = \"many\"\n", "security.max_limiter_keys"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = load(&[("config", path_str)], &[]).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn hashed_and_plaintext_keys_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let hash = format!("sha256:{}", "ab".repeat(32));
        std::fs::write(&path, format!("[[api_keys]]\nname = \"ops\"\nrole = \"admin\"\nhash = \"{hash}\"\n")).unwrap();
        let c = load(
            &[("config", path.to_str().unwrap())],
            &[("SESSION_AUTHORITY_API_KEYS", "service:0123456789abcdef0123,watcher:fedcba9876543210fedc")],
        )
        .unwrap();
        assert_eq!(c.auth.api_keys.len(), 1);
        assert_eq!(c.auth.api_keys[0].role, Role::Admin);
        assert_eq!(c.auth.api_keys[0].sha256, [0xab; 32]);
        assert_eq!(c.auth.plaintext_api_keys.len(), 2);
        assert_eq!(c.auth.plaintext_api_keys[1].0, Role::Watcher);
    }
}
