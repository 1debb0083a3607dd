//! The `kv-rest` backend: sessions in Vercel KV / Upstash Redis over its REST protocol, on
//! reqwest with rustls. It sends the commands and Lua scripts of [`crate::store::keyspace`], so
//! its guarantees are the `redis` backend's.
//!
//! Protocol (checked against the official `@upstash/redis` client by the test peer in
//! `tests/peers/kv-rest/`): `POST /` with a JSON array `[command, args...]` and
//! `Authorization: Bearer <KV_REST_API_TOKEN>`; the answer is `{"result": ...}` or, for a Redis
//! error, HTTP 400 `{"error": "..."}`. Every argument is sent as a JSON string (exact bytes, no
//! number rounding), and `Upstash-Encoding: base64` makes the server base64 every string in the
//! result, which is the only way to read values back byte-exact: a decoder takes integers and
//! `null` as they are, the literal `"OK"` as OK, and base64-decodes every other string.
//!
//! Failures: 401/403 (check KV_REST_API_TOKEN), 404 (check KV_REST_API_URL), 429 (with a retry
//! hint), 5xx, timeouts and network errors are [`Error::Unavailable`]. Only reads are retried
//! (twice, briefly, within the storage timeout); a script or write that may have run is never
//! sent again. EVALSHA answered NOSCRIPT did not run, so it is sent once more as EVAL.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;

use crate::error::ConfigError;
use crate::error::{Error, Result};
use crate::store::keyspace::{KeyspaceStore, Layout, Lua, Reply, Transport};

/// Sessions in Vercel KV / Upstash over REST.
pub type KvRestStore = KeyspaceStore<KvRestTransport>;

/// Builds the store (no request is made here).
pub fn open(
    url: &str,
    token: &SecretString,
    prefix: &str,
    timeout: Duration,
) -> std::result::Result<KvRestStore, ConfigError> {
    let layout = Layout::new(prefix).map_err(|e| ConfigError(format!("setting `redis.key_prefix`: {e}")))?;
    let bad_url = |why: &str| ConfigError(format!("setting `kv_rest.url` (KV_REST_API_URL): {why}"));
    let parsed = reqwest::Url::parse(url.trim()).map_err(|e| bad_url(&format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "https" | "http") {
        return Err(bad_url("expected an https:// URL"));
    }
    // The bearer token goes with every request: plain HTTP only where it cannot leave the host.
    if parsed.scheme() == "http" && !is_loopback(&parsed) {
        return Err(bad_url(
            "plain http:// sends KV_REST_API_TOKEN in the clear; use an https:// URL (http:// is allowed only on loopback: 127.0.0.0/8, ::1, localhost)",
        ));
    }
    if parsed.query().is_some() || !parsed.username().is_empty() {
        return Err(bad_url("give the token in KV_REST_API_TOKEN, not in the URL"));
    }
    // reqwest is built without a bundled crypto provider; use ring, which tonic already uses.
    // An error only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(1)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ConfigError(format!("kv-rest HTTP client: {e}")))?;
    let base = parsed.as_str().trim_end_matches('/').to_owned();
    Ok(KeyspaceStore::new(KvRestTransport { client, base, token: token.clone() }, layout, timeout))
}

/// Whether the URL's host is loopback: 127.0.0.0/8, ::1 or `localhost`.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// Commands over the Upstash REST protocol.
#[derive(Clone)]
pub struct KvRestTransport {
    client: reqwest::Client,
    base: String,
    token: SecretString,
}

impl std::fmt::Debug for KvRestTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRestTransport").field("base", &self.base).finish_non_exhaustive()
    }
}

/// Why one request failed.
enum Failure {
    /// Worth retrying a read: 5xx, timeout, network error, unreadable answer.
    Transient(Error),
    /// Not worth retrying now: 401, 429, other 4xx.
    Final(Error),
    /// The command ran (or was refused) in Redis with this error reply.
    Redis(String),
}

fn unavailable(message: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("session storage (kv-rest) {message}"))
}

