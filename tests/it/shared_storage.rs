//! Shared storage through the real binary: two replicas on one Redis, a Redis outage under
//! load, the one-command hot path, kv-rest endpoint failures, and configuration errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use session_authority::grpc::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

use crate::servers::{KvRest, RedisServer, shared_redis, unique_prefix};
use crate::support::{ADMIN_KEY, Process, SERVICE_KEY, Spawn, run_to_exit};

fn encryption_key() -> String {
    session_authority::crypto::encode_key(&[7u8; 32])
}

/// A server on Redis at `url`, its keys under `prefix`.
pub(crate) fn on_redis(url: &str, prefix: &str) -> Spawn {
    Spawn::default()
        .arg("--storage")
        .arg("redis")
        .env("REDIS_URL", url)
        .env("SESSION_AUTHORITY_REDIS_KEY_PREFIX", prefix)
        .env("SESSION_AUTHORITY_ENCRYPTION_KEY", encryption_key())
        // These tests measure the cap and outages, not the session_create rate limit.
        .without_create_limit()
}

fn create(user: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user.into(),
        access_token: "upstream-access".into(),
        expires_in: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
        ..Default::default()
    }
}

fn validate(token: &str) -> pb::ValidateSessionRequest {
    pb::ValidateSessionRequest { session_token: token.into(), ..Default::default() }
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

/// Waits up to `limit` for the overall and SessionService health to be `wanted`.
async fn wait_health(server: &Process, wanted: ServingStatus, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut client = HealthClient::new(server.channel().await);
    loop {
        let mut all = true;
        for service in ["", "atoms.session.v1.SessionService"] {
            let status =
                client.check(HealthCheckRequest { service: service.into() }).await.map(|r| r.into_inner().status);
            all &= matches!(status, Ok(s) if s == wanted as i32);
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "health did not become {wanted:?} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_redis_share_the_cap_and_every_session() {
    let redis = shared_redis();
    let prefix = unique_prefix("replicas");
    let a = on_redis(&redis.url(), &prefix).start();
    let b = on_redis(&redis.url(), &prefix).start();
    let client_a = a.sessions(Some(SERVICE_KEY)).await;
    let client_b = b.sessions(Some(SERVICE_KEY)).await;

    let calls: Vec<_> = (0..50)
        .map(|i| {
            let mut client = if i % 2 == 0 { client_a.clone() } else { client_b.clone() };
            tokio::spawn(async move { client.create_session(create("racer")).await })
        })
        .collect();
    let mut evicted = 0;
    for call in calls {
        evicted += call.await.unwrap().expect("every create succeeds").into_inner().evicted_session_ids.len();
    }
    assert_eq!(evicted, 45);
    assert_eq!(active_sessions(&a, "racer").await, 5);
    assert_eq!(active_sessions(&b, "racer").await, 5);

    // Created on one, valid on the other.
    let mut on_a = client_a.clone();
    let mut on_b = client_b.clone();
    let token = on_a.create_session(create("carol")).await.unwrap().into_inner().session_token;
    let seen = on_b.validate_session(validate(&token)).await.unwrap().into_inner();
    assert!(seen.valid, "{seen:?}");

    // Terminated on one, refused on the other at once.
    let terminate = pb::TerminateSessionRequest {
        selector: Some(pb::terminate_session_request::Selector::SessionToken(token.clone())),
        reason: String::new(),
    };
    on_b.terminate_session(terminate).await.unwrap();
    let refused = on_a.validate_session(validate(&token)).await.unwrap().into_inner();
    assert!(!refused.valid);
    assert_eq!(refused.reason, pb::InvalidReason::Terminated as i32);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Valid,
    Invalid,
    Unavailable,
    Other(Code),
}

#[derive(Debug)]
struct Call {
    started: Instant,
    ended: Instant,
    outcome: Outcome,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_under_load_fails_closed_and_recovers_without_a_restart() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--save", ""]);
    let server = on_redis(&redis.url(), "fault:").env("SESSION_AUTHORITY_STORAGE_TIMEOUT", "1s").start();
    let pid = server.child.id();
    let client = server.sessions(Some(SERVICE_KEY)).await;

    // Sessions acknowledged before the outage.
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    for i in 0..20 {
        let token =
            client.clone().create_session(create(&format!("old-{i}"))).await.unwrap().into_inner().session_token;
        acknowledged.lock().unwrap().push(token);
    }

    // The load: validators over old and new sessions, and a creator adding new ones.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(Mutex::new(Vec::<Call>::new()));
    let mut load = Vec::new();
    for worker in 0..4usize {
        let (mut client, stop, calls, acknowledged) =
            (client.clone(), stop.clone(), calls.clone(), acknowledged.clone());
        load.push(tokio::spawn(async move {
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                let token = {
                    let tokens = acknowledged.lock().unwrap();
                    // Alternate between the oldest sessions and the newest.
                    if n % 2 == 0 { tokens[n % 20].clone() } else { tokens[tokens.len() - 1 - (n % 5)].clone() }
                };
                n += 1;
                let started = Instant::now();
                let outcome = match client.validate_session(validate(&token)).await {
                    Ok(r) if r.get_ref().valid => Outcome::Valid,
                    Ok(_) => Outcome::Invalid,
                    Err(s) if s.code() == Code::Unavailable => Outcome::Unavailable,
                    Err(s) => Outcome::Other(s.code()),
                };
                calls.lock().unwrap().push(Call { started, ended: Instant::now(), outcome });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    {
        let (mut client, stop, acknowledged) = (client.clone(), stop.clone(), acknowledged.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if let Ok(created) = client.create_session(create(&format!("new-{n}"))).await {
                    acknowledged.lock().unwrap().push(created.into_inner().session_token);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.stop();
    let stopped = Instant::now();
    wait_health(&server, ServingStatus::NotServing, Duration::from_secs(4)).await;
    tokio::time::sleep_until((stopped + Duration::from_secs(5)).into()).await;
    let restarting = Instant::now();
    redis.restart();
    let back = Instant::now();

    // Calls succeed again within 2 seconds of Redis' return.
    let probe = acknowledged.lock().unwrap()[0].clone();
    loop {
        if let Ok(r) = client.clone().validate_session(validate(&probe)).await {
            assert!(r.get_ref().valid);
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(2), "no successful call within 2 s of Redis' return");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = back + Duration::from_secs(2);
    tokio::time::sleep_until((recovered + Duration::from_secs(1)).into()).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    wait_health(&server, ServingStatus::Serving, Duration::from_secs(3)).await;

    let calls = std::mem::take(&mut *calls.lock().unwrap());
    let during: Vec<&Call> = calls.iter().filter(|c| c.started >= stopped && c.ended <= restarting).collect();
    eprintln!("{} calls during the outage, {} in all", during.len(), calls.len());
    assert!(during.len() >= 20, "the load kept calling during the outage ({} calls)", during.len());
    let wrong: Vec<&&Call> = during.iter().filter(|c| c.outcome != Outcome::Unavailable).collect();
    assert!(wrong.is_empty(), "calls during the outage must answer UNAVAILABLE: {wrong:?}");
    // No call that started while Redis was down said valid. (A call that started before the stop
    // may answer valid after it: its read reached Redis while Redis was up, so that answer was
    // checked, not guessed.)
    let false_valid: Vec<&Call> = calls
        .iter()
        .filter(|c| c.outcome == Outcome::Valid && c.started >= stopped && c.started < restarting)
        .collect();
    assert!(false_valid.is_empty(), "calls started during the outage answered valid: {false_valid:?}");
    let after: Vec<&Call> = calls.iter().filter(|c| c.started >= recovered).collect();
    assert!(!after.is_empty());
    assert!(after.iter().all(|c| c.outcome == Outcome::Valid), "after recovery: {after:?}");

    // Same process, and every acknowledged session (before and around the outage) still valid.
    assert_eq!(server.child.id(), pid);
    let mut child = server;
    assert!(child.child.try_wait().unwrap().is_none(), "the server process exited");
    let tokens = acknowledged.lock().unwrap().clone();
    assert!(tokens.len() > 20);
    for token in &tokens {
        let r = client.clone().validate_session(validate(token)).await.unwrap().into_inner();
        assert!(r.valid, "an acknowledged session was lost: {r:?}");
    }
}

#[tokio::test]
async fn validate_session_is_one_redis_command() {
    let redis = RedisServer::start();
    let server = on_redis(&redis.url(), "one:").env("SESSION_AUTHORITY_SESSION_CLEANUP_INTERVAL", "1h").start();
    let mut client = server.sessions(Some(SERVICE_KEY)).await;
    let token = client.create_session(create("dora")).await.unwrap().into_inner().session_token;
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let started = Instant::now();
    for _ in 0..100 {
        assert!(client.validate_session(validate(&token)).await.unwrap().into_inner().valid);
    }
    let stats = redis.cli(&["INFO", "commandstats"]);
    let polls = started.elapsed().as_secs() + 2;
    let calls: BTreeMap<String, u64> = stats
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        // The health check's PING, the clock alignment's TIME and this test's own INFO / CONFIG
        // are not validations.
        .filter(|(name, _)| !(name == "ping" || name == "time" || name == "info" || name.starts_with("config")))
        .collect();
    let (mut validations, mut feed) = (calls.clone(), BTreeMap::new());
    // The replica's revocation-feed tailer polls the log once a second: one script (EVALSHA)
    // running HSETNX, HMGET and XRANGE. Nothing else may run besides the validations' HGETALLs.
    for name in ["evalsha", "hsetnx", "hmget", "xrange"] {
        if let Some(n) = validations.remove(name) {
            feed.insert(name, n);
        }
    }
    assert_eq!(validations, BTreeMap::from([("hgetall".to_owned(), 100)]), "{stats}");
    assert!(feed.values().all(|n| *n <= polls), "more than the feed's polls: {feed:?} in {polls} s; {stats}");
}

/// The calls of each command name since the last `CONFIG RESETSTAT`, leaving out the health
/// check's PING, the clock alignment's TIME and the test's own INFO / CONFIG.
fn command_calls(redis: &RedisServer) -> BTreeMap<String, u64> {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .filter(|(name, _)| !(name == "ping" || name == "time" || name == "info" || name.starts_with("config")))
        .collect()
}

fn check(rule: &str, key: &str) -> pb::CheckRateLimitRequest {
    pb::CheckRateLimitRequest { rule_name: rule.into(), key: key.into(), cost: 1, consume: Some(true) }
}

/// A replica remembers the state it last read or wrote for a key, so a check of a key it has
/// seen is one round trip: the compare-and-set script alone, against that state (the read before
/// it is only for a key it has not seen, or lost the race for).
#[tokio::test]
async fn a_rate_limit_check_of_a_key_the_replica_has_seen_is_one_redis_command() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[security.rules.one_trip]\nlimit = 1000\nperiod = \"1m\"\n").unwrap();
    let redis = RedisServer::start();
    let server = on_redis(&redis.url(), "trip:")
        .arg("--config")
        .arg(config.to_str().unwrap())
        .env("SESSION_AUTHORITY_SESSION_CLEANUP_INTERVAL", "1h")
        .start();
    let mut client = server.security(Some(SERVICE_KEY)).await;
    assert!(client.check_rate_limit(check("one_trip", "k")).await.unwrap().into_inner().allowed);
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let started = Instant::now();
    for _ in 0..50 {
        assert!(client.check_rate_limit(check("one_trip", "k")).await.unwrap().into_inner().allowed);
    }
    let calls = command_calls(&redis);
    // The feed's tailer polls once a second with one script of its own (HSETNX, HMGET, XRANGE).
    let polls = started.elapsed().as_secs() + 2;
    // Commands a script runs count too: each compare-and-set reads the state once, inside Redis.
    assert_eq!(calls.get("hget"), Some(&50), "no read before the compare-and-set: {calls:?}");
    let scripts = calls.get("evalsha").copied().unwrap_or(0);
    assert!((50..=50 + polls).contains(&scripts), "one script per check: {calls:?}");
    assert_eq!(calls.get("hset"), Some(&50), "each check wrote its state once: {calls:?}");
}

/// The remembered state is only ever a guess: checks of one key alternating between two
/// replicas (each one's memory of the key stale after the other's write) grant exactly the
/// limit, in order; a refusal is decided on a fresh read, so a state deleted behind a replica's
/// back (expired, or removed by an operator) refuses nothing.
#[tokio::test]
async fn remembered_rate_limit_states_are_checked_against_redis_before_any_decision() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[security.rules.alternate]\nlimit = 6\nperiod = \"1h\"\nbackoff = true\n").unwrap();
    let redis = RedisServer::start();
    let replica = || on_redis(&redis.url(), "alt:").arg("--config").arg(config.to_str().unwrap()).start();
    let (a, b) = (replica(), replica());
    let (mut on_a, mut on_b) = (a.security(Some(SERVICE_KEY)).await, b.security(Some(SERVICE_KEY)).await);
    let mut granted = Vec::new();
    for i in 0..14 {
        let client = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        granted.push(client.check_rate_limit(check("alternate", "t")).await.unwrap().into_inner().allowed);
    }
    let expected: Vec<bool> = (0..14).map(|i| i < 6).collect();
    assert_eq!(granted, expected, "exactly the first six, whichever replica asked");

    // Both remember a refused, blocked key; the states go away in Redis; the next check is a
    // fresh key's.
    redis.cli(&["DEL", "alt:{limits}:states"]);
    assert!(on_a.check_rate_limit(check("alternate", "t")).await.unwrap().into_inner().allowed);
    assert!(on_b.check_rate_limit(check("alternate", "t")).await.unwrap().into_inner().allowed);
    assert_eq!(redis.cli(&["HLEN", "alt:{limits}:states"]).trim(), "1", "the key's state is back");
}

#[tokio::test]
async fn kv_rest_endpoint_failures_answer_unavailable_then_recover() {
    let shim = KvRest::start(&shared_redis().url());
    let server = Spawn::default()
        .arg("--storage")
        .arg("kv-rest")
        .env("KV_REST_API_URL", &shim.url)
        .env("KV_REST_API_TOKEN", &shim.token)
        .env("SESSION_AUTHORITY_REDIS_KEY_PREFIX", unique_prefix("kvfail"))
        .env("SESSION_AUTHORITY_ENCRYPTION_KEY", encryption_key())
        .start();
    let mut client = server.sessions(Some(SERVICE_KEY)).await;
    let token = client.create_session(create("erin")).await.unwrap().into_inner().session_token;
    assert!(client.validate_session(validate(&token)).await.unwrap().into_inner().valid);

    // A refused token: UNAVAILABLE, saying what to check; health follows.
    shim.fail(serde_json::json!({"status": 401, "count": 10_000})).await;
    let e = client.validate_session(validate(&token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("KV_REST_API_TOKEN"), "{}", e.message());
    wait_health(&server, ServingStatus::NotServing, Duration::from_secs(4)).await;
    shim.reset().await;
    assert!(client.validate_session(validate(&token)).await.unwrap().into_inner().valid);
    wait_health(&server, ServingStatus::Serving, Duration::from_secs(4)).await;

    // The endpoint failing: UNAVAILABLE (after the read's retries), then back.
    shim.fail(serde_json::json!({"status": 503, "count": 10_000})).await;
    let e = client.validate_session(validate(&token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("503"), "{}", e.message());
    shim.reset().await;
    assert!(client.validate_session(validate(&token)).await.unwrap().into_inner().valid);

    // Rate limited: UNAVAILABLE with a retry hint, and the write was not sent twice.
    shim.fail(serde_json::json!({"status": 429, "count": 10_000})).await;
    let e = client.create_session(create("erin")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.get_error_details().retry_info().is_some(), "{e:?}");
    shim.reset().await;
    assert_eq!(active_sessions(&server, "erin").await, 1);
    assert!(client.validate_session(validate(&token)).await.unwrap().into_inner().valid);
    // A health ping may have met the 429 window too; health follows storage back.
    wait_health(&server, ServingStatus::Serving, Duration::from_secs(4)).await;
}

#[tokio::test]
async fn a_bad_redis_url_or_prefix_exits_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let keys = crate::support::api_keys_env();
    let key = encryption_key();
    let base = [("SESSION_AUTHORITY_API_KEYS", keys.as_str()), ("SESSION_AUTHORITY_ENCRYPTION_KEY", key.as_str())];
    let args = ["serve", "--storage", "redis", "--listen", "127.0.0.1:0", "--data-dir", data];

    let env = [base[0], base[1], ("REDIS_URL", "http://user:hunter2@cache:6379")];
    let (code, stderr) = run_to_exit(&args, &env, dir.path());
    assert_ne!(code, Some(0));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("redis.url") && !stderr.contains("hunter2"), "{stderr}");

    let env =
        [base[0], base[1], ("REDIS_URL", "redis://127.0.0.1:1"), ("SESSION_AUTHORITY_REDIS_KEY_PREFIX", "{app}:")];
    let (code, stderr) = run_to_exit(&args, &env, dir.path());
    assert_ne!(code, Some(0));
    assert!(stderr.contains("redis.key_prefix"), "{stderr}");
}

/// Issue 16 point 15c: kv-rest sends the bearer token with every request, so a plain `http://`
/// URL is refused at startup unless it is on loopback; the one line names KV_REST_API_URL.
#[tokio::test]
async fn kv_rest_refuses_plain_http_except_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let keys = crate::support::api_keys_env();
    let key = encryption_key();
    let args = ["serve", "--storage", "kv-rest", "--listen", "127.0.0.1:0", "--data-dir", data];
    for url in ["http://kv.example.com", "http://10.0.0.5:8080", "http://[2001:db8::1]/"] {
        let env = [
            ("SESSION_AUTHORITY_API_KEYS", keys.as_str()),
            ("SESSION_AUTHORITY_ENCRYPTION_KEY", key.as_str()),
            ("KV_REST_API_URL", url),
            ("KV_REST_API_TOKEN", "kv-token-secret"),
        ];
        let (code, stderr) = run_to_exit(&args, &env, dir.path());
        assert_eq!(code, Some(1), "{url}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{url}: {stderr}");
        assert!(stderr.contains("KV_REST_API_URL") && stderr.contains("https://"), "{url}: {stderr}");
        assert!(!stderr.contains("kv-token-secret"), "{stderr}");
    }
}

/// Issue 6 on shared storage: two replicas on one redis-server, 20 watchers split across them,
/// 10,000 revocations issued on both. Every watcher receives all 10,000 in cursor order without
/// duplicates (each replica's one tailer reads the shared log and fans out); the watcher killed
/// after 3,000 resumes on the *other* replica from its last cursor and still ends with exactly
/// 10,000, which shows the log id and sequence numbers are the same on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_watchers_on_two_replicas_receive_ten_thousand_revocations_from_both() {
    use std::collections::HashSet;

    use crate::revocations::{assert_complete, create_sessions, revoke_users, watch_until_on};
    // Many users with few sessions each: the create script scans the user's sessions, so 100
    // per user would spend the run in those scans rather than in the feed under test.
    const USERS: usize = 1000;
    const PER_USER: usize = 10;
    let total = USERS * PER_USER;
    let redis = RedisServer::start();
    let replica = || {
        on_redis(&redis.url(), "feed:")
            .env("SESSION_AUTHORITY_SESSION_MAX_SESSIONS_PER_USER", PER_USER.to_string())
            .start()
    };
    let (a, b) = (replica(), replica());

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(20);
    let watchers: Vec<_> = (0..20)
        .map(|i| {
            let urls = if i % 2 == 0 { vec![a.url(), b.url()] } else { vec![b.url(), a.url()] };
            let kill_after = (i == 0).then_some(total * 3 / 10);
            tokio::spawn(watch_until_on(urls, None, total, kill_after, Some(ready_tx.clone())))
        })
        .collect();
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await.expect("watchers subscribed");
    }

    let t0 = Instant::now();
    let (on_a, on_b) =
        tokio::join!(create_sessions(&a, "a", USERS / 2, PER_USER), create_sessions(&b, "b", USERS / 2, PER_USER));
    assert_eq!(on_a.len() + on_b.len(), total);
    let created = t0.elapsed();
    let (revoked_a, revoked_b) = tokio::join!(revoke_users(&a, "a", USERS / 2), revoke_users(&b, "b", USERS / 2));
    let expected: HashSet<String> = revoked_a.into_iter().chain(revoked_b).collect();
    assert_eq!(expected.len(), total);
    let revoked = t0.elapsed();

    for (i, watcher) in watchers.into_iter().enumerate() {
        let watched = tokio::time::timeout(Duration::from_secs(60), watcher).await.expect("watcher done").unwrap();
        assert_complete(&watched, &expected);
        if watched.aborted > 0 {
            eprintln!("watcher {i} fell behind {} times and resumed", watched.aborted);
        }
    }
    eprintln!("created by {created:?}, revoked by {revoked:?}, all watchers complete by {:?}", t0.elapsed());
}

/// Issue 8 on shared storage: a rule of 10 per minute from a config file, two replicas on one
/// Redis, 100 concurrent CheckRateLimit calls for one key split across them: exactly 10 pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limiter_is_exact_across_two_replicas() {
    use crate::security::concurrent_checks;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[security.rules.shared_test]\nlimit = 10\nperiod = \"1m\"\nbackoff = false\n").unwrap();
    let redis = shared_redis();
    let prefix = unique_prefix("limits");
    let replica = || on_redis(&redis.url(), &prefix).arg("--config").arg(config.to_str().unwrap()).start();
    let (a, b) = (replica(), replica());

    let ((on_a, answers_a), (on_b, answers_b)) = tokio::join!(
        concurrent_checks(&a, "shared_test", "tenant-7", 50),
        concurrent_checks(&b, "shared_test", "tenant-7", 50)
    );
    assert_eq!(on_a + on_b, 10, "allowed on a: {on_a}, on b: {on_b}");
    assert!(answers_a.iter().chain(&answers_b).all(|answer| answer.limit == 10));
    // Both replicas see the same exhausted key, and a fresh key has its own 10.
    assert_eq!(concurrent_checks(&b, "shared_test", "tenant-7", 10).await.0, 0);
    assert_eq!(concurrent_checks(&a, "shared_test", "tenant-8", 30).await.0, 10);
}

/// Issue 16 point 10: time decisions shared across replicas take one clock. A replica whose own
/// clock is ten minutes ahead (the test-only SESSION_AUTHORITY_CLOCK_OFFSET) still finds the key
/// another replica exhausted exhausted, and stamps its sessions with Redis's time.
#[tokio::test]
async fn replicas_with_skewed_clocks_keep_the_limit_exact_on_redis_time() {
    use crate::security::concurrent_checks;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[security.rules.skew_test]\nlimit = 5\nperiod = \"5m\"\nbackoff = false\n").unwrap();
    let redis = shared_redis();
    let prefix = unique_prefix("skew");
    let a = on_redis(&redis.url(), &prefix).arg("--config").arg(config.to_str().unwrap()).start();
    let ahead = on_redis(&redis.url(), &prefix)
        .arg("--config")
        .arg(config.to_str().unwrap())
        .env("SESSION_AUTHORITY_CLOCK_OFFSET", "600s")
        .start();
    assert!(ahead.logs().contains("SESSION_AUTHORITY_CLOCK_OFFSET"), "the shift is announced: {}", ahead.logs());

    assert_eq!(concurrent_checks(&a, "skew_test", "tenant-1", 5).await.0, 5);
    assert_eq!(concurrent_checks(&ahead, "skew_test", "tenant-1", 5).await.0, 0, "the ahead replica refills nothing");

    let mut sessions = ahead.sessions(Some(SERVICE_KEY)).await;
    let created = sessions.create_session(create("skewed")).await.unwrap().into_inner().session.unwrap();
    let stamped = created.created_at.unwrap().seconds;
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((stamped - wall).abs() <= 5, "created_at {stamped} is Redis's time, not the shifted clock's ({wall})");
}
