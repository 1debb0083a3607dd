//! `session-authority sidecar`: an ext_authz endpoint next to Envoy that forwards each `Check`
//! to the authority and keeps the allowed answers for a short time, dropping them as soon as the
//! revocation feed names their session.
//!
//! The cache is correct only while it hears every revocation, so it is used only while its
//! `WatchRevocations` stream is live (the first message of a stream, always a heartbeat, makes
//! it live; an error, the end of the stream or a silence longer than [`FEED_SILENCE`] makes it
//! not live and empties it). A revoked session is therefore refused within the feed's delay,
//! never as late as the TTL.
//!
//! - Key: SHA-256 over every input the authority's decision reads (the `authorization`,
//!   `cookie`, `x-forwarded-for`, `user-agent` and `accept-language` headers and the source
//!   IP), each length-prefixed. Requests that differ in any of them never share an answer,
//!   whatever cookie name or trusted hops the authority uses.
//! - Only allowed answers are kept, until the earlier of the TTL and the `valid_until_ms` the
//!   authority put in their metadata (the session's idle or absolute deadline, or its access
//!   token's expiry). Denials always go to the authority, so its failure counting and rate
//!   limits see every one.
//! - A check in flight when a revocation arrives is not stored: every revocation (and every
//!   change of liveness) bumps a generation, and an answer is stored only if the generation it
//!   started under is still current.
//! - When the authority cannot be reached the answer is 503 (fail closed), like the authority's
//!   own when its storage is down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{Authorization, AuthorizationServer, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::clock::Millis;
use crate::grpc::envoy::{Denial, allowed_session, header, source_address};
use crate::grpc::pb;

/// Sidecar checks by `result`: `hit` (answered from the cache), `miss` (forwarded, the feed
/// live) and `bypass` (forwarded, the feed not live, so nothing cached).
pub const CACHE_LOOKUPS: &str = "ext_authz_cache_total";
/// Cache entries dropped because the revocation feed named their session.
pub const CACHE_REVOKED: &str = "ext_authz_cache_revoked_total";
/// Entries in the cache now.
pub const CACHE_ENTRIES: &str = "ext_authz_cache_entries";
/// 1 while the revocation feed is live (the cache in use), else 0.
pub const FEED_LIVE: &str = "ext_authz_cache_feed_live";

/// The heartbeat interval the sidecar asks the feed for.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A feed silent for this long is treated as broken: three missed heartbeats.
pub const FEED_SILENCE: Duration = Duration::from_secs(15);
/// How long a forwarded Check may take before the answer is 503.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How the sidecar runs.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The authority's URL.
    pub authority: String,
    /// Where to serve ext_authz.
    pub listen: SocketAddr,
    /// Longest time an allowed answer is reused.
    pub cache_ttl: Duration,
    /// Most answers kept at once.
    pub max_entries: usize,
    /// The `proxy` (or `admin`) API key the sidecar calls the authority with.
    pub key: SecretString,
}

type CacheKey = [u8; 32];

/// The cache key of a Check: every input the authority's decision depends on.
pub fn cache_key(check: &CheckRequest) -> CacheKey {
    let mut hash = Sha256::new();
    let mut field = |value: Option<&str>| match value {
        Some(v) => {
            hash.update([1]);
            hash.update((v.len() as u64).to_be_bytes());
            hash.update(v.as_bytes());
        }
        None => hash.update([0]),
    };
    for name in ["authorization", "cookie", "x-forwarded-for", "user-agent", "accept-language"] {
        field(header(check, name));
    }
    field(source_address(check).map(|ip| ip.to_string()).as_deref());
    hash.finalize().into()
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A kept answer.
    Hit(Box<CheckResponse>),
    /// Nothing kept; store the authority's answer under this generation.
    Miss(u64),
    /// The feed is not live: forward and keep nothing.
    Bypass,
}

struct Entry {
    response: CheckResponse,
    session_id: String,
    until: Instant,
}

#[derive(Default)]
struct Inner {
    live: bool,
    generation: u64,
    entries: HashMap<CacheKey, Entry>,
    by_session: HashMap<String, Vec<CacheKey>>,
}

