//! `loadgen`: the gRPC load generator behind `scripts/bench`.
//!
//! It drives one server with an explicit shape (N HTTP/2 connections × M requests in flight per
//! connection), in a closed loop (peak throughput) or an open loop at a fixed arrival rate, where
//! each latency is measured from the request's *intended* send time so a stalled server cannot
//! hide its stall (no coordinated omission). It reports p50/p90/p99/p99.9/max, errors by gRPC
//! code, achieved against offered rate, and the server's CPU time per request read from
//! `/proc/<pid>/stat`. Absolute numbers on shared machines are noise; `suite` therefore runs a
//! reference (`grpc.health.v1.Health/Check` on the same server, same shape) in the same run and
//! reports ratios.

mod fanout;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use rand::Rng as _;
use rand_distr::Distribution as _;
use serde_json::{Value, json};
use session_authority::grpc::pb;
use session_authority::grpc::pb::security_service_client::SecurityServiceClient;
use session_authority::grpc::pb::session_service_client::SessionServiceClient;
use session_authority::grpc::pb::token_service_client::TokenServiceClient;
use session_authority::metrics::rss_bytes;
use tokio::sync::Mutex;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "gRPC load generator for Session Authority")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one workload and print its figures (JSON with --json).
    Run(RunArgs),
    /// Seed sessions and run the reference and the session workloads; print ratios.
    Suite(SuiteArgs),
    /// Revocation fan-out: revoke-to-delivery latency for K watch streams, beside a bare
    /// tokio-broadcast reference served from this process.
    Fanout(FanoutArgs),
    /// Merge suite outputs into one report.
    Merge {
        /// The merged report to write.
        #[arg(long)]
        out: PathBuf,
        /// Suite outputs.
        inputs: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct Target {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// API key (service role), or SESSION_AUTHORITY_KEY.
    #[arg(long, env = "SESSION_AUTHORITY_KEY", hide_env_values = true)]
    key: Option<String>,
    /// PID of the server, for its CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(clap::Args, Debug, Clone)]
struct Shape {
    /// Independent HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Measured duration.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum Workload {
    /// grpc.health.v1.Health/Check: the reference.
    Health,
    /// SessionService/ValidateSession over the seeded tokens.
    Validate,
    /// SessionService/CreateSession, one new user per call.
    Create,
    /// SecurityService/CheckRateLimit on a spread of keys.
    CheckRateLimit,
    /// TokenService/GetAccessToken over the seeded sessions (their tokens are not due for a
    /// refresh, so this measures reading and unsealing the stored token).
    GetAccessToken,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum Pick {
    Uniform,
    Zipf,
}

#[derive(clap::Args, Debug, Clone)]
struct Tokens {
    /// Sessions to seed through CreateSession before running (ignored with --tokens-file).
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Read session tokens (one per line) instead of seeding.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// How validations pick a token.
    #[arg(long, value_enum, default_value_t = Pick::Uniform)]
    pick: Pick,
    /// Zipf exponent.
    #[arg(long, default_value_t = 1.0)]
    zipf_exponent: f64,
    /// Share of validations that present an unknown token (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    invalid_share: f64,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    shape: Shape,
    #[command(flatten)]
    tokens: Tokens,
    /// What to call.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Open loop at this many requests per second (closed loop when unset).
    #[arg(long)]
    rate: Option<f64>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct FanoutArgs {
    #[command(flatten)]
    target: Target,
    /// Stream counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 1000])]
    watchers: Vec<usize>,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Revocations per measurement.
    #[arg(long, default_value_t = 300)]
    revocations: usize,
    /// Revocations per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Name of this run in the report.
    #[arg(long, default_value = "server")]
    label: String,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct SuiteArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    shape: Shape,
    #[command(flatten)]
    tokens: Tokens,
    /// Name of this run in the report (for example the backend).
    #[arg(long, default_value = "server")]
    label: String,
    /// Also run CreateSession.
    #[arg(long)]
    with_create: bool,
    /// Also run CheckRateLimit.
    #[arg(long)]
    with_rate_limit: bool,
    /// Also run GetAccessToken.
    #[arg(long)]
    with_access_token: bool,
    /// Write the suite result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Figures of one measured run.
#[derive(Debug)]
struct Outcome {
    workload: Workload,
    mode: String,
    latency_us: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    offered_rate: Option<f64>,
    server_cpu_seconds: Option<f64>,
}

impl Outcome {
    fn completed(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    fn throughput(&self) -> f64 {
        self.completed() as f64 / self.elapsed.as_secs_f64()
    }

    fn to_json(&self) -> Value {
        let h = &self.latency_us;
        let q = |p: f64| h.value_at_quantile(p);
        json!({
            "workload": format!("{:?}", self.workload).to_lowercase(),
            "mode": self.mode,
            "requests": self.completed(),
            "ok": self.ok,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "throughput_rps": self.throughput(),
            "offered_rps": self.offered_rate,
            "achieved_rps": self.throughput(),
            "latency_us": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": h.max() },
            "server_cpu_us_per_request": self.server_cpu_seconds.map(|s| s * 1e6 / self.completed().max(1) as f64),
        })
    }

    fn line(&self) -> String {
        let h = &self.latency_us;
        format!(
            "{:<15} {:<12} {:>10.0} rps  p50 {:>6}us  p90 {:>6}us  p99 {:>6}us  p99.9 {:>6}us  max {:>7}us  errors {}{}",
            format!("{:?}", self.workload).to_lowercase(),
            self.mode,
            self.throughput(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            self.errors.values().sum::<u64>(),
            self.server_cpu_seconds
                .map(|s| format!("  cpu {:.1}us/req", s * 1e6 / self.completed().max(1) as f64))
                .unwrap_or_default()
        )
    }
}

/// Shared state of one run.
struct Recorder {
    latency_us: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Recorder {
    fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")),
            ok: AtomicU64::new(0),
            errors: std::sync::Mutex::new(BTreeMap::new()),
        })
    }
}

/// One worker's local histogram, merged at the end to keep the hot loop lock-free.
struct Local {
    hist: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl Local {
    fn new() -> Local {
        Local {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, result: Result<(), tonic::Code>) {
        let _ = self.hist.record((latency.as_micros() as u64).max(1));
        match result {
            Ok(()) => self.ok += 1,
            Err(code) => *self.errors.entry(format!("{code:?}")).or_default() += 1,
        }
    }

    async fn merge_into(self, recorder: &Recorder) {
        let _ = recorder.latency_us.lock().await.add(&self.hist);
        recorder.ok.fetch_add(self.ok, Ordering::Relaxed);
        let mut errors = recorder.errors.lock().unwrap_or_else(|p| p.into_inner());
        for (code, n) in self.errors {
            *errors.entry(code).or_default() += n;
        }
    }
}

/// What a worker calls.
#[derive(Clone)]
struct Caller {
    workload: Workload,
    health: HealthClient<Channel>,
    sessions: SessionServiceClient<Channel>,
    security: SecurityServiceClient<Channel>,
    upstream: TokenServiceClient<Channel>,
    auth: Option<MetadataValue<Ascii>>,
    tokens: Arc<Vec<String>>,
    pick: Pick,
    zipf: Option<rand_distr::Zipf<f64>>,
    invalid_share: f64,
    counter: Arc<AtomicU64>,
}

impl Caller {
    fn authed<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    fn pick_token(&self) -> String {
        let mut rng = rand::rng();
        if self.tokens.is_empty() || rng.random::<f64>() < self.invalid_share {
            return format!("sat_0000_{:043}", rng.random::<u64>());
        }
        let index = match (&self.zipf, self.pick) {
            (Some(zipf), Pick::Zipf) => (zipf.sample(&mut rng) as usize).saturating_sub(1),
            _ => rng.random_range(0..self.tokens.len()),
        };
        self.tokens[index.min(self.tokens.len() - 1)].clone()
    }

    async fn call(&mut self) -> Result<(), tonic::Code> {
        let result = match self.workload {
            Workload::Health => self.health.check(HealthCheckRequest { service: String::new() }).await.map(|_| ()),
            Workload::Validate => {
                let request = self.authed(pb::ValidateSessionRequest {
                    session_token: self.pick_token(),
                    ip_address: "203.0.113.9".into(),
                    ..Default::default()
                });
                self.sessions.validate_session(request).await.map(|_| ())
            }
            Workload::Create => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                let request = self.authed(create_request(&format!("load-{}-{n}", std::process::id())));
                self.sessions.create_session(request).await.map(|_| ())
            }
            Workload::GetAccessToken => {
                let request = self.authed(pb::GetAccessTokenRequest {
                    selector: Some(pb::get_access_token_request::Selector::SessionToken(self.pick_token())),
                });
                self.upstream.get_access_token(request).await.map(|_| ())
            }
            Workload::CheckRateLimit => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                let request = self.authed(pb::CheckRateLimitRequest {
                    rule_name: "token_refresh".into(),
                    key: format!("key-{}", n % 10_000),
                    cost: 1,
                    consume: None,
                });
                self.security.check_rate_limit(request).await.map(|_| ())
            }
        };
        result.map_err(|status| status.code())
    }
}

fn create_request(user: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user.into(),
        access_token: "bench-access-token".into(),
        refresh_token: "bench-refresh-token".into(),
        expires_in: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
        ip_address: "203.0.113.9".into(),
        user_agent: "loadgen".into(),
        ..Default::default()
    }
}

async fn connect(target: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Endpoint::from_shared(target.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {target}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// Resident memory of a process, in bytes.
struct Env {
    target: Target,
    auth: Option<MetadataValue<Ascii>>,
    tokens: Arc<Vec<String>>,
    /// Server RSS before and after seeding through the API.
    seed_rss: Option<(u64, u64)>,
}

impl Env {
    fn caller(&self, channel: Channel, workload: Workload, tokens: &Tokens, counter: Arc<AtomicU64>) -> Caller {
        Caller {
            workload,
            health: HealthClient::new(channel.clone()),
            sessions: SessionServiceClient::new(channel.clone()),
            security: SecurityServiceClient::new(channel.clone()),
            upstream: TokenServiceClient::new(channel),
            auth: self.auth.clone(),
            tokens: self.tokens.clone(),
            pick: tokens.pick,
            zipf: rand_distr::Zipf::new(self.tokens.len().max(1) as f64, tokens.zipf_exponent).ok(),
            invalid_share: tokens.invalid_share,
            counter,
        }
    }

    /// Runs one workload with `shape`, closed loop or open loop at `rate`.
    async fn run(
        &self,
        workload: Workload,
        shape: &Shape,
        tokens: &Tokens,
        rate: Option<f64>,
    ) -> anyhow::Result<Outcome> {
        let channels = connect(&self.target.target, shape.connections).await?;
        let recorder = Recorder::new();
        let counter = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let measure_from = start + shape.warmup;
        let end = measure_from + shape.duration;
        let mut cpu_start = None;
        let mut tasks = Vec::new();
        match rate {
            None => {
                for channel in &channels {
                    for _ in 0..shape.in_flight {
                        let mut caller = self.caller(channel.clone(), workload, tokens, counter.clone());
                        let recorder = recorder.clone();
                        tasks.push(tokio::spawn(async move {
                            let mut local = Local::new();
                            loop {
                                let sent = Instant::now();
                                if sent >= end {
                                    break;
                                }
                                let result = caller.call().await;
                                if sent >= measure_from {
                                    local.record(sent.elapsed(), result);
                                }
                            }
                            local.merge_into(&recorder).await;
                        }));
                    }
                }
            }
            Some(rate) => {
                // Each connection sends at rate / N, its schedule offset so the arrivals interleave.
                let per_connection = rate / shape.connections as f64;
                let interval = Duration::from_secs_f64(1.0 / per_connection);
                for (index, channel) in channels.iter().enumerate() {
                    let caller = self.caller(channel.clone(), workload, tokens, counter.clone());
                    let recorder = recorder.clone();
                    let permits = Arc::new(tokio::sync::Semaphore::new(shape.in_flight));
                    let offset = interval.mul_f64(index as f64 / shape.connections as f64);
                    tasks.push(tokio::spawn(async move {
                        let locals = Arc::new(std::sync::Mutex::new(Local::new()));
                        let mut intended = start + offset;
                        let mut inflight = Vec::new();
                        while intended < end {
                            tokio::time::sleep_until(intended.into()).await;
                            // Waiting for a slot counts in the latency: it is measured from `intended`.
                            let Ok(permit) = permits.clone().acquire_owned().await else { break };
                            let mut caller = caller.clone();
                            let locals = locals.clone();
                            let at = intended;
                            inflight.push(tokio::spawn(async move {
                                let result = caller.call().await;
                                if at >= measure_from {
                                    locals.lock().unwrap_or_else(|p| p.into_inner()).record(at.elapsed(), result);
                                }
                                drop(permit);
                            }));
                            intended += interval;
                            inflight.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                        }
                        for task in inflight {
                            let _ = task.await;
                        }
                        let local =
                            std::mem::replace(&mut *locals.lock().unwrap_or_else(|p| p.into_inner()), Local::new());
                        local.merge_into(&recorder).await;
                    }));
                }
            }
        }
        tokio::time::sleep_until(measure_from.into()).await;
        if let Some(pid) = self.target.server_pid {
            cpu_start = cpu_seconds(pid);
        }
        tokio::time::sleep_until(end.into()).await;
        let cpu_end = self.target.server_pid.and_then(cpu_seconds);
        for task in tasks {
            task.await?;
        }
        let elapsed = shape.duration;
        let latency_us = recorder.latency_us.lock().await.clone();
        let errors = recorder.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Outcome {
            workload,
            mode: rate.map_or("closed".into(), |r| format!("open@{r:.0}")),
            latency_us,
            ok: recorder.ok.load(Ordering::Relaxed),
            errors,
            elapsed,
            offered_rate: rate,
            server_cpu_seconds: cpu_start.zip(cpu_end).map(|(a, b)| b - a),
        })
    }
}

/// Creates `count` sessions (one user each) through CreateSession and returns their tokens.
async fn seed(target: &Target, auth: &Option<MetadataValue<Ascii>>, count: usize) -> anyhow::Result<Vec<String>> {
    let channels = connect(&target.target, 4).await?;
    let next = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count)));
    let mut tasks = Vec::new();
    for worker in 0..64 {
        let mut client = SessionServiceClient::new(channels[worker % channels.len()].clone());
        let next = next.clone();
        let tokens = tokens.clone();
        let auth = auth.clone();
        let run = std::process::id();
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n as usize >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                let mut request = tonic::Request::new(create_request(&format!("seed-{run}-{n}")));
                if let Some(auth) = &auth {
                    request.metadata_mut().insert("authorization", auth.clone());
                }
                let response = client.create_session(request).await.context("seeding a session")?;
                let token = response.into_inner().session_token;
                tokens.lock().unwrap_or_else(|p| p.into_inner()).push(token);
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let tokens = std::mem::take(&mut *tokens.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(tokens)
}

async fn env(target: &Target, tokens: &Tokens, need_tokens: bool) -> anyhow::Result<Env> {
    let auth = match &target.key {
        Some(key) => Some(format!("Bearer {key}").parse().context("the API key is not a valid header value")?),
        None => None,
    };
    let mut seed_rss = None;
    let list = match (&tokens.tokens_file, need_tokens) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        (None, true) => {
            let started = Instant::now();
            let before = target.server_pid.and_then(rss_bytes);
            let seeded = seed(target, &auth, tokens.sessions).await?;
            let after = target.server_pid.and_then(rss_bytes);
            seed_rss = before.zip(after);
            eprintln!("seeded {} sessions in {:.1}s", seeded.len(), started.elapsed().as_secs_f64());
            seeded
        }
        (None, false) => Vec::new(),
    };
    Ok(Env { target: target.clone(), auth, tokens: Arc::new(list), seed_rss })
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_owned();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    json!({ "cores": cores, "kernel": kernel.trim(), "cpu": cpu, "commit": commit.trim() })
}

fn shape_json(shape: &Shape) -> Value {
    json!({
        "connections": shape.connections,
        "in_flight_per_connection": shape.in_flight,
        "duration_s": shape.duration.as_secs_f64(),
        "warmup_s": shape.warmup.as_secs_f64(),
    })
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 { json!((a / b * 1000.0).round() / 1000.0) } else { Value::Null }
}

async fn suite(args: SuiteArgs) -> anyhow::Result<Value> {
    let env = env(&args.target, &args.tokens, true).await?;
    let mut runs = Vec::new();
    let closed_health = env.run(Workload::Health, &args.shape, &args.tokens, None).await?;
    println!("{}", closed_health.line());
    let closed_validate = env.run(Workload::Validate, &args.shape, &args.tokens, None).await?;
    println!("{}", closed_validate.line());
    // Open loop at half of Check's peak, for both, to compare latency under equal load.
    let half = (closed_health.throughput() / 2.0).max(100.0);
    let open_health = env.run(Workload::Health, &args.shape, &args.tokens, Some(half)).await?;
    println!("{}", open_health.line());
    let open_validate = env.run(Workload::Validate, &args.shape, &args.tokens, Some(half)).await?;
    println!("{}", open_validate.line());
    let mut ratios = json!({
        "validate_over_check_throughput": ratio(closed_validate.throughput(), closed_health.throughput()),
        "validate_over_check_p99_open_loop_at_half_check_peak": ratio(
            open_validate.latency_us.value_at_quantile(0.99) as f64,
            open_health.latency_us.value_at_quantile(0.99) as f64
        ),
    });
    runs.extend([&closed_health, &closed_validate, &open_health, &open_validate].map(Outcome::to_json));
    if args.with_create {
        let create = env.run(Workload::Create, &args.shape, &args.tokens, None).await?;
        println!("{}", create.line());
        ratios["create_over_check_throughput"] = ratio(create.throughput(), closed_health.throughput());
        runs.push(create.to_json());
    }
    if args.with_rate_limit {
        let limit = env.run(Workload::CheckRateLimit, &args.shape, &args.tokens, None).await?;
        println!("{}", limit.line());
        ratios["check_rate_limit_over_check_throughput"] = ratio(limit.throughput(), closed_health.throughput());
        runs.push(limit.to_json());
    }
    if args.with_access_token {
        let access = env.run(Workload::GetAccessToken, &args.shape, &args.tokens, None).await?;
        println!("{}", access.line());
        ratios["get_access_token_over_check_throughput"] = ratio(access.throughput(), closed_health.throughput());
        runs.push(access.to_json());
    }
    println!("ratios: {ratios}");
    Ok(json!({
        "label": args.label,
        "machine": machine(),
        "config": {
            "shape": shape_json(&args.shape),
            "sessions": env.tokens.len(),
            "pick": format!("{:?}", args.tokens.pick).to_lowercase(),
            "invalid_share": args.tokens.invalid_share,
        },
        "runs": runs,
        "ratios": ratios,
        "server_rss_bytes": args.target.server_pid.and_then(rss_bytes),
        "server_bytes_per_session_seeded": env.seed_rss.map(|(before, after)| {
            (after.saturating_sub(before) as f64 / env.tokens.len().max(1) as f64).round()
        }),
    }))
}

fn write_json(path: &Option<PathBuf>, value: &Value) -> anyhow::Result<()> {
    if let Some(path) = path {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => {
            let need_tokens = matches!(args.workload, Workload::Validate | Workload::GetAccessToken);
            let env = env(&args.target, &args.tokens, need_tokens).await?;
            let outcome = env.run(args.workload, &args.shape, &args.tokens, args.rate).await?;
            println!("{}", outcome.line());
            let mut value = outcome.to_json();
            value["machine"] = machine();
            value["config"] = shape_json(&args.shape);
            write_json(&args.json, &value)?;
        }
        Command::Suite(args) => {
            let json_path = args.json.clone();
            let value = suite(args).await?;
            write_json(&json_path, &value)?;
        }
        Command::Fanout(args) => {
            let auth: Option<MetadataValue<Ascii>> = match &args.target.key {
                Some(key) => Some(format!("Bearer {key}").parse().context("the API key is not a valid header value")?),
                None => None,
            };
            let reference = fanout::Reference::new().serve().await?;
            let mut runs = Vec::new();
            let mut ratios = serde_json::Map::new();
            for &k in &args.watchers {
                let server =
                    fanout::run(&args.target.target, &auth, k, args.connections, args.revocations, args.rate, true)
                        .await?;
                println!("{}", server.line(&format!("{}-{k}-watchers", args.label)));
                let bare =
                    fanout::run(&reference, &None, k, args.connections, args.revocations, args.rate, false).await?;
                println!("{}", bare.line(&format!("broadcast-{k}-watchers")));
                ratios.insert(
                    format!("to_last_p99_over_broadcast_{k}_watchers"),
                    ratio(
                        server.to_last_us.value_at_quantile(0.99) as f64,
                        bare.to_last_us.value_at_quantile(0.99) as f64,
                    ),
                );
                runs.push(server.to_json(&args.label, k, args.connections));
                runs.push(bare.to_json("broadcast-reference", k, args.connections));
            }
            let value = json!({
                "label": format!("{}-fanout", args.label),
                "machine": machine(),
                "config": { "connections": args.connections, "revocations": args.revocations, "rate": args.rate },
                "fanout": runs,
                "ratios": ratios,
            });
            println!("ratios: {}", value["ratios"]);
            write_json(&args.json, &value)?;
        }
        Command::Merge { out, inputs } => {
            let mut suites = Vec::new();
            for input in &inputs {
                let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
                suites.push(serde_json::from_str::<Value>(&text)?);
            }
            write_json(&Some(out), &json!({ "machine": machine(), "suites": suites }))?;
        }
    }
    Ok(())
}
