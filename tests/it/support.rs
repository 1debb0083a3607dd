//! Test support: the real `session-authority` binary started as a process on a free port, with
//! its stderr captured, and authenticated gRPC clients for it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use session_authority::grpc::pb;
use session_authority::grpc::pb::revocation_service_client::RevocationServiceClient;
use session_authority::grpc::pb::security_service_client::SecurityServiceClient;
use session_authority::grpc::pb::session_service_client::SessionServiceClient;
use session_authority::grpc::pb::token_service_client::TokenServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub mod otlp;
pub mod prometheus;
pub mod proxy;

/// Development keys every spawned server accepts.
pub const SERVICE_KEY: &str = "test-service-key-0000000000000001";
pub const ADMIN_KEY: &str = "test-admin-key-00000000000000002";
pub const WATCHER_KEY: &str = "test-watcher-key-000000000000003";
pub const PROXY_KEY: &str = "test-proxy-key-00000000000000004";

pub fn api_keys_env() -> String {
    format!("service:{SERVICE_KEY},admin:{ADMIN_KEY},watcher:{WATCHER_KEY},proxy:{PROXY_KEY}")
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_session-authority")
}

/// A running server process. Killed on drop; its log is printed if the test panicked.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// How to start a server.
pub struct Spawn {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub data_dir: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
    pub with_keys: bool,
    pub listen: Option<String>,
    pub log_format: &'static str,
}

impl Default for Spawn {
    fn default() -> Self {
        Spawn {
            args: Vec::new(),
            env: Vec::new(),
            data_dir: None,
            cwd: None,
            with_keys: true,
            listen: None,
            log_format: "json",
        }
    }
}