impl Inner {
    fn remove(&mut self, key: &CacheKey) {
        if let Some(entry) = self.entries.remove(key)
            && let Some(keys) = self.by_session.get_mut(&entry.session_id)
        {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_session.remove(&entry.session_id);
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.by_session.clear();
        self.generation += 1;
    }
}

/// Allowed answers by request, invalidated by the revocation feed.
pub struct DecisionCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_entries: usize,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache").field("ttl", &self.ttl).field("max_entries", &self.max_entries).finish()
    }
}

impl DecisionCache {
    /// An empty cache, not live until [`DecisionCache::set_live`].
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        DecisionCache { inner: Mutex::new(Inner::default()), ttl, max_entries }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kept answer for `key`, if any and still fresh.
    pub fn lookup(&self, key: &CacheKey, now: Instant) -> Lookup {
        let mut inner = self.lock();
        if !inner.live {
            return Lookup::Bypass;
        }
        match inner.entries.get(key) {
            Some(entry) if entry.until > now => Lookup::Hit(Box::new(entry.response.clone())),
            Some(_) => {
                inner.remove(key);
                Lookup::Miss(inner.generation)
            }
            None => Lookup::Miss(inner.generation),
        }
    }

    /// Keeps an allowed `response` for `key` if nothing was revoked since `generation` was
    /// handed out. `now_ms` is the wall clock the authority's `valid_until_ms` compares with.
    /// Returns whether it was kept.
    pub fn store(
        &self,
        key: CacheKey,
        generation: u64,
        response: &CheckResponse,
        now: Instant,
        now_ms: Millis,
    ) -> bool {
        let Some((session_id, valid_until)) = allowed_session(response) else { return false };
        let left = Duration::from_millis(u64::try_from(valid_until.saturating_sub(now_ms)).unwrap_or(0));
        let lifetime = left.min(self.ttl);
        if lifetime.is_zero() {
            return false;
        }
        let mut inner = self.lock();
        if !inner.live || inner.generation != generation {
            return false;
        }
        if inner.entries.len() >= self.max_entries && !inner.entries.contains_key(&key) {
            let Inner { entries, by_session, .. } = &mut *inner;
            entries.retain(|_, entry| entry.until > now);
            by_session.retain(|_, keys| {
                keys.retain(|k| entries.contains_key(k));
                !keys.is_empty()
            });
            if inner.entries.len() >= self.max_entries {
                return false;
            }
        }
        inner.remove(&key);
        inner.by_session.entry(session_id.clone()).or_default().push(key);
        inner.entries.insert(key, Entry { response: response.clone(), session_id, until: now + lifetime });
        metrics::gauge!(CACHE_ENTRIES).set(inner.entries.len() as f64);
        true
    }

    /// Drops every answer of `session_id`; answers in flight are not kept. Returns how many
    /// were dropped.
    pub fn revoke(&self, session_id: &str) -> usize {
        let mut inner = self.lock();
        inner.generation += 1;
        let keys = inner.by_session.remove(session_id).unwrap_or_default();
        for key in &keys {
            inner.entries.remove(key);
        }
        metrics::gauge!(CACHE_ENTRIES).set(inner.entries.len() as f64);
        keys.len()
    }

    /// Marks the feed live or not; either change empties the cache.
    pub fn set_live(&self, live: bool) {
        let mut inner = self.lock();
        if inner.live != live {
            inner.live = live;
            inner.clear();
            metrics::gauge!(CACHE_ENTRIES).set(0.0);
            metrics::gauge!(FEED_LIVE).set(if live { 1.0 } else { 0.0 });
        }
    }

    /// Answers kept now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Client = AuthorizationClient<Channel>;

/// The sidecar's ext_authz service.
#[derive(Clone)]
pub struct CachingAuthorization {
    cache: Arc<DecisionCache>,
    client: Client,
    key: MetadataValue<Ascii>,
}

impl std::fmt::Debug for CachingAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingAuthorization").field("cache", &self.cache).finish_non_exhaustive()
    }
}

fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
}