/// Delays before the retries of a read.
const READ_RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(150)];

impl KvRestTransport {
    async fn attempt(&self, body: &[String]) -> std::result::Result<Value, Failure> {
        let body = serde_json::to_vec(body)
            .map_err(|e| Failure::Final(Error::internal_from("kv-rest: cannot encode a command", e)))?;
        let response = self
            .client
            .post(format!("{}/", self.base))
            .bearer_auth(self.token.expose_secret())
            .header("Upstash-Encoding", "base64")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                Failure::Transient(if e.is_timeout() {
                    unavailable("did not answer in time")
                } else if e.is_connect() {
                    unavailable("cannot be reached (connection failed)")
                } else {
                    unavailable(format!("request failed: {e}"))
                })
            })?;
        let status = response.status();
        let retry_after = crate::http::retry_after(response.headers(), std::time::SystemTime::now());
        let bytes = response.bytes().await.map_err(|e| Failure::Transient(unavailable(format!("answer lost: {e}"))))?;
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        let error_text = json.as_ref().and_then(|j| j.get("error")).and_then(Value::as_str).map(str::to_owned);
        match status {
            StatusCode::OK => match (json, error_text) {
                (_, Some(error)) => Err(Failure::Redis(error)),
                (Some(Value::Object(mut map)), None) => match map.remove("result") {
                    Some(result) => Ok(result),
                    None => Err(Failure::Transient(unavailable("answered without a result"))),
                },
                _ => Err(Failure::Transient(unavailable("answered with an unreadable body (HTTP 200)"))),
            },
            StatusCode::BAD_REQUEST => match error_text {
                Some(error) => Err(Failure::Redis(error)),
                None => Err(Failure::Final(Error::internal("kv-rest: HTTP 400 without an error text"))),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Failure::Final(unavailable(format!(
                "refused the credentials (HTTP {}); check KV_REST_API_TOKEN",
                status.as_u16()
            )))),
            StatusCode::NOT_FOUND => {
                Err(Failure::Final(unavailable("answered HTTP 404; check KV_REST_API_URL (the database's REST URL)")))
            }
            StatusCode::TOO_MANY_REQUESTS => Err(Failure::Final(Error::Unavailable {
                message: "session storage (kv-rest) is rate limiting this service (HTTP 429); retry shortly".into(),
                retry_after: Some(retry_after.unwrap_or(Duration::from_secs(1))),
            })),
            s if s.is_server_error() => Err(Failure::Transient(unavailable(format!("failed (HTTP {})", s.as_u16())))),
            s => Err(Failure::Final(Error::internal(format!(
                "kv-rest: unexpected HTTP {}: {}",
                s.as_u16(),
                error_text.unwrap_or_default()
            )))),
        }
    }

    /// Sends `body`; a read is retried after transient failures.
    async fn send(&self, body: &[String], read_only: bool) -> std::result::Result<Value, Failure> {
        let mut delays = READ_RETRY_DELAYS.iter();
        loop {
            match self.attempt(body).await {
                Err(Failure::Transient(e)) if read_only => match delays.next() {
                    Some(delay) => {
                        tracing::debug!(error = %e, "kv-rest read failed; retrying");
                        tokio::time::sleep(*delay).await;
                    }
                    None => return Err(Failure::Transient(e)),
                },
                other => return other,
            }
        }
    }
}

fn finish(result: std::result::Result<Value, Failure>) -> Result<Reply> {
    match result {
        Ok(value) => decode(value),
        Err(Failure::Transient(e) | Failure::Final(e)) => Err(e),
        Err(Failure::Redis(message)) => Err(redis_error(&message)),
    }
}

/// An error reply: not-ready states are outages, anything else is a bug.
fn redis_error(message: &str) -> Error {
    let code = message.split_whitespace().next().unwrap_or_default();
    if matches!(code, "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "OOM") {
        unavailable(format!("is not ready: {message}"))
    } else {
        Error::internal(format!("kv-rest: redis error: {message}"))
    }
}

