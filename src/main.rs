//! The `session-authority` command: `serve` runs the server until SIGTERM or SIGINT,
//! `hash-key` prints the digest of an API key for the config file, `health` probes a server,
//! `watch` streams revocations as JSON lines (the reference sidecar), `sidecar` serves Envoy's
//! ext_authz next to Envoy with a cache the revocation feed invalidates.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use session_authority::config::Flags;
use session_authority::grpc::pb;
use session_authority::{App, Config, crypto};

/// mimalloc instead of the system allocator: every call allocates many small, short-lived
/// buffers (HTTP/2 frames, decoded messages, session copies), where glibc's malloc cost a tenth
/// of the server's CPU and fragmented the heap of a large memory store (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "session-authority", version, about = "gRPC session authority for polyglot backends")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the gRPC API (defaults: 127.0.0.1:50051, embedded storage in ./data).
    Serve(ServeArgs),
    /// Check a server's gRPC health (exit 0 when SERVING); used by the container HEALTHCHECK.
    Health {
        /// Server URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        target: String,
        /// Service name to check; empty means the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Offline: write COUNT sessions straight into the embedded store of DATA_DIR (the server
    /// must not be running) and their session tokens to FILE, for benchmarks. Never use this on
    /// production data: the tokens file holds bearer secrets.
    #[cfg(feature = "bench-seed")]
    Seed {
        /// Data directory of the embedded store.
        #[arg(long, default_value = "./data")]
        data_dir: String,
        /// Sessions to create, one user each.
        #[arg(long)]
        count: usize,
        /// Where to write the tokens, one per line.
        #[arg(long)]
        tokens_out: std::path::PathBuf,
    },
    /// Stream revocations as JSON lines on stdout, resuming from the last cursor across
    /// disconnects (API key from SESSION_AUTHORITY_KEY).
    Watch {
        /// Server URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        target: String,
        /// Resume after this cursor (from an earlier event, heartbeat or ListRevocations);
        /// default: from now.
        #[arg(long)]
        after: Option<String>,
        /// Only this user's revocations.
        #[arg(long)]
        user: Option<String>,
    },
    /// Serve Envoy's ext_authz Check next to Envoy: forward each Check to the authority and reuse
    /// allowed answers for --cache-ttl, dropping them as the revocation feed names their
    /// session (API key with the proxy role from SESSION_AUTHORITY_KEY).
    Sidecar {
        /// The authority's URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        authority: String,
        /// Address to serve ext_authz on (keep it on loopback: callers are not authenticated).
        #[arg(long, default_value = "127.0.0.1:9191")]
        listen: std::net::SocketAddr,
        /// Longest reuse of an allowed answer (it also ends at the session's own deadline).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        cache_ttl: Duration,
        /// Most answers kept at once.
        #[arg(long, default_value_t = 100_000)]
        max_entries: usize,
        /// Address of the Prometheus /metrics listener; off when unset.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// text or json.
        #[arg(long, default_value = "text")]
        log_format: String,
    },
    /// Read an API key on stdin and print its `sha256:` digest for `[[api_keys]]` in the config.
    HashKey {
        /// Also print a whole `[[api_keys]]` entry with this name.
        #[arg(long)]
        name: Option<String>,
        /// Role of that entry: service, admin, watcher or proxy.
        #[arg(long, default_value = "service")]
        role: String,
    },
    /// Print a fresh encryption key (base64 of 32 random bytes) for
    /// SESSION_AUTHORITY_ENCRYPTION_KEY; shared storage needs the same one on every replica.
    GenKey,
}

/// The contract's flags; each is also an environment variable and a config-file key.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on [env: SESSION_AUTHORITY_LISTEN] [default: 127.0.0.1:50051]
    #[arg(long)]
    listen: Option<String>,
    /// embedded, memory, redis or kv-rest [env: SESSION_AUTHORITY_STORAGE] [default: embedded]
    #[arg(long)]
    storage: Option<String>,
    /// Data directory of the embedded store and generated keys [env: SESSION_AUTHORITY_DATA_DIR] [default: ./data]
    #[arg(long)]
    data_dir: Option<String>,
    /// TOML configuration file [env: SESSION_AUTHORITY_CONFIG]
    #[arg(long)]
    config: Option<String>,
    /// Address of the Prometheus /metrics listener; off when unset [env: SESSION_AUTHORITY_METRICS_LISTEN]
    #[arg(long)]
    metrics_listen: Option<String>,
    /// text or json [env: SESSION_AUTHORITY_LOG_FORMAT] [default: text]
    #[arg(long)]
    log_format: Option<String>,
    /// Benchmarks only, memory storage only: store N sessions (one user each) in process before
    /// serving and write their tokens to --seed-tokens-out. That file holds bearer secrets.
    #[cfg(feature = "bench-seed")]
    #[arg(long, hide = true, requires = "seed_tokens_out")]
    seed_sessions: Option<usize>,
    /// Where --seed-sessions writes the tokens, one per line.
    #[cfg(feature = "bench-seed")]
    #[arg(long, hide = true, requires = "seed_sessions")]
    seed_tokens_out: Option<std::path::PathBuf>,
}