impl CachingAuthorization {
    async fn forward(&self, check: CheckRequest) -> CheckResponse {
        let mut request = Request::new(check);
        request.metadata_mut().insert("authorization", self.key.clone());
        request.set_timeout(CHECK_TIMEOUT);
        match self.client.clone().check(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(code = ?status.code(), error = status.message(), "the authority did not answer a Check; refusing it (fail closed)");
                Denial::unavailable("the session could not be checked right now; retry shortly").into_response()
            }
        }
    }
}

#[tonic::async_trait]
impl Authorization for CachingAuthorization {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let check = request.into_inner();
        let key = cache_key(&check);
        let answer = match self.cache.lookup(&key, Instant::now()) {
            Lookup::Hit(response) => {
                metrics::counter!(CACHE_LOOKUPS, "result" => "hit").increment(1);
                *response
            }
            Lookup::Miss(generation) => {
                metrics::counter!(CACHE_LOOKUPS, "result" => "miss").increment(1);
                let response = self.forward(check).await;
                self.cache.store(key, generation, &response, Instant::now(), now_ms());
                response
            }
            Lookup::Bypass => {
                metrics::counter!(CACHE_LOOKUPS, "result" => "bypass").increment(1);
                self.forward(check).await
            }
        };
        Ok(Response::new(answer))
    }
}

/// Follows the revocation feed for `cache` until the process ends: live from the first message
/// of each stream, dropping the answers of every revoked session, not live (and empty) between
/// streams. Reconnects with backoff; an answer the key can never get (UNAUTHENTICATED,
/// PERMISSION_DENIED) is logged as an error and retried slowly, the cache staying bypassed.
pub async fn follow_feed(endpoint: Endpoint, key: MetadataValue<Ascii>, cache: Arc<DecisionCache>) {
    let first_delay = Duration::from_millis(100);
    let mut delay = first_delay;
    loop {
        let outcome = watch_once(&endpoint, &key, &cache).await;
        cache.set_live(false);
        match &outcome {
            Ok(true) => delay = first_delay,
            Ok(false) => {}
            Err(status) if matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
                tracing::error!(code = ?status.code(), error = status.message(), "the revocation feed refused the sidecar's key; every Check goes to the authority");
                delay = Duration::from_secs(10);
            }
            Err(_) => {}
        }
        if let Err(status) = &outcome {
            tracing::warn!(code = ?status.code(), error = status.message(), retry_in_ms = delay.as_millis() as u64, "revocation feed down; cache bypassed");
        } else {
            tracing::warn!(retry_in_ms = delay.as_millis() as u64, "revocation feed ended; cache bypassed");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// One stream. The cache was emptied when it last stopped being live and nothing was stored
/// while not live, so each stream starts from now: no earlier event can concern a kept answer.
async fn watch_once(endpoint: &Endpoint, key: &MetadataValue<Ascii>, cache: &DecisionCache) -> Result<bool, Status> {
    let channel = endpoint.connect().await.map_err(|e| Status::unavailable(format!("cannot connect: {e}")))?;
    let mut client = pb::revocation_service_client::RevocationServiceClient::new(channel);
    let mut request = Request::new(pb::WatchRevocationsRequest {
        after_cursor: String::new(),
        user_id: String::new(),
        heartbeat_interval: Some(prost_types::Duration { seconds: HEARTBEAT.as_secs() as i64, nanos: 0 }),
    });
    request.metadata_mut().insert("authorization", key.clone());
    let mut stream = client.watch_revocations(request).await?.into_inner();
    let mut received = false;
    loop {
        let message = match tokio::time::timeout(FEED_SILENCE, stream.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no heartbeat for three intervals")),
            Ok(message) => message?,
        };
        let Some(message) = message else { return Ok(received) };
        if !received {
            received = true;
            cache.set_live(true);
            tracing::info!("revocation feed live; caching allowed answers");
        }
        if let Some(pb::watch_revocations_response::Message::Event(event)) = message.message {
            let dropped = cache.revoke(&event.session_id);
            if dropped > 0 {
                metrics::counter!(CACHE_REVOKED).increment(dropped as u64);
            }
        }
    }
}

/// Serves the sidecar's Prometheus `/metrics` on `addr` (its cache counters, not the
/// authority's metrics).
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    let (recorder, exporter) = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .build()
        .map_err(|e| anyhow::anyhow!("--metrics-listen: cannot serve metrics on {addr}: {e}"))?;
    metrics::set_global_recorder(recorder).map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics listener stopped");
        }
    });
    metrics::describe_counter!(
        CACHE_LOOKUPS,
        "Sidecar Checks by result: hit, miss (forwarded, feed live), bypass (forwarded, feed not live)"
    );
    metrics::describe_counter!(CACHE_REVOKED, "Cached answers dropped because the revocation feed named their session");
    metrics::describe_gauge!(CACHE_ENTRIES, "Allowed answers cached now");
    metrics::describe_gauge!(FEED_LIVE, "1 while the revocation feed is live and the cache in use");
    Ok(())
}