/// A `result` in base64 mode.
fn decode(value: Value) -> Result<Reply> {
    Ok(match value {
        Value::Null => Reply::Nil,
        Value::Number(n) => Reply::Int(n.as_i64().ok_or_else(|| Error::internal(format!("kv-rest: number {n}")))?),
        Value::String(s) if s == "OK" => Reply::Data(b"OK".to_vec()),
        Value::String(s) => {
            Reply::Data(STANDARD.decode(s.as_bytes()).map_err(|_| Error::internal("kv-rest: a string is not base64"))?)
        }
        Value::Array(items) => Reply::Array(items.into_iter().map(decode).collect::<Result<_>>()?),
        Value::Bool(b) => Reply::Int(i64::from(b)),
        Value::Object(_) => return Err(Error::internal("kv-rest: unexpected object in a result")),
    })
}

#[async_trait]
impl Transport for KvRestTransport {
    fn name(&self) -> &'static str {
        "kv-rest"
    }

    async fn command(&self, args: Vec<String>, read_only: bool) -> Result<Reply> {
        finish(self.send(&args, read_only).await)
    }

    async fn eval(&self, lua: &Lua, keys: Vec<String>, args: Vec<String>, read_only: bool) -> Result<Reply> {
        let call = |command: &str, script: &str| {
            let mut body = Vec::with_capacity(3 + keys.len() + args.len());
            body.extend([command.to_owned(), script.to_owned(), keys.len().to_string()]);
            body.extend(keys.iter().cloned());
            body.extend(args.iter().cloned());
            body
        };
        match self.send(&call("EVALSHA", lua.sha1()), read_only).await {
            // NOSCRIPT: the server does not know the script, so it did not run; EVAL is safe.
            Err(Failure::Redis(message)) if message.starts_with("NOSCRIPT") => {
                tracing::debug!(script = lua.name, "kv-rest: script not cached; sending EVAL");
                finish(self.send(&call("EVAL", lua.source), read_only).await)
            }
            other => finish(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_results_decode_exactly() {
        let value = serde_json::json!(["OK", "UE9ORw==", 42, null, ["/w=="]]);
        assert_eq!(
            decode(value).unwrap(),
            Reply::Array(vec![
                Reply::Data(b"OK".to_vec()),
                Reply::Data(b"PONG".to_vec()),
                Reply::Int(42),
                Reply::Nil,
                Reply::Array(vec![Reply::Data(vec![0xff])]),
            ])
        );
        assert!(decode(serde_json::json!("not base64!")).is_err());
    }

    #[test]
    fn not_ready_replies_are_outages() {
        assert!(matches!(redis_error("LOADING Redis is loading the dataset in memory"), Error::Unavailable { .. }));
        assert!(matches!(redis_error("WRONGTYPE Operation against a key"), Error::Internal { .. }));
    }

    #[test]
    fn urls_are_checked_without_echoing_secrets() {
        let token = SecretString::from("t".to_string());
        let timeout = Duration::from_secs(1);
        assert!(open("ftp://kv.example", &token, "p:", timeout).is_err());
        let e = open("https://user:secret@kv.example", &token, "p:", timeout).unwrap_err().0;
        assert!(e.contains("KV_REST_API_TOKEN") && !e.contains("secret"), "{e}");
        assert!(open("https://kv.example", &token, "p:{x}", timeout).is_err());
        for url in ["http://kv.example", "http://10.1.2.3", "http://[2001:db8::1]", "http://localhost.evil.example"] {
            let e = open(url, &token, "p:", timeout).unwrap_err().0;
            assert!(e.contains("KV_REST_API_URL") && e.contains("https://"), "{url}: {e}");
        }
        for url in
            ["http://127.0.0.1:8080", "http://127.9.9.9", "http://[::1]:80", "http://LOCALHOST", "https://kv.example"]
        {
            assert!(open(url, &token, "p:", timeout).is_ok(), "{url}");
        }
    }
}