impl Spawn {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }
    /// Listens on this address instead of a free port (a restart on the same address).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = Some(addr.into());
        self
    }

    /// Lifts the `session_create` rate limit (5 per 300 s per user) for tests about something else.
    pub fn without_create_limit(self) -> Self {
        self.env("SESSION_AUTHORITY_SECURITY_RULES_SESSION_CREATE_LIMIT", "1000000")
    }
    /// Logs in `format` (`text` or `json`) instead of JSON.
    pub fn log_format(mut self, format: &'static str) -> Self {
        self.log_format = format;
        self
    }
    pub fn without_keys(mut self) -> Self {
        self.with_keys = false;
        self
    }

    /// Starts `serve` on 127.0.0.1:0 (JSON logs unless told otherwise) and waits for its
    /// "serving" line.
    pub fn start(self) -> Process {
        let (temp, data_dir) = match self.data_dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::tempdir().expect("temp dir");
                let dir = temp.path().join("data");
                (Some(temp), dir)
            }
        };
        let mut command = Command::new(binary());
        command
            .arg("serve")
            .arg("--listen")
            .arg(self.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--log-format")
            .arg(self.log_format)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&self.args)
            .env_remove("RUST_LOG")
            // No trace export from the caller's environment: a test that wants it sets it.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Nor any setting of ours from the caller's environment: each test says what it runs with.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|name| name.starts_with("SESSION_AUTHORITY_")) {
                command.env_remove(name);
            }
        }
        if self.with_keys {
            command.env("SESSION_AUTHORITY_API_KEYS", api_keys_env());
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        let mut child = command.spawn().expect("spawn session-authority");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let addr = watch_stderr(&mut child, logs.clone());
        let addr = match addr {
            Some(addr) => addr,
            None => {
                let _ = child.kill();
                panic!("server did not start; its log:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Process { child, addr, logs, data_dir, _temp: temp }
    }
}

/// Reads the child's stderr on a thread, keeping every line, and returns the address from the
/// "serving" log line (None if the process ended first or 30 s passed).
fn watch_stderr(child: &mut Child, logs: Arc<Mutex<Vec<String>>>) -> Option<SocketAddr> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Kept before the address is sent, so the "serving" line is in `logs()` as soon as
            // `start` returns.
            let addr = serving_addr(&line);
            logs.lock().unwrap().push(line);
            if let Some(sender) = &tx
                && let Some(addr) = addr
            {
                let _ = sender.send(addr);
                tx = None;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).ok()
}

/// The address of a "serving" line, in either log format.
fn serving_addr(line: &str) -> Option<SocketAddr> {
    if line.contains("\"serving\"") {
        return serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["local_addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()));
    }
    if line.contains(" serving ") || line.ends_with(" serving") || line.contains("serving local_addr=") {
        let rest = line.split("local_addr=").nth(1)?;
        return rest.split_whitespace().next()?.parse().ok();
    }
    None
}

impl Process {
    pub fn start() -> Process {
        Spawn::default().start()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("connect")
    }

    pub async fn sessions(&self, key: Option<&str>) -> SessionServiceClient<InterceptedService<Channel, Auth>> {
        SessionServiceClient::with_interceptor(self.channel().await, Auth::new(key))
    }

    pub async fn tokens(&self, key: Option<&str>) -> TokenServiceClient<InterceptedService<Channel, Auth>> {
        TokenServiceClient::with_interceptor(self.channel().await, Auth::new(key))
    }

    pub async fn revocations(&self, key: Option<&str>) -> RevocationServiceClient<InterceptedService<Channel, Auth>> {
        RevocationServiceClient::with_interceptor(self.channel().await, Auth::new(key))
    }

    pub async fn security(&self, key: Option<&str>) -> SecurityServiceClient<InterceptedService<Channel, Auth>> {
        SecurityServiceClient::with_interceptor(self.channel().await, Auth::new(key))
    }

    /// Calls the method at `path` (any path, also one the server does not serve) with an empty
    /// request, as a generated client would, presenting `key` when given.
    pub async fn call_path(&self, path: &str, key: Option<&str>) -> Result<(), tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel().await);
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(());
        if let Some(key) = key {
            request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        let path = http::uri::PathAndQuery::try_from(path).expect("a valid path");
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        grpc.unary(request, path, codec).await.map(|_| ())
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident set size (`VmRSS` of `/proc/<pid>/status`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid()).expect("VmRSS of the server in /proc/<pid>/status")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM and waits (off the async runtime, so this process's own connections can
    /// answer the server's GOAWAY) up to 15 s for the exit code.
    pub async fn terminate(mut self) -> (Option<i32>, Process) {
        self.signal("TERM");
        tokio::task::spawn_blocking(move || {
            let code = self.wait_exit(Duration::from_secs(15));
            (code, self)
        })
        .await
        .unwrap()
    }

    /// Waits up to `timeout` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.logs());
        }
    }
}

pub use session_authority::metrics::rss_bytes;

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Auth {
    pub fn new(key: Option<&str>) -> Auth {
        Auth(key.map(|k| format!("Bearer {k}").parse().unwrap()))
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Runs the binary with arguments to completion; returns (exit code, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (Option<i32>, String) {
    let mut command = Command::new(binary());
    command.args(args).current_dir(cwd).stdin(Stdio::null()).env_remove("RUST_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("run session-authority");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().unwrap())
}

/// The device the tests' users log in from.
pub fn laptop(user_agent: &str) -> pb::DeviceFingerprint {
    pb::DeviceFingerprint {
        user_agent: user_agent.into(),
        accept_language: "fr-FR".into(),
        platform: "Linux x86_64".into(),
        timezone: "Europe/Paris".into(),
        screen_resolution: "1920x1080".into(),
        color_depth: Some(24),
        ..Default::default()
    }
}

/// A different device on every field: with a new network it scores above the hijack threshold.
pub fn thief_device() -> pb::DeviceFingerprint {
    pb::DeviceFingerprint {
        user_agent: "Evil/9".into(),
        accept_language: "en-US".into(),
        platform: "Windows".into(),
        timezone: "UTC".into(),
        screen_resolution: "800x600".into(),
        color_depth: Some(16),
        ..Default::default()
    }
}