/// Runs the sidecar until `shutdown` resolves.
pub async fn run(config: SidecarConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(config.max_entries > 0, "--max-entries must be at least 1");
    anyhow::ensure!(!config.cache_ttl.is_zero(), "--cache-ttl must be longer than 0");
    let key: MetadataValue<Ascii> = format!("Bearer {}", config.key.expose_secret().trim())
        .parse()
        .map_err(|_| anyhow::anyhow!("SESSION_AUTHORITY_KEY is not a valid header value"))?;
    let endpoint = Endpoint::from_shared(config.authority.clone())
        .map_err(|e| anyhow::anyhow!("--authority {}: {e}", config.authority))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let cache = Arc::new(DecisionCache::new(config.cache_ttl, config.max_entries));
    metrics::gauge!(FEED_LIVE).set(0.0);
    for result in ["hit", "miss", "bypass"] {
        metrics::counter!(CACHE_LOOKUPS, "result" => result).absolute(0);
    }
    let feed = tokio::spawn(follow_feed(endpoint.clone(), key.clone(), cache.clone()));
    let service = CachingAuthorization { cache, client: AuthorizationClient::new(endpoint.connect_lazy()), key };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    tracing::info!(%local_addr, authority = %config.authority, cache_ttl_ms = config.cache_ttl.as_millis() as u64, "serving");
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(AuthorizationServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    feed.abort();
    served.map_err(|e| anyhow::anyhow!("serving ext_authz: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::envoy::allow_metadata;
    use envoy_types::ext_authz::v3::pb::{HttpResponse, OkHttpResponse};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};

    fn check(headers: &[(&str, &str)]) -> CheckRequest {
        let http = attribute_context::HttpRequest {
            headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Default::default()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request { http: Some(http), ..Default::default() }),
                ..Default::default()
            }),
        }
    }

    fn allowed(session_id: &str, valid_until: Millis) -> CheckResponse {
        CheckResponse {
            status: Some(envoy_types::pb::google::rpc::Status::default()),
            dynamic_metadata: Some(allow_metadata("u", session_id, valid_until)),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        }
    }

    const NOW_MS: Millis = 1_000_000;

    #[test]
    fn every_input_of_the_decision_is_in_the_key() {
        let base = [("cookie", "session_id=a"), ("user-agent", "ua")];
        let key = cache_key(&check(&base));
        assert_eq!(key, cache_key(&check(&base)));
        assert_ne!(key, cache_key(&check(&[("cookie", "session_id=b"), ("user-agent", "ua")])));
        assert_ne!(key, cache_key(&check(&[("cookie", "session_id=a"), ("user-agent", "ub")])));
        assert_ne!(
            key,
            cache_key(&check(&[("cookie", "session_id=a"), ("user-agent", "ua"), ("x-forwarded-for", "1.2.3.4")]))
        );
        assert_ne!(
            key,
            cache_key(&check(&[("cookie", "session_id=a"), ("user-agent", "ua"), ("accept-language", "fr")]))
        );
        // Length prefixes: moving bytes between fields changes the key.
        assert_ne!(
            cache_key(&check(&[("cookie", "ab"), ("user-agent", "c")])),
            cache_key(&check(&[("cookie", "a"), ("user-agent", "bc")]))
        );
    }

    #[test]
    fn nothing_is_cached_or_served_while_the_feed_is_not_live() {
        let cache = DecisionCache::new(Duration::from_secs(60), 10);
        let now = Instant::now();
        assert!(matches!(cache.lookup(&[1; 32], now), Lookup::Bypass));
        assert!(!cache.store([1; 32], 0, &allowed("s1", NOW_MS + 60_000), now, NOW_MS));
        cache.set_live(true);
        let Lookup::Miss(generation) = cache.lookup(&[1; 32], now) else { panic!("expected a miss") };
        assert!(cache.store([1; 32], generation, &allowed("s1", NOW_MS + 60_000), now, NOW_MS));
        assert!(matches!(cache.lookup(&[1; 32], now), Lookup::Hit(_)));
        cache.set_live(false);
        assert!(cache.is_empty());
        cache.set_live(true);
        assert!(matches!(cache.lookup(&[1; 32], now), Lookup::Miss(_)), "a feed gap empties the cache");
    }

    #[test]
    fn a_revocation_drops_the_session_and_any_answer_in_flight() {
        let cache = DecisionCache::new(Duration::from_secs(60), 10);
        let now = Instant::now();
        cache.set_live(true);
        let Lookup::Miss(g) = cache.lookup(&[1; 32], now) else { panic!() };
        assert!(cache.store([1; 32], g, &allowed("s1", NOW_MS + 60_000), now, NOW_MS));
        assert!(cache.store([2; 32], g, &allowed("s1", NOW_MS + 60_000), now, NOW_MS));
        assert!(cache.store([3; 32], g, &allowed("s2", NOW_MS + 60_000), now, NOW_MS));
        let Lookup::Miss(in_flight) = cache.lookup(&[4; 32], now) else { panic!() };
        assert_eq!(cache.revoke("s1"), 2);
        assert!(matches!(cache.lookup(&[1; 32], now), Lookup::Miss(_)));
        assert!(matches!(cache.lookup(&[2; 32], now), Lookup::Miss(_)));
        assert!(matches!(cache.lookup(&[3; 32], now), Lookup::Hit(_)), "other sessions stay");
        assert!(
            !cache.store([4; 32], in_flight, &allowed("s1", NOW_MS + 60_000), now, NOW_MS),
            "an answer that started before the revocation is not kept"
        );
    }

    #[test]
    fn answers_live_until_the_earlier_of_the_ttl_and_the_session_deadline() {
        let cache = DecisionCache::new(Duration::from_secs(5), 10);
        let now = Instant::now();
        cache.set_live(true);
        let Lookup::Miss(g) = cache.lookup(&[1; 32], now) else { panic!() };
        assert!(cache.store([1; 32], g, &allowed("s1", NOW_MS + 60_000), now, NOW_MS));
        assert!(cache.store([2; 32], g, &allowed("s2", NOW_MS + 1_000), now, NOW_MS));
        assert!(!cache.store([3; 32], g, &allowed("s3", NOW_MS), now, NOW_MS), "already past its deadline");
        let later = now + Duration::from_millis(1_500);
        assert!(matches!(cache.lookup(&[1; 32], later), Lookup::Hit(_)));
        assert!(matches!(cache.lookup(&[2; 32], later), Lookup::Miss(_)), "the session's deadline came first");
        assert!(matches!(cache.lookup(&[1; 32], now + Duration::from_secs(6)), Lookup::Miss(_)), "the TTL came first");
        // Denials are never kept.
        let denied = Denial::unavailable("down").into_response();
        assert!(!cache.store([5; 32], g, &denied, now, NOW_MS));
    }

    #[test]
    fn a_full_cache_makes_room_from_expired_answers_only() {
        let cache = DecisionCache::new(Duration::from_secs(5), 2);
        let now = Instant::now();
        cache.set_live(true);
        let Lookup::Miss(g) = cache.lookup(&[1; 32], now) else { panic!() };
        assert!(cache.store([1; 32], g, &allowed("s1", NOW_MS + 1_000), now, NOW_MS));
        assert!(cache.store([2; 32], g, &allowed("s2", NOW_MS + 60_000), now, NOW_MS));
        assert!(!cache.store([3; 32], g, &allowed("s3", NOW_MS + 60_000), now, NOW_MS), "full");
        let later = now + Duration::from_secs(2);
        assert!(cache.store([3; 32], g, &allowed("s3", NOW_MS + 60_000), later, NOW_MS + 2_000));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.revoke("s1"), 0, "the expired entry left the session index too");
    }
}