impl ServeArgs {
    fn flags(&self) -> Flags {
        [
            ("listen", &self.listen),
            ("storage", &self.storage),
            ("data_dir", &self.data_dir),
            ("config", &self.config),
            ("metrics_listen", &self.metrics_listen),
            ("log_format", &self.log_format),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect()
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let flags = args.flags();
    let config = Config::load(&flags, &|name| std::env::var(name).ok())?;
    #[cfg(feature = "bench-seed")]
    if args.seed_sessions.is_some() && config.storage.kind != session_authority::config::StorageKind::Memory {
        anyhow::bail!(
            "--seed-sessions works only with memory storage; seed the embedded store with `session-authority seed`"
        );
    }
    let telemetry = session_authority::telemetry::init(config.log_format, &|name| std::env::var(name).ok())?;
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for (variable, nearest) in config.unread_env_vars(names) {
        match nearest {
            Some(nearest) => {
                tracing::warn!(%variable, did_you_mean = %nearest, "an environment variable no setting reads; it has no effect")
            }
            None => tracing::warn!(
                %variable,
                "an environment variable no setting reads; it has no effect (a new rate rule or token provider is declared in the config file, and its fields may then come from the environment)"
            ),
        }
    }
    let result = async {
        let app = App::build(config).await?;
        #[cfg(feature = "bench-seed")]
        if let (Some(count), Some(out)) = (args.seed_sessions, &args.seed_tokens_out) {
            session_authority::seeding::seed_in_process(app.sessions(), count, out)
                .await
                .map_err(|e| session_authority::config::ConfigError(format!("--seed-sessions: {e:#}")))?;
        }
        tokio::spawn(reload_keys_on_sighup(flags, app.api_keys()));
        app.run_until(shutdown_signal()).await
    }
    .await;
    // Flush the spans still buffered (the exports run on this runtime, so not on its threads).
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(result?)
}

/// Rotates API keys without a restart: on SIGHUP the configuration (its file, above all) is read
/// again and its keys replace the accepted ones. A configuration that no longer loads is
/// reported and the current keys stay.
async fn reload_keys_on_sighup(flags: Flags, keys: session_authority::grpc::auth::ApiKeys) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; API keys can only change with a restart");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let reloaded = Config::load(&flags, &|name| std::env::var(name).ok())
            .and_then(|config| session_authority::bootstrap::reload_api_keys(&config, &keys));
        match reloaded {
            Ok(count) => tracing::info!(keys = count, "API keys reloaded"),
            Err(e) => tracing::warn!(error = %e, "configuration reload failed; keeping the current API keys"),
        }
    }
}

async fn health(target: String, service: String) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = tonic::transport::Endpoint::from_shared(target.clone())?
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {target}: {e}"))?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest { service: service.clone() })
        .await
        .map_err(|e| anyhow::anyhow!("health check failed: {}", e.message()))?
        .into_inner();
    let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    anyhow::ensure!(status == ServingStatus::Serving, "{target} is {}", status.as_str_name());
    Ok(())
}

/// One revocation event as a JSON line.
fn event_json(event: &pb::RevocationEvent) -> serde_json::Value {
    let kind = pb::RevocationKind::try_from(event.kind)
        .map(|k| k.as_str_name().trim_start_matches("REVOCATION_KIND_").to_ascii_lowercase())
        .unwrap_or_else(|_| event.kind.to_string());
    let time = |ts: &Option<prost_types::Timestamp>| {
        ts.as_ref()
            .and_then(|ts| {
                let millis = session_authority::grpc::convert::millis(ts);
                let at = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(millis).ok()?))?;
                Some(humantime::format_rfc3339_millis(at).to_string())
            })
            .map_or(serde_json::Value::Null, serde_json::Value::String)
    };
    serde_json::json!({
        "cursor": event.cursor,
        "session_id": event.session_id,
        "user_id": event.user_id,
        "kind": kind,
        "reason": event.reason,
        "revoked_by": event.revoked_by,
        "revoked_at": time(&event.revoked_at),
        "expires_at": time(&event.expires_at),
    })
}

/// Subscribes and prints events until the stream ends; `cursor` follows every event and
/// heartbeat, so a reconnect resumes exactly where this one stopped. `Ok(true)` when at least
/// one message arrived (the connection was healthy).
async fn watch_once(
    endpoint: &tonic::transport::Endpoint,
    key: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    cursor: &mut Option<String>,
    user: &Option<String>,
) -> Result<bool, tonic::Status> {
    let channel = endpoint.connect().await.map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
    let mut client = pb::revocation_service_client::RevocationServiceClient::new(channel);
    let mut request = tonic::Request::new(pb::WatchRevocationsRequest {
        after_cursor: cursor.clone().unwrap_or_default(),
        user_id: user.clone().unwrap_or_default(),
        heartbeat_interval: None,
    });
    request.metadata_mut().insert("authorization", key.clone());
    let mut stream = client.watch_revocations(request).await?.into_inner();
    let mut received = false;
    while let Some(message) = stream.message().await? {
        received = true;
        match message.message {
            Some(pb::watch_revocations_response::Message::Event(event)) => {
                let mut out = std::io::stdout().lock();
                let written = writeln!(out, "{}", event_json(&event)).and_then(|()| out.flush());
                if let Err(e) = written {
                    // Nobody reads our output any more (a closed pipe): stop instead of spinning.
                    return Err(tonic::Status::cancelled(format!("cannot write to stdout: {e}")));
                }
                *cursor = Some(event.cursor);
            }
            Some(pb::watch_revocations_response::Message::Heartbeat(heartbeat)) => *cursor = Some(heartbeat.cursor),
            None => {}
        }
    }
    Ok(received)
}

