//! Recording outcomes: per-call latency histograms and counts, merged from per-task locals.

use super::*;

/// Figures of one measured run.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) workload: Workload,
    pub(super) mode: String,
    pub(super) latency_us: Histogram<u64>,
    pub(super) ok: u64,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) elapsed: Duration,
    pub(super) offered_rate: Option<f64>,
    pub(super) server_cpu_seconds: Option<f64>,
    /// The load generator's own CPU time over the same window.
    pub(super) client_cpu_seconds: Option<f64>,
    pub(super) driver: Driver,
}

impl Outcome {
    pub(super) fn completed(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    pub(super) fn throughput(&self) -> f64 {
        self.completed() as f64 / self.elapsed.as_secs_f64()
    }

    pub(super) fn to_json(&self) -> Value {
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
            "server_cpu_us_per_request": self.per_request_us(self.server_cpu_seconds),
            "client_cpu_us_per_request": self.per_request_us(self.client_cpu_seconds),
            "client_over_server_cpu": self.client_over_server_cpu(),
            "driver": format!("{:?}", self.driver).to_lowercase(),
        })
    }

    fn per_request_us(&self, seconds: Option<f64>) -> Option<f64> {
        seconds.map(|s| s * 1e6 / self.completed().max(1) as f64)
    }

    /// The client's CPU over the server's in the measured window: below 1, the server
    /// saturated first and the ratios measure it, not the client.
    pub(super) fn client_over_server_cpu(&self) -> Option<f64> {
        let (client, server) = self.client_cpu_seconds.zip(self.server_cpu_seconds)?;
        (server > 0.0).then(|| (client / server * 1000.0).round() / 1000.0)
    }

    pub(super) fn line(&self) -> String {
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
            self.per_request_us(self.server_cpu_seconds).map(|us| format!("  cpu {us:.1}us/req")).unwrap_or_default()
                + &self
                    .per_request_us(self.client_cpu_seconds)
                    .map(|us| format!("  client {us:.1}us/req"))
                    .unwrap_or_default()
        )
    }
}

/// Shared state of one run.
pub(super) struct Recorder {
    pub(super) latency_us: Mutex<Histogram<u64>>,
    pub(super) ok: AtomicU64,
    pub(super) errors: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Recorder {
    pub(super) fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")),
            ok: AtomicU64::new(0),
            errors: std::sync::Mutex::new(BTreeMap::new()),
        })
    }
}

/// One worker's local histogram, merged at the end to keep the hot loop lock-free.
pub(super) struct Local {
    pub(super) hist: Histogram<u64>,
    pub(super) ok: u64,
    pub(super) errors: BTreeMap<String, u64>,
}

impl Local {
    pub(super) fn new() -> Local {
        Local {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    pub(super) fn record(&mut self, latency: Duration, result: Result<(), tonic::Code>) {
        let _ = self.hist.record((latency.as_micros() as u64).max(1));
        match result {
            Ok(()) => self.ok += 1,
            Err(code) => *self.errors.entry(format!("{code:?}")).or_default() += 1,
        }
    }

    pub(super) async fn merge_into(self, recorder: &Recorder) {
        let _ = recorder.latency_us.lock().await.add(&self.hist);
        recorder.ok.fetch_add(self.ok, Ordering::Relaxed);
        let mut errors = recorder.errors.lock().unwrap_or_else(|p| p.into_inner());
        for (code, n) in self.errors {
            *errors.entry(code).or_default() += n;
        }
    }
}
