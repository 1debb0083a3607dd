//! Real storage servers for the shared-storage tests: `redis-server` on a free loopback port, a
//! 3-master Redis Cluster, and the Upstash REST shim (`tests/peers/kv-rest`) over a
//! redis-server. A [`RedisServer`] guard kills its process on drop and prints the server's log
//! if the test panicked. The shared servers start once per test binary (tests isolate
//! themselves by key prefix); since statics are never dropped, a watchdog process holding a
//! pipe from this process kills them when the test binary exits, however it exits. (Per-test
//! servers are killed by their guard's drop, which also runs when a test panics.)

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A key prefix no other test in this binary uses.
pub fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("t{}:{name}:", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A loopback port that is free now (and, for cluster nodes, whose bus port +10000 is too).
fn free_port(with_bus: bool) -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if !with_bus || (port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()) {
            return port;
        }
    }
    panic!("no free port pair found");
}

/// Kills `pids` and removes `dir` when this test binary exits (its end of a pipe closes).
pub(crate) struct Watchdog {
    _child: Child,
    _stdin: ChildStdin,
}

impl Watchdog {
    pub(crate) fn new(pids: &[u32], dir: &Path) -> Watchdog {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let script =
            format!("cat >/dev/null; kill {} 2>/dev/null; sleep 1; rm -rf '{}'", pids.join(" "), dir.display());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watchdog");
        let stdin = child.stdin.take().unwrap();
        Watchdog { _child: child, _stdin: stdin }
    }
}

/// A redis-server process on 127.0.0.1.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    _temp: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// A throwaway server: no persistence.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// A server with `extra` arguments, in its own temp dir, on a free port.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        RedisServer::start_in(dir, Some(temp), free_port(false), extra)
    }

    /// A cluster-enabled server that holds every slot itself: a one-node Redis Cluster of its
    /// own (a test may change what it announces without touching the shared cluster).
    pub fn start_cluster_of_one() -> RedisServer {
        let server = RedisServer::start_cluster_node();
        assert!(server.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).contains("OK"));
        server.wait_cluster_ok();
        server
    }

    /// A cluster-enabled server on a free port pair, holding no slots and knowing no other node.
    pub fn start_cluster_node() -> RedisServer {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let args =
            ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no"];
        RedisServer::start_in(dir, Some(temp), free_port(true), &args)
    }

    /// Waits until this cluster node reports `cluster_state:ok`.
    pub fn wait_cluster_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "the cluster node on {} did not reach cluster_state:ok", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_in(dir: PathBuf, temp: Option<tempfile::TempDir>, port: u16, extra: &[&str]) -> RedisServer {
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--logfile".into(),
            "redis.log".into(),
            "--daemonize".into(),
            "no".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut server = RedisServer { child: None, port, dir, args, _temp: temp };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(15));
    }

    /// Waits until the server answers PING with PONG (not LOADING).
    pub fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("redis-server exited with {status}; its log:\n{}", self.log());
            }
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING; its log:\n{}", self.port, self.log());
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Runs redis-cli against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// SIGTERM (a clean shutdown that flushes the append-only file), then waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and directory, with the same arguments.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Keeps the process alive for the rest of the test binary (shared servers).
    fn leak_until_exit(mut self) -> u16 {
        let port = self.port;
        self.child = None;
        if let Some(temp) = self._temp.take() {
            let _ = temp.keep();
        }
        std::mem::forget(self);
        port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- redis-server :{} log ---\n{}", self.port, self.log());
        }
    }
}

/// The redis-server every shared-storage conformance test uses (started once).
pub fn shared_redis() -> &'static SharedRedis {
    static SERVER: OnceLock<SharedRedis> = OnceLock::new();
    SERVER.get_or_init(|| {
        let temp = tempfile::tempdir().unwrap().keep();
        let server = RedisServer::start_in(temp.clone(), None, free_port(false), &["--save", "", "--appendonly", "no"]);
        let pid = server.child.as_ref().unwrap().id();
        let watchdog = Watchdog::new(&[pid], &temp);
        let port = server.leak_until_exit();
        SharedRedis { port, _watchdog: watchdog }
    })
}

/// A redis-server alive until the test binary exits.
pub struct SharedRedis {
    pub port: u16,
    _watchdog: Watchdog,
}

impl SharedRedis {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs redis-cli against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

/// redis-cli against the server on `port`: its stdout.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The 3-master Redis Cluster of this test binary (started once).
pub fn shared_cluster() -> &'static SharedCluster {
    static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let mut ports = Vec::new();
        let mut pids = Vec::new();
        while ports.len() < 3 {
            let port = free_port(true);
            if ports.contains(&port) {
                continue;
            }
            let dir = root.join(port.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let config = format!("nodes-{port}.conf");
            let node = RedisServer::start_in(
                dir,
                None,
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &config,
                    "--cluster-node-timeout",
                    "5000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
            );
            pids.push(node.child.as_ref().unwrap().id());
            ports.push(node.leak_until_exit());
        }
        let watchdog = Watchdog::new(&pids, &root);
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = ports.iter().all(|p| {
                let out = Command::new("redis-cli").arg("-p").arg(p.to_string()).args(["cluster", "info"]).output();
                out.map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok")).unwrap_or(false)
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        SharedCluster { ports, _watchdog: watchdog }
    })
}

/// A Redis Cluster alive until the test binary exits.
pub struct SharedCluster {
    pub ports: Vec<u16>,
    _watchdog: Watchdog,
}

impl SharedCluster {
    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}

/// The Upstash REST shim over a redis-server.
pub struct KvRest {
    child: Child,
    _stdin: ChildStdin,
    pub url: String,
    pub token: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl KvRest {
    /// Starts `node shim.mjs` over `redis_url`; it exits when this process's end of its stdin closes.
    pub fn start(redis_url: &str) -> KvRest {
        let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/kv-rest/shim.mjs");
        let token = format!("kv-test-token-{}", std::process::id());
        let mut child = Command::new("node")
            .arg(shim)
            .args(["--redis", redis_url, "--port", "0", "--token", &token, "--exit-with-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node must be installed");
        let stdin = child.stdin.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("kv-rest shim did not start: {line:?}\n{}", logs.lock().unwrap().join("\n")));
        let url = ready["url"].as_str().unwrap().to_owned();
        KvRest { child, _stdin: stdin, url, token, logs }
    }

    fn http() -> reqwest::Client {
        // reqwest is built without a bundled crypto provider (see store::kv_rest).
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    /// Queues failures (`POST /__test/fail`), for example `{"status":503,"count":100}`.
    pub async fn fail(&self, rule: serde_json::Value) {
        let response = KvRest::http()
            .post(format!("{}/__test/fail", self.url))
            .header("content-type", "application/json")
            .body(rule.to_string())
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }

    /// Clears pending failures and statistics.
    pub async fn reset(&self) {
        let response = KvRest::http().post(format!("{}/__test/reset", self.url)).send().await.unwrap();
        assert!(response.status().is_success());
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for KvRest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- kv-rest shim log ---\n{}", self.logs());
        }
    }
}

/// The kv-rest shim every conformance test uses, over the shared redis-server (started once).
pub fn shared_kv_rest() -> &'static KvRest {
    static SHIM: OnceLock<KvRest> = OnceLock::new();
    SHIM.get_or_init(|| KvRest::start(&shared_redis().url()))
}
