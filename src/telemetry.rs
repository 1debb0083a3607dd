//! Logs, traces and metrics: the process-wide `tracing` subscriber, human-readable or JSON on stderr, and
//! an OpenTelemetry OTLP/gRPC span exporter when an endpoint is configured through the standard
//! `OTEL_*` environment variables; and the per-call span, whose parent is the caller's W3C trace
//! context (`traceparent` in the gRPC metadata) so that a caller's trace continues through the
//! authority. The Prometheus exporter is [`prometheus`].
//!
//! The exporter is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! is set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The exporter itself
//! reads the other standard variables (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`,
//! `..._COMPRESSION`), the SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and the batch settings `OTEL_BSP_*`. Only the `grpc` protocol is built in.
//!
//! Spans are exported from the SDK's batch thread, which has no Tokio runtime, while the tonic
//! exporter needs one; `OnRuntime` runs each export on the server's runtime instead.
//! [`Telemetry::shutdown`] flushes what is buffered and must be called once the server stopped.

pub mod prometheus;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;
use crate::error::ConfigError;

/// The service name reported when neither `OTEL_SERVICE_NAME` nor a `service.name` resource
/// attribute is set.
pub const DEFAULT_SERVICE_NAME: &str = "session-authority";

/// What [`init`] installed; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter. Call it outside the async
    /// runtime's tasks but while the runtime still exists (the exports run on it).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("session-authority: exporting the last spans failed: {e}");
        }
    }
}

/// Whether the OTLP exporter is configured, by the standard variables read through `lookup`.
pub fn otlp_configured(lookup: &dyn Fn(&str) -> Option<String>) -> Result<bool, ConfigError> {
    let set = |name: &str| lookup(name).is_some_and(|v| !v.trim().is_empty());
    if lookup("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    if let Some(exporter) = lookup("OTEL_TRACES_EXPORTER") {
        match exporter.trim() {
            "none" => return Ok(false),
            "" | "otlp" => {}
            other => {
                return Err(ConfigError(format!(
                    "setting `OTEL_TRACES_EXPORTER`: {other:?} is not supported; use otlp or none"
                )));
            }
        }
    }
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(false);
    }
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(protocol) = lookup(name)
            && !matches!(protocol.trim(), "" | "grpc")
        {
            return Err(ConfigError(format!(
                "setting `{name}`: {protocol:?} is not supported; this build exports OTLP over grpc"
            )));
        }
    }
    Ok(true)
}

/// Whether [`init`] installed the OTLP exporter (see [`grpc_span`]).
static TRACES_EXPORTED: AtomicBool = AtomicBool::new(false);

/// Whether [`init`] installed the OTLP exporter: spans made only for traces (the storage spans,
/// the OpenTelemetry attributes of [`grpc_span`]) are skipped without one.
pub(crate) fn traces_exported() -> bool {
    TRACES_EXPORTED.load(Ordering::Relaxed)
}

/// Installs the global subscriber: the log format on stderr (filtered by `RUST_LOG`, default
/// `info`) and, when configured, the OTLP exporter. Call it inside the Tokio runtime that will
/// run the server.
pub fn init(format: LogFormat, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Telemetry, ConfigError> {
    let provider = if otlp_configured(lookup)? { Some(provider(lookup)?) } else { None };
    TRACES_EXPORTED.store(provider.is_some(), Ordering::Relaxed);
    let filter = lookup("RUST_LOG")
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    };
    // Storage spans are for traces only: log lines carry the call's span, and formatting a
    // storage span's fields for the log on every storage call was a measurable share of a
    // validation's CPU.
    let fmt = fmt.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target() == crate::store::instrumented::SPAN_TARGET)
    }));
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(env!("CARGO_PKG_NAME"))));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| ConfigError(format!("installing the log subscriber: {e}")))?;
    Ok(Telemetry { provider })
}

fn provider(lookup: &dyn Fn(&str) -> Option<String>) -> Result<SdkTracerProvider, ConfigError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| ConfigError("the OTLP exporter must be set up inside the server's runtime".into()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| ConfigError(format!("setting `OTEL_EXPORTER_OTLP_ENDPOINT`: {e}")))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    let named = lookup("OTEL_SERVICE_NAME").is_some_and(|v| !v.trim().is_empty())
        || lookup("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| v.contains("service.name="));
    if !named {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime { inner: Arc::new(exporter), runtime })
        .with_resource(resource.build())
        .build())
}

/// A span exporter that runs each export of `inner` on a Tokio runtime, so that the SDK's batch
/// thread (which has none) can drive the tonic exporter.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self.runtime.spawn(async move { inner.export(batch).await }).await {
            Ok(result) => result,
            Err(e) => Err(OTelSdkError::InternalFailure(format!("span export task failed: {e}"))),
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called while the provider is built, before the exporter is shared.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Reads W3C trace context from request headers (gRPC metadata are HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one gRPC call: named after the method, a server span in OpenTelemetry terms, and
/// the child of the caller's span when the request carries a valid `traceparent`. The method
/// path is the only request data on it.
///
/// Without an OTLP exporter the span carries the method alone: the OpenTelemetry names
/// (`otel.*`, `rpc.*`) would only repeat it on every log line, and the log layer formats a
/// span's fields when the span is made, on every call, whether or not anything is logged.
/// The exporter, and so the attributes and the caller's parent, are those [`init`] installed: a
/// program embedding [`crate::app`] with an OpenTelemetry layer of its own gets the method alone.
pub fn grpc_span<B>(request: &http::Request<B>) -> tracing::Span {
    let path = request.uri().path();
    if !traces_exported() {
        return tracing::info_span!("grpc", method = %path);
    }
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
    let span = tracing::info_span!(
        "grpc",
        method = %path,
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    if request.headers().contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        if parent.span().span_context().is_valid() {
            // Fails only when no OpenTelemetry layer is installed; there is nothing to continue then.
            let _ = span.set_parent(parent);
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_exporter_is_on_only_with_an_endpoint_and_not_disabled() {
        assert!(!otlp_configured(&lookup(&[])).unwrap());
        assert!(!otlp_configured(&lookup(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap());
        assert!(otlp_configured(&lookup(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")])).unwrap());
        assert!(otlp_configured(&lookup(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")])).unwrap());
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
        assert!(!otlp_configured(&lookup(&[endpoint, ("OTEL_SDK_DISABLED", "true")])).unwrap());
        assert!(!otlp_configured(&lookup(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")])).unwrap());
        assert!(otlp_configured(&lookup(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).unwrap());
    }

    #[test]
    fn unsupported_choices_are_errors_that_name_the_setting() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let e = otlp_configured(&lookup(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")])).unwrap_err();
        assert!(e.0.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{e}");
        let e = otlp_configured(&lookup(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")])).unwrap_err();
        assert!(e.0.contains("OTEL_TRACES_EXPORTER"), "{e}");
    }
}
