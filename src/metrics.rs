//! Prometheus metrics: the exporter on its own HTTP port (`metrics_listen`, off by default) and
//! the tower layer that counts every RPC by method and status code.
//!
//! Domain code records through the `metrics` facade (`metrics::counter!`), which is a no-op
//! until an exporter is installed, so modules never depend on the exporter. Labels are bounded:
//! service, method and code only, never a user or session id.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::Frame;
use metrics_exporter_prometheus::PrometheusBuilder;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::config::ConfigError;

/// RPCs handled, by `grpc_service`, `grpc_method` and `grpc_code`.
pub const RPC_HANDLED: &str = "grpc_server_handled_total";
/// RPC latency to the end of the response, by `grpc_service` and `grpc_method`.
pub const RPC_SECONDS: &str = "grpc_server_handling_seconds";

/// Upstream OAuth2 call latency (one HTTP request), by `operation` (refresh, introspection,
/// revocation, discovery) and `outcome` (ok, error).
pub const TOKEN_UPSTREAM_SECONDS: &str = "token_upstream_seconds";

/// The guide's counters, pre-registered at zero so dashboards and alerts see them at once.
pub const GUIDE_COUNTERS: [(&str, &str); 5] = [
    ("session_created_total", "Sessions created"),
    ("session_expired_total", "Sessions found past their idle or absolute timeout"),
    ("token_refreshed_total", "Upstream token refreshes that succeeded"),
    ("token_refresh_failed_total", "Upstream token refreshes that failed"),
    ("session_hijack_detected_total", "Sessions ended by hijack detection"),
];

const LATENCY_BUCKETS: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Starts the `/metrics` listener on `addr` and installs the process-wide recorder.
pub fn install(addr: SocketAddr) -> Result<(), ConfigError> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS)
        .and_then(|b| b.build())
        .map_err(|e| ConfigError(format!("setting `metrics_listen`: cannot serve metrics on {addr}: {e}")))?;
    metrics::set_global_recorder(recorder)
        .map_err(|_| ConfigError("setting `metrics_listen`: a metrics recorder is already installed".into()))?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics listener stopped");
        }
    });
    metrics::describe_counter!(RPC_HANDLED, "RPCs completed, by service, method and gRPC status code");
    metrics::describe_histogram!(RPC_SECONDS, metrics::Unit::Seconds, "RPC handling time to the end of the response");
    metrics::describe_histogram!(
        TOKEN_UPSTREAM_SECONDS,
        metrics::Unit::Seconds,
        "Upstream OAuth2 request latency, by operation and outcome"
    );
    metrics::describe_counter!(
        "token_refresh_failed_total",
        "Upstream token refreshes that failed, by cause (timeout, network, server_error, rate_limited, invalid_grant, rejected, malformed, not_configured, superseded)"
    );
    for (name, help) in GUIDE_COUNTERS {
        metrics::describe_counter!(name, help);
        metrics::counter!(name).absolute(0);
    }
    Ok(())
}

/// Counts every RPC once it has finished, with the status code it ended with.
#[derive(Clone, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] produces.
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

/// The labels of one call, shared by the response body that reports its end.
struct CallLabels {
    service: String,
    method: String,
    started: Instant,
}

impl CallLabels {
    fn record(&self, code: &str) {
        metrics::counter!(RPC_HANDLED, "grpc_service" => self.service.clone(), "grpc_method" => self.method.clone(), "grpc_code" => code.to_owned())
            .increment(1);
        metrics::histogram!(RPC_SECONDS, "grpc_service" => self.service.clone(), "grpc_method" => self.method.clone())
            .record(self.started.elapsed().as_secs_f64());
    }
}

fn code_name(status: &http::HeaderValue) -> &'static str {
    let code = status.to_str().ok().and_then(|s| s.parse::<i32>().ok()).unwrap_or(2);
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Canceled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

impl<S> Service<Request<Body>> for RpcMetrics<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("unknown", "unknown"));
        let labels =
            Arc::new(CallLabels { service: service.to_owned(), method: method.to_owned(), started: Instant::now() });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // A trailers-only response (every error, and any empty stream) carries the status in
            // its headers; otherwise the status arrives in the body's trailers.
            if let Some(status) = response.headers().get("grpc-status") {
                labels.record(code_name(status));
                return Ok(response);
            }
            Ok(response.map(|body| Body::new(ObservedBody { inner: body, labels: Some(labels) })))
        })
    }
}

/// A response body that records the call when its trailers (or its end) pass through.
struct ObservedBody {
    inner: Body,
    labels: Option<Arc<CallLabels>>,
}

impl http_body::Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(labels) = self.labels.take()
                {
                    labels.record(trailers.get("grpc-status").map_or("Unknown", code_name));
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(labels) = self.labels.take() {
                    labels.record(code_name(&http::HeaderValue::from(status.code() as i32)));
                }
            }
            Poll::Ready(None) => {
                if let Some(labels) = self.labels.take() {
                    labels.record("Unknown");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // The client went away before the call finished.
        if let Some(labels) = self.labels.take() {
            labels.record("Canceled");
        }
    }
}
