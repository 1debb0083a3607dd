//! How a setting is resolved: flags, then the environment, then the file; and the parsers of
//! the structured settings (API keys, rate rules, providers). The resolver records every key it
//! is asked for, so the calls that resolve the settings are their only list: a file key that
//! none of them asked for is unknown.

use super::*;
use crate::token::ClientAuth;

/// Resolves one setting through flags, then the environment, then the file.
pub(super) struct Resolver<'a> {
    pub(super) flags: &'a Flags,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) file: BTreeMap<String, toml::Value>,
    pub(super) file_name: String,
    /// Every key resolution asked for.
    pub(super) asked: std::cell::RefCell<BTreeSet<String>>,
}

/// The environment variable of a setting: `SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT`.
pub fn env_name(key: &str) -> String {
    format!("SESSION_AUTHORITY_{}", key.replace('.', "_").to_uppercase())
}

impl Resolver<'_> {
    /// The raw value and a description of where it came from.
    pub(super) fn raw(&self, key: &str, aliases: &[&str]) -> Option<(String, String)> {
        if !self.asked.borrow().contains(key) {
            self.asked.borrow_mut().insert(key.to_owned());
        }
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

    pub(super) fn parsed<T>(
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

    pub(super) fn duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        self.parsed(key, &[], default, "a duration such as 30s, 15m or 24h", |s| humantime::parse_duration(s).ok())
    }

    pub(super) fn positive_duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let value = self.duration(key, default)?;
        if value.is_zero() {
            return Err(err(format!("setting `{key}`: must be greater than zero")));
        }
        Ok(value)
    }

    pub(super) fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        self.parsed(key, &[], default, "true or false", |s| match s {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        })
    }

    pub(super) fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ConfigError> {
        self.parsed(key, &[], default, "a whole number", |s| s.parse().ok())
    }

    pub(super) fn fraction(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        self.parsed(key, &[], default, "a number between 0 and 1", |s| {
            s.parse::<f64>().ok().filter(|v| (0.0..=1.0).contains(v))
        })
    }

    /// A whole number, or `None` when unset or empty.
    pub(super) fn optional_number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.parsed(
            key,
            &[],
            None,
            "a whole number",
            |s| if s.is_empty() { Some(None) } else { s.parse().ok().map(Some) },
        )
    }

    /// An HTTP token (a header, cookie or descriptor-entry name: letters, digits and `-_.`),
    /// lower-cased when `header` (Envoy hands headers over lower-cased).
    pub(super) fn header_name(&self, key: &str, default: &str, header: bool) -> Result<String, ConfigError> {
        let Some((text, origin)) = self.raw(key, &[]) else { return Ok(default.to_owned()) };
        let name = text.trim();
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(err(format!(
                "setting `{key}` ({origin}): expected a name of letters, digits, '-', '_' or '.', got {text:?}"
            )));
        }
        Ok(if header { name.to_ascii_lowercase() } else { name.to_owned() })
    }

    pub(super) fn string(&self, key: &str, aliases: &[&str]) -> Option<String> {
        self.raw(key, aliases).map(|(v, _)| v).filter(|v| !v.trim().is_empty())
    }

    pub(super) fn socket_addr(&self, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
        match self.raw(key, &[]) {
            None => Ok(None),
            Some((text, _)) if text.trim().is_empty() => Ok(None),
            Some((text, origin)) => text.trim().parse().map(Some).map_err(|_| {
                err(format!("setting `{key}` ({origin}): expected an address such as 127.0.0.1:50051, got {text:?}"))
            }),
        }
    }

    pub(super) fn file_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, ConfigError> {
        match self.raw(key, &[]) {
            None => Ok(None),
            Some((path, origin)) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| err(format!("setting `{key}` ({origin}): cannot read {path:?}: {e}"))),
        }
    }
}