async fn watch(target: String, after: Option<String>, user: Option<String>) -> anyhow::Result<()> {
    let key = std::env::var("SESSION_AUTHORITY_KEY").map_err(|_| {
        anyhow::anyhow!("set SESSION_AUTHORITY_KEY to an API key with the watcher, service or admin role")
    })?;
    let key = format!("Bearer {}", key.trim())
        .parse()
        .map_err(|_| anyhow::anyhow!("SESSION_AUTHORITY_KEY is not a valid header value"))?;
    let endpoint = tonic::transport::Endpoint::from_shared(target.clone())
        .map_err(|e| anyhow::anyhow!("--target {target}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30));
    let mut cursor = after;
    let first_delay = Duration::from_millis(200);
    let mut delay = first_delay;
    loop {
        let outcome = watch_once(&endpoint, &key, &mut cursor, &user).await;
        let healthy = matches!(outcome, Ok(true));
        if let Err(status) = &outcome {
            use tonic::Code;
            match status.code() {
                // Retrying cannot fix these: say why and stop.
                Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument | Code::Cancelled => {
                    anyhow::bail!("watch: {:?}: {}", status.code(), status.message())
                }
                Code::OutOfRange => anyhow::bail!(
                    "watch: {}; restart without --after (or with the cursor of ListRevocations)",
                    status.message()
                ),
                _ => {}
            }
        }
        if healthy {
            delay = first_delay;
        }
        let reason = match &outcome {
            Ok(_) => "stream ended".to_owned(),
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        eprintln!(
            "session-authority watch: {reason}; reconnecting in {} ms after cursor {}",
            delay.as_millis(),
            cursor.as_deref().unwrap_or("(now)")
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn sidecar(
    mut config: session_authority::sidecar::SidecarConfig,
    metrics_listen: Option<std::net::SocketAddr>,
    log_format: String,
) -> anyhow::Result<()> {
    let key = std::env::var("SESSION_AUTHORITY_KEY")
        .map_err(|_| anyhow::anyhow!("set SESSION_AUTHORITY_KEY to an API key with the proxy role"))?;
    config.key = secrecy::SecretString::from(key);
    let format = match log_format.as_str() {
        "text" => session_authority::config::LogFormat::Text,
        "json" => session_authority::config::LogFormat::Json,
        other => anyhow::bail!("--log-format {other:?}: expected text or json"),
    };
    let telemetry = session_authority::telemetry::init(format, &|name| std::env::var(name).ok())?;
    let result = async {
        if let Some(addr) = metrics_listen {
            session_authority::sidecar::install_metrics(addr)?;
        }
        session_authority::sidecar::run(config, shutdown_signal()).await
    }
    .await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

fn hash_key(name: Option<String>, role: String) -> anyhow::Result<()> {
    let mut key = String::new();
    std::io::stdin().read_to_string(&mut key)?;
    let key = key.trim();
    anyhow::ensure!(key.len() >= 16, "the key read on stdin is shorter than 16 characters");
    anyhow::ensure!(
        session_authority::config::Role::parse(&role).is_some(),
        "--role must be service, admin, watcher or proxy"
    );
    let hash = crypto::api_key_hash_string(key);
    match name {
        Some(name) => println!("[[api_keys]]\nname = {name:?}\nrole = {role:?}\nhash = {hash:?}"),
        None => println!("{hash}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(serve(args)),
            Err(e) => Err(e.into()),
        },
        Command::HashKey { name, role } => hash_key(name, role),
        Command::GenKey => {
            use base64::Engine as _;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(crypto::random_bytes()));
            Ok(())
        }
        #[cfg(feature = "bench-seed")]
        Command::Seed { data_dir, count, tokens_out } => {
            session_authority::seeding::seed_embedded(data_dir, count, tokens_out)
        }
        Command::Watch { target, after, user } => {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(watch(target, after, user)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Sidecar { authority, listen, cache_ttl, max_entries, metrics_listen, log_format } => {
            match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(sidecar(
                    session_authority::sidecar::SidecarConfig {
                        authority,
                        listen,
                        cache_ttl,
                        max_entries,
                        key: secrecy::SecretString::from(String::new()),
                    },
                    metrics_listen,
                    log_format,
                )),
                Err(e) => Err(e.into()),
            }
        }
        Command::Health { target, service } => match tokio::runtime::Builder::new_current_thread().enable_all().build()
        {
            Ok(runtime) => runtime.block_on(health(target, service)),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-authority: {e:#}");
            ExitCode::FAILURE
        }
    }
}
