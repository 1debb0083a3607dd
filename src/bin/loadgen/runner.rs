//! Running a workload: connections, the caller of each RPC, seeding, and the environment a
//! run measures (the server's process, its CPU and memory).

use super::*;

/// What a worker calls.
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) workload: Workload,
    pub(super) health: HealthClient<Channel>,
    pub(super) sessions: SessionServiceClient<Channel>,
    pub(super) security: SecurityServiceClient<Channel>,
    pub(super) upstream: TokenServiceClient<Channel>,
    pub(super) ext_authz: AuthorizationClient<Channel>,
    pub(super) auth: Option<MetadataValue<Ascii>>,
    pub(super) proxy_auth: Option<MetadataValue<Ascii>>,
    pub(super) tokens: Arc<Vec<String>>,
    pub(super) pick: Pick,
    pub(super) zipf: Option<rand_distr::Zipf<f64>>,
    pub(super) invalid_share: f64,
    pub(super) counter: Arc<AtomicU64>,
    /// Set when the h2 driver sends the calls instead of the tonic clients.
    pub(super) raw: Option<RawChannel>,
}

impl Caller {
    pub(super) fn authed<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    pub(super) fn pick_token(&self) -> String {
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

    pub(super) async fn call(&mut self) -> Result<(), tonic::Code> {
        if let Some(raw) = &self.raw {
            return self.call_raw(raw).await;
        }
        let result = match self.workload {
            Workload::Health => self.health.check(HealthCheckRequest { service: String::new() }).await.map(|_| ()),
            Workload::Validate => {
                let request = self.authed(validate_request(self.pick_token()));
                self.sessions.validate_session(request).await.map(|_| ())
            }
            Workload::Create => {
                let request = self.authed(create_request(&self.next_user()));
                self.sessions.create_session(request).await.map(|_| ())
            }
            Workload::GetAccessToken => {
                let request = self.authed(access_token_request(self.pick_token()));
                self.upstream.get_access_token(request).await.map(|_| ())
            }
            Workload::CheckRateLimit => {
                let request = self.authed(rate_limit_request(self.counter.fetch_add(1, Ordering::Relaxed)));
                self.security.check_rate_limit(request).await.map(|_| ())
            }
            Workload::ExtAuthz => {
                let mut request = tonic::Request::new(proxied_request(&self.pick_token()));
                if let Some(auth) = &self.proxy_auth {
                    request.metadata_mut().insert("authorization", auth.clone());
                }
                match self.ext_authz.check(request).await {
                    Ok(response) => denial(&response.into_inner()),
                    Err(status) => Err(status),
                }
            }
        };
        result.map_err(|status| status.code())
    }

    fn next_user(&self) -> String {
        format!("load-{}-{}", std::process::id(), self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// The same calls through the h2 driver.
    async fn call_raw(&self, raw: &RawChannel) -> Result<(), tonic::Code> {
        let (path, body) = match self.workload {
            Workload::Health => ("/grpc.health.v1.Health/Check", frame(&HealthCheckRequest { service: String::new() })),
            Workload::Validate => {
                ("/atoms.session.v1.SessionService/ValidateSession", frame(&validate_request(self.pick_token())))
            }
            Workload::Create => {
                ("/atoms.session.v1.SessionService/CreateSession", frame(&create_request(&self.next_user())))
            }
            Workload::GetAccessToken => {
                ("/atoms.session.v1.TokenService/GetAccessToken", frame(&access_token_request(self.pick_token())))
            }
            Workload::CheckRateLimit => (
                "/atoms.session.v1.SecurityService/CheckRateLimit",
                frame(&rate_limit_request(self.counter.fetch_add(1, Ordering::Relaxed))),
            ),
            Workload::ExtAuthz => {
                ("/envoy.service.auth.v3.Authorization/Check", frame(&proxied_request(&self.pick_token())))
            }
        };
        let key = match self.workload {
            Workload::Health => None,
            Workload::ExtAuthz => self.proxy_auth.as_ref(),
            _ => self.auth.as_ref(),
        };
        let answer = raw.unary(path, key.map(|k| k.as_bytes()), body).await?;
        if self.workload == Workload::ExtAuthz {
            let response = CheckResponse::decode(answer).map_err(|_| tonic::Code::Internal)?;
            denial(&response).map_err(|status| status.code())?;
        }
        Ok(())
    }
}

/// A denial is an answer too; it counts as the code Envoy would act on.
fn denial(response: &CheckResponse) -> Result<(), tonic::Status> {
    match response.status.as_ref().map_or(0, |s| s.code) {
        0 => Ok(()),
        code => Err(tonic::Status::new(tonic::Code::from(code), "denied")),
    }
}

fn validate_request(session_token: String) -> pb::ValidateSessionRequest {
    pb::ValidateSessionRequest { session_token, ip_address: "203.0.113.9".into(), ..Default::default() }
}

fn access_token_request(token: String) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest { selector: Some(pb::get_access_token_request::Selector::SessionToken(token)) }
}

fn rate_limit_request(n: u64) -> pb::CheckRateLimitRequest {
    pb::CheckRateLimitRequest {
        rule_name: "token_refresh".into(),
        key: format!("key-{}", n % 10_000),
        cost: 1,
        consume: None,
    }
}

/// The CheckRequest Envoy sends for `GET /` from 203.0.113.9 with `token` as the session cookie.
pub(super) fn proxied_request(token: &str) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
    let headers = [
        (":method", "GET".to_owned()),
        (":path", "/".to_owned()),
        (":authority", "app.example".to_owned()),
        ("cookie", format!("session_id={token}")),
        ("user-agent", "loadgen".to_owned()),
    ];
    let source = attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "203.0.113.9".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(40_000)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(source),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers: headers.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub(super) fn create_request(user: &str) -> pb::CreateSessionRequest {
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

pub(super) async fn connect(target: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
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

/// The kernel's clock ticks per second (`getconf CLK_TCK`), asked once per process and before
/// a run's measured window, so no process is spawned while calls are being timed.
pub(super) fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// Resident memory of a process, in bytes.
pub(super) struct Env {
    pub(super) target: Target,
    pub(super) auth: Option<MetadataValue<Ascii>>,
    pub(super) proxy_auth: Option<MetadataValue<Ascii>>,
    pub(super) tokens: Arc<Vec<String>>,
    /// Server RSS before and after seeding through the API.
    pub(super) seed_rss: Option<(u64, u64)>,
}

impl Env {
    pub(super) fn caller(
        &self,
        channel: Channel,
        raw: Option<RawChannel>,
        workload: Workload,
        tokens: &Tokens,
        counter: Arc<AtomicU64>,
    ) -> Caller {
        Caller {
            raw,
            workload,
            health: HealthClient::new(channel.clone()),
            sessions: SessionServiceClient::new(channel.clone()),
            security: SecurityServiceClient::new(channel.clone()),
            upstream: TokenServiceClient::new(channel.clone()),
            ext_authz: AuthorizationClient::new(channel),
            auth: self.auth.clone(),
            proxy_auth: self.proxy_auth.clone(),
            tokens: self.tokens.clone(),
            pick: tokens.pick,
            zipf: rand_distr::Zipf::new(self.tokens.len().max(1) as f64, tokens.zipf_exponent).ok(),
            invalid_share: tokens.invalid_share,
            counter,
        }
    }

    /// Runs one workload with `shape`, closed loop or open loop at `rate`.
    pub(super) async fn run(
        &self,
        workload: Workload,
        shape: &Shape,
        tokens: &Tokens,
        rate: Option<f64>,
    ) -> anyhow::Result<Outcome> {
        let (channels, raw) = match shape.driver {
            Driver::Tonic => (connect(&self.target.target, shape.connections).await?, vec![None; shape.connections]),
            Driver::H2 => {
                // The tonic clients are built but never called, so never connect.
                let lazy = Endpoint::from_shared(self.target.target.clone())?.connect_lazy();
                let raw = raw::connect(&self.target.target, shape.connections).await?;
                (vec![lazy; shape.connections], raw.into_iter().map(Some).collect())
            }
        };
        clock_ticks_per_second(); // asked now, not inside the measured window
        let recorder = Recorder::new();
        let counter = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let measure_from = start + shape.warmup;
        let end = measure_from + shape.duration;
        let mut cpu_start = None;
        let mut tasks = Vec::new();
        match rate {
            None => {
                for (channel, raw) in channels.iter().zip(&raw) {
                    for _ in 0..shape.in_flight {
                        let mut caller = self.caller(channel.clone(), raw.clone(), workload, tokens, counter.clone());
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
                // Its `in_flight` workers take the schedule's slots in turn: a free worker claims the
                // next slot, waits for its time and sends; when every worker is busy the next slot
                // waits for one to finish, and its latency still counts from the slot's time (no
                // coordinated omission). No task, timer or lock per request beyond the wait itself,
                // so the client stays cheaper than the server at the offered rate.
                let per_connection = rate / shape.connections as f64;
                let interval = Duration::from_secs_f64(1.0 / per_connection);
                for (index, (channel, raw)) in channels.iter().zip(&raw).enumerate() {
                    let first = start + interval.mul_f64(index as f64 / shape.connections as f64);
                    let slots = Arc::new(AtomicU64::new(0));
                    for _ in 0..shape.in_flight {
                        let mut caller = self.caller(channel.clone(), raw.clone(), workload, tokens, counter.clone());
                        let recorder = recorder.clone();
                        let slots = slots.clone();
                        tasks.push(tokio::spawn(async move {
                            let mut local = Local::new();
                            loop {
                                let slot = slots.fetch_add(1, Ordering::Relaxed);
                                let intended = first + interval.mul_f64(slot as f64);
                                if intended >= end {
                                    break;
                                }
                                if intended > Instant::now() {
                                    tokio::time::sleep_until(intended.into()).await;
                                }
                                let result = caller.call().await;
                                if intended >= measure_from {
                                    local.record(intended.elapsed(), result);
                                }
                            }
                            local.merge_into(&recorder).await;
                        }));
                    }
                }
            }
        }
        tokio::time::sleep_until(measure_from.into()).await;
        if let Some(pid) = self.target.server_pid {
            cpu_start = cpu_seconds(pid);
        }
        let client_start = cpu_seconds(std::process::id());
        tokio::time::sleep_until(end.into()).await;
        let cpu_end = self.target.server_pid.and_then(cpu_seconds);
        let client_end = cpu_seconds(std::process::id());
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
            client_cpu_seconds: client_start.zip(client_end).map(|(a, b)| b - a),
            driver: shape.driver,
        })
    }
}

/// Creates `count` sessions (one user each) through CreateSession and returns their tokens.
pub(super) async fn seed(
    target: &Target,
    auth: &Option<MetadataValue<Ascii>>,
    count: usize,
) -> anyhow::Result<Vec<String>> {
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

pub(super) async fn env(target: &Target, tokens: &Tokens, need_tokens: bool) -> anyhow::Result<Env> {
    let auth = match &target.key {
        Some(key) => Some(format!("Bearer {key}").parse().context("the API key is not a valid header value")?),
        None => None,
    };
    let proxy_auth = match &target.proxy_key {
        Some(key) => Some(format!("Bearer {key}").parse().context("the proxy key is not a valid header value")?),
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
    Ok(Env { target: target.clone(), auth, proxy_auth, tokens: Arc::new(list), seed_rss })
}

/// The environment of a reference server at `target`: no keys, the same tokens.
pub(super) fn env_for(target: &Target, like: &Env) -> Env {
    Env { target: target.clone(), auth: None, proxy_auth: None, tokens: like.tokens.clone(), seed_rss: None }
}