/// Flattens a TOML document to dotted keys; `[[api_keys]]` is returned apart.
pub(super) fn flatten(
    prefix: &str,
    table: toml::Table,
    out: &mut BTreeMap<String, toml::Value>,
) -> Result<(), ConfigError> {
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

pub(super) fn parse_api_key_table(index: usize, value: &toml::Value) -> Result<ApiKeyEntry, ConfigError> {
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
        .ok_or_else(|| err(format!("{}: expected service, admin, watcher or proxy, got {role_name:?}", at("role"))))?;
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

pub(super) fn parse_plaintext_keys(text: &str) -> Result<Vec<(Role, SecretString)>, ConfigError> {
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
                "setting `api_keys` (environment variable SESSION_AUTHORITY_API_KEYS): entry {} has role {:?}; expected service, admin, watcher or proxy",
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

/// The rate-limit rules: the `defaults`, overridden field by field, plus every rule named in the
/// file. A new rule needs at least `limit` and `period`.
pub(super) fn resolve_rules(
    r: &Resolver<'_>,
    defaults: &BTreeMap<String, Rule>,
) -> Result<BTreeMap<String, Rule>, ConfigError> {
    let mut names: BTreeSet<String> = defaults.keys().cloned().collect();
    names.extend(r.file.keys().filter_map(|k| rule_key(k)).map(str::to_owned));
    let mut rules = BTreeMap::new();
    // The backoff of a new rule, and the max and multiplier of a rule that has none by default.
    let fallback = Backoff { multiplier: 2.0, max: Duration::from_secs(3600) };
    for name in names {
        let key = |field: &str| format!("security.rules.{name}.{field}");
        let default = match defaults.get(&name) {
            Some(rule) => rule.clone(),
            None => {
                for field in ["limit", "period"] {
                    if r.raw(&key(field), &[]).is_none() {
                        return Err(err(format!("setting `{}`: required for the new rule {name:?}", key(field))));
                    }
                }
                let backoff = Some(fallback.clone());
                Rule { name: name.clone(), limit: 1, period: Duration::from_secs(60), burst: 1, backoff }
            }
        };
        let default_backoff = default.backoff.clone().unwrap_or_else(|| fallback.clone());
        let limit = r.number(&key("limit"), default.limit)?;
        let period = r.positive_duration(&key("period"), default.period)?;
        let max_backoff = r.positive_duration(&key("max_backoff"), default_backoff.max)?;
        if limit == 0 {
            return Err(err(format!("setting `{}`: must be at least 1", key("limit"))));
        }
        // The bucket follows the limit unless it is set.
        let burst = r.number(&key("burst"), limit)?;
        if burst == 0 {
            return Err(err(format!("setting `{}`: must be at least 1", key("burst"))));
        }
        let multiplier =
            r.parsed(&key("backoff_multiplier"), &[], default_backoff.multiplier, "a number of at least 1", |s| {
                s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 1.0)
            })?;
        let backoff =
            r.bool(&key("backoff"), default.backoff.is_some())?.then_some(Backoff { multiplier, max: max_backoff });
        rules.insert(name.clone(), Rule { name, limit, period, burst, backoff });
    }
    Ok(rules)
}

pub(super) fn client_auth(r: &Resolver<'_>, key: &str) -> Result<ClientAuth, ConfigError> {
    r.parsed(key, &[], ClientAuth::Basic, "client_secret_basic or client_secret_post", ClientAuth::parse)
}

pub(super) fn check_url(key: &str, value: &Option<String>) -> Result<(), ConfigError> {
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
pub(super) fn resolve_providers(r: &Resolver<'_>) -> Result<Vec<ProviderSettings>, ConfigError> {
    use crate::token::DEFAULT_PROVIDER;
    let request_timeout = r.positive_duration("token.request_timeout", Duration::from_secs(10))?;
    let flat = ProviderSettings {
        name: DEFAULT_PROVIDER.into(),
        client_id: r.string("token.client_id", &["OAUTH_CLIENT_ID", "OPENROUTER_CLIENT_ID"]),
        client_secret: r
            .string("token.client_secret", &["OAUTH_CLIENT_SECRET", "OPENROUTER_CLIENT_SECRET"])
            .map(SecretString::from),
        token_endpoint: r.string("token.token_endpoint", &[]),
        introspection_endpoint: r.string("token.introspection_endpoint", &[]),
        revocation_endpoint: r.string("token.revocation_endpoint", &[]),
        issuer: r.string("token.issuer", &[]),
        client_auth: client_auth(r, "token.client_auth")?,
        request_timeout,
    };
    let mut providers = Vec::new();
    if flat.token_endpoint.is_some() || flat.issuer.is_some() {
        for key in ["token.token_endpoint", "token.introspection_endpoint", "token.revocation_endpoint", "token.issuer"]
        {
            check_url(key, &r.string(key, &[]))?;
        }
        providers.push(flat);
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
            request_timeout,
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
