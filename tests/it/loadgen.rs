//! The load generator measures what it claims: its request counts equal the server's own
//! `grpc_server_handled_total` counters for the same calls.

use std::io::{Read as _, Write as _};
use std::process::Command;

use crate::support::{PROXY_KEY, SERVICE_KEY, Spawn};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET /metrics over plain HTTP/1.1.
pub fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of the sample whose line starts with `prefix`, or 0 when there is none.
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

fn loadgen(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("result.json");
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .args(["--json", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

/// `loadgen run` with `extra`, as the service key, against `server` (whose CPU it reads), in a
/// short shape, off the async runtime.
async fn run_against(server: &crate::support::Process, extra: &[&'static str]) -> serde_json::Value {
    let (target, pid, extra) = (server.url(), server.child.id().to_string(), extra.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut args = vec!["run", "--target", &target, "--key", SERVICE_KEY, "--server-pid", &pid];
        args.extend(["--connections", "2", "--in-flight", "4", "--duration", "2s", "--warmup", "0s"]);
        args.extend(extra);
        loadgen(&args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_counts_match_the_servers_counters() {
    let metrics_port = free_port();
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .start();
    let health = run_against(&server, &["--workload", "health"]).await;
    let metrics = scrape(metrics_port);
    let served = sample(&metrics, "grpc_server_handled_total", &[("grpc_method", "Check")]);
    assert!(health["requests"].as_u64().unwrap() > 100, "{health}");
    assert_eq!(health["requests"].as_u64().unwrap(), served);
    assert_eq!(health["errors"].as_object().unwrap().len(), 0);
    assert!(health["server_cpu_us_per_request"].as_f64().unwrap() > 0.0);
    assert_eq!(health["driver"], "h2", "the h2 driver is the default");
    assert!(health["client_cpu_us_per_request"].as_f64().unwrap() > 0.0, "{health}");
    assert!(health["client_over_server_cpu"].as_f64().unwrap() > 0.0, "{health}");

    // The same counts through tonic's clients.
    let tonic_health = run_against(&server, &["--workload", "health", "--driver", "tonic"]).await;
    let metrics = scrape(metrics_port);
    let served_now = sample(&metrics, "grpc_server_handled_total", &[("grpc_method", "Check")]);
    assert_eq!(tonic_health["driver"], "tonic");
    assert!(tonic_health["requests"].as_u64().unwrap() > 100, "{tonic_health}");
    assert_eq!(tonic_health["requests"].as_u64().unwrap(), served_now - served);

    let validate =
        run_against(&server, &["--workload", "validate", "--sessions", "300", "--invalid-share", "0.25"]).await;
    let metrics = scrape(metrics_port);
    let validated = sample(&metrics, "grpc_server_handled_total", &[("grpc_method", "ValidateSession")]);
    assert_eq!(validate["requests"].as_u64().unwrap(), validated);
    assert_eq!(sample(&metrics, "grpc_server_handled_total", &[("grpc_method", "CreateSession")]), 300);
    assert_eq!(sample(&metrics, "session_created_total", &[]), 300);
    let p50 = validate["latency_us"]["p50"].as_u64().unwrap();
    let p99 = validate["latency_us"]["p99"].as_u64().unwrap();
    assert!(p50 > 0 && p50 <= p99, "{validate}");

    // Envoy's ext_authz Check with the proxy key: every call answered OK, as the server counted.
    let check = run_against(&server, &["--workload", "ext-authz", "--sessions", "200", "--proxy-key", PROXY_KEY]).await;
    let metrics = scrape(metrics_port);
    assert!(check["requests"].as_u64().unwrap() > 100, "{check}");
    assert_eq!(check["errors"].as_object().unwrap().len(), 0, "{check}");
    assert_eq!(check["requests"].as_u64().unwrap(), sample(&metrics, "ext_authz_checks_total", &[("decision", "ok")]));
    assert_eq!(sample(&metrics, "ext_authz_checks_total", &[("decision", "unauthenticated")]), 0);
}

/// `loadgen bare-check` serves the health Check with no key and none of the server's layers,
/// and an unknown method is UNIMPLEMENTED there as anywhere (the h2 driver reports the code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bare_reference_answers_check_and_the_h2_driver_reports_codes() {
    use std::io::BufRead as _;
    /// Stops the reference however the test ends.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut bare = Reaped(
        Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["bare-check", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(bare.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_owned();
    let target = format!("http://{addr}");
    let bare_pid = bare.0.id().to_string();
    let shape = ["--connections", "1", "--in-flight", "4", "--duration", "1s", "--warmup", "0s"];
    let (health, validate) = tokio::task::spawn_blocking(move || {
        let mut args =
            vec!["run", "--workload", "health", "--target", target.as_str(), "--server-pid", bare_pid.as_str()];
        args.extend(shape);
        let health = loadgen(&args);
        // The bare server has no SessionService: every call fails with the code it answers.
        let mut args = vec!["run", "--workload", "validate", "--sessions", "0", "--target", target.as_str()];
        args.extend(["--tokens-file", "/dev/null"]);
        args.extend(shape);
        (health, loadgen(&args))
    })
    .await
    .unwrap();
    drop(bare);
    assert!(health["requests"].as_u64().unwrap() > 100, "{health}");
    assert_eq!(health["errors"].as_object().unwrap().len(), 0, "{health}");
    assert!(health["server_cpu_us_per_request"].as_f64().unwrap() > 0.0, "{health}");
    let errors = validate["errors"].as_object().unwrap();
    assert_eq!(validate["ok"], 0, "{validate}");
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["Unimplemented"], "{validate}");
}

/// The benchmark's in-process seeding (`serve --seed-sessions`): every token it writes is a
/// valid session of the running server, and it is refused on any storage but memory.
#[cfg(feature = "bench-seed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_seeding_writes_tokens_that_validate_and_is_refused_off_memory() {
    use session_authority::grpc::pb;

    let dir = tempfile::tempdir().unwrap();
    let tokens_file = dir.path().join("tokens.txt");
    let server = Spawn::default()
        .arg("--storage")
        .arg("memory")
        .arg("--seed-sessions")
        .arg("2500")
        .arg("--seed-tokens-out")
        .arg(tokens_file.to_str().unwrap())
        .start();
    let text = std::fs::read_to_string(&tokens_file).unwrap();
    let tokens: Vec<&str> = text.lines().collect();
    assert_eq!(tokens.len(), 2500, "one token per seeded session");
    assert_eq!(tokens.iter().collect::<std::collections::HashSet<_>>().len(), 2500, "tokens are distinct");
    let mut sessions = server.sessions(Some(SERVICE_KEY)).await;
    for token in tokens.iter().step_by(97) {
        let answer = sessions
            .validate_session(pb::ValidateSessionRequest { session_token: (*token).to_owned(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.valid, "a seeded token validates: {answer:?}");
    }
    assert!(server.logs().contains("\"bytes_per_session\""), "the seeding reports its memory per session");

    let (code, stderr) = crate::support::run_to_exit(
        &[
            "serve",
            "--storage",
            "embedded",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--seed-sessions",
            "10",
            "--seed-tokens-out",
            dir.path().join("other.txt").to_str().unwrap(),
        ],
        &[],
        dir.path(),
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert!(code.is_some(), "it exits instead of serving: {stderr}");
    assert!(stderr.contains("--seed-sessions works only with memory storage"), "{stderr}");
    assert!(!dir.path().join("other.txt").exists(), "nothing was seeded");
}
