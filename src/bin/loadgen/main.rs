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
mod raw;
mod recorder;
mod runner;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use hdrhistogram::Histogram;
use prost::Message as _;
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

use raw::{RawChannel, frame};
use recorder::*;
use runner::*;

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
    /// Serve the bare reference: tonic's health service alone, with none of the server's
    /// layers, so `suite --bare-target` can price them (`check_over_bare_check_throughput`).
    BareCheck {
        /// Address to listen on; the bound address is printed as `listening on ADDR`.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
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
    /// API key with the proxy role, for the ext_authz workload (or SESSION_AUTHORITY_PROXY_KEY).
    #[arg(long, env = "SESSION_AUTHORITY_PROXY_KEY", hide_env_values = true)]
    proxy_key: Option<String>,
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
    /// What sends the unary calls.
    #[arg(long, value_enum, default_value_t = Driver::H2)]
    driver: Driver,
}

/// What sends the unary calls.
#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum Driver {
    /// gRPC frames written straight onto HTTP/2 (the h2 crate): cheap enough that the server
    /// saturates first.
    H2,
    /// tonic's generated clients, as an application would call.
    Tonic,
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
    /// Envoy's envoy.service.auth.v3.Authorization/Check over the seeded tokens, each sent as
    /// the `session_id` cookie of a proxied request (needs --proxy-key).
    ExtAuthz,
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

/// Where to send load, how much, and with which session tokens.
#[derive(clap::Args, Debug)]
struct Load {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    shape: Shape,
    #[command(flatten)]
    tokens: Tokens,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    load: Load,
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
    load: Load,
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
    /// Also run Envoy's ext_authz Check (needs --proxy-key).
    #[arg(long)]
    with_ext_authz: bool,
    /// A bare health server (`loadgen bare-check`) to run the same Check against.
    #[arg(long)]
    bare_target: Option<String>,
    /// PID of the bare server, for its CPU time.
    #[arg(long)]
    bare_pid: Option<u32>,
    /// Write the suite result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
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
        "driver": format!("{:?}", shape.driver).to_lowercase(),
    })
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 { json!((a / b * 1000.0).round() / 1000.0) } else { Value::Null }
}

async fn suite(args: SuiteArgs) -> anyhow::Result<Value> {
    let Load { target, shape, tokens } = &args.load;
    let env = env(target, tokens, true).await?;
    let mut runs = Vec::new();
    let closed_health = env.run(Workload::Health, shape, tokens, None).await?;
    println!("{}", closed_health.line());
    let closed_validate = env.run(Workload::Validate, shape, tokens, None).await?;
    println!("{}", closed_validate.line());
    // Open loop at half of Check's peak, for both, to compare latency under equal load.
    let half = (closed_health.throughput() / 2.0).max(100.0);
    let open_health = env.run(Workload::Health, shape, tokens, Some(half)).await?;
    println!("{}", open_health.line());
    let open_validate = env.run(Workload::Validate, shape, tokens, Some(half)).await?;
    println!("{}", open_validate.line());
    let mut ratios = json!({
        "validate_over_check_throughput": ratio(closed_validate.throughput(), closed_health.throughput()),
        "validate_over_check_p99_open_loop_at_half_check_peak": ratio(
            open_validate.latency_us.value_at_quantile(0.99) as f64,
            open_health.latency_us.value_at_quantile(0.99) as f64
        ),
    });
    runs.extend([&closed_health, &closed_validate, &open_health, &open_validate].map(Outcome::to_json));
    if let Some(bare) = &args.bare_target {
        let bare = Target { target: bare.clone(), server_pid: args.bare_pid, ..target.clone() };
        let outcome = env_for(&bare, &env).run(Workload::Health, shape, tokens, None).await?;
        println!("{} (bare tonic health server)", outcome.line());
        ratios["check_over_bare_check_throughput"] = ratio(closed_health.throughput(), outcome.throughput());
        let mut value = outcome.to_json();
        value["workload"] = json!("bare_check");
        runs.push(value);
    }
    // The optional unary workloads, each as a ratio of the same run's health Check.
    let optional = [
        (args.with_create, Workload::Create, "create_over_check_throughput"),
        (args.with_rate_limit, Workload::CheckRateLimit, "check_rate_limit_over_check_throughput"),
        (args.with_access_token, Workload::GetAccessToken, "get_access_token_over_check_throughput"),
        (args.with_ext_authz, Workload::ExtAuthz, "ext_authz_check_over_check_throughput"),
    ];
    for (wanted, workload, name) in optional {
        if !wanted {
            continue;
        }
        let outcome = env.run(workload, shape, tokens, None).await?;
        println!("{}", outcome.line());
        ratios[name] = ratio(outcome.throughput(), closed_health.throughput());
        if workload == Workload::Create {
            ratios["create_throughput_rps"] = json!(outcome.throughput().round());
            ratios["create_p99_ms"] = json!(outcome.latency_us.value_at_quantile(0.99) as f64 / 1000.0);
        }
        if workload == Workload::ExtAuthz {
            ratios["ext_authz_check_over_validate_throughput"] =
                ratio(outcome.throughput(), closed_validate.throughput());
        }
        runs.push(outcome.to_json());
    }
    // Whether every figure above measured the server: its driver used less CPU than it did.
    let client_over_server = runs.iter().filter_map(|r| r["client_over_server_cpu"].as_f64()).reduce(f64::max);
    ratios["max_client_over_server_cpu"] = json!(client_over_server);
    println!("ratios: {ratios}");
    Ok(json!({
        "label": args.label,
        "machine": machine(),
        "config": {
            "shape": shape_json(shape),
            "sessions": env.tokens.len(),
            "pick": format!("{:?}", tokens.pick).to_lowercase(),
            "invalid_share": tokens.invalid_share,
        },
        "runs": runs,
        "ratios": ratios,
        "server_rss_bytes": target.server_pid.and_then(rss_bytes),
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
            let need_tokens =
                matches!(args.workload, Workload::Validate | Workload::GetAccessToken | Workload::ExtAuthz);
            let Load { target, shape, tokens } = &args.load;
            let env = env(target, tokens, need_tokens).await?;
            let outcome = env.run(args.workload, shape, tokens, args.rate).await?;
            println!("{}", outcome.line());
            let mut value = outcome.to_json();
            value["machine"] = machine();
            value["config"] = shape_json(shape);
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
            // The goal's figures, at the largest watcher count.
            let largest = args.watchers.iter().max().copied().unwrap_or(0);
            if let Some(last) = runs.iter().find(|r| r["label"] == json!(args.label) && r["watchers"] == json!(largest))
            {
                ratios.insert(
                    "last_watcher_p99_ms".into(),
                    last["to_last_subscriber_us"]["p99"].as_f64().map(|us| us / 1000.0).into(),
                );
            }
            if let Some(&k) = args.watchers.iter().max() {
                ratios.insert(
                    "last_over_broadcast_p99".into(),
                    ratios.get(&format!("to_last_p99_over_broadcast_{k}_watchers")).cloned().unwrap_or(Value::Null),
                );
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
        Command::BareCheck { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("listening on {}", listener.local_addr()?);
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let (_reporter, health) = tonic_health::server::health_reporter();
            tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming).await?;
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
