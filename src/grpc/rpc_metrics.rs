//! The tower layer that counts every RPC by method and status code (`grpc_server_handled_total`)
//! and times it (`grpc_server_handling_seconds`), outermost, so refused calls count too.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::Frame;
use tonic::body::Body;
use tower::Service;

use crate::grpc::layers::{FrameHook, Hooked, Intercept, intercepting_layer};
use crate::metrics::{RPC_HANDLED, RPC_SECONDS};

/// The `grpc_service` and `grpc_method` labels of a call to `path`: the method's own when the
/// server serves it, `unknown` for both otherwise, so that a caller inventing paths (no key is
/// needed to reach the public prefixes) adds no series.
fn call_labels(path: &str) -> (&'static str, &'static str) {
    super::auth::method(path)
        .and_then(|(known, _)| known.trim_start_matches('/').split_once('/'))
        .unwrap_or(("unknown", "unknown"))
}

/// Counts every RPC once it has finished, with the status code it ended with. It is the
/// outermost layer, so calls refused by authentication, by load shedding or as unknown methods
/// are counted too.
#[derive(Clone, Debug, Default)]
pub struct RpcMetricsLayer;

intercepting_layer!(RpcMetricsLayer);

/// The labels of one call, shared by the response body that reports its end. Both come from
/// the role table's own copy of the path, so they are one of its entries or `unknown`.
struct CallLabels {
    service: &'static str,
    method: &'static str,
    started: Instant,
}

impl CallLabels {
    fn record(&self, code: &'static str) {
        metrics::counter!(RPC_HANDLED, "grpc_service" => self.service, "grpc_method" => self.method, "grpc_code" => code)
            .increment(1);
        metrics::histogram!(RPC_SECONDS, "grpc_service" => self.service, "grpc_method" => self.method)
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

impl Intercept for RpcMetricsLayer {
    fn call<S>(&self, inner: &mut S, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Future: Send + 'static,
    {
        let (service, method) = call_labels(request.uri().path());
        let labels = Arc::new(CallLabels { service, method, started: Instant::now() });
        let future = inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // A trailers-only response (every error, and any empty stream) carries the status in
            // its headers; otherwise the status arrives in the body's trailers.
            if let Some(status) = response.headers().get("grpc-status") {
                labels.record(code_name(status));
                return Ok(response);
            }
            Ok(response.map(|body| Hooked::wrap(body, Observed { labels: Some(labels) })))
        })
    }
}

/// Records the call when its trailers (or its end, or an error) pass through, or as
/// `Canceled` when the body is dropped first.
struct Observed {
    labels: Option<Arc<CallLabels>>,
}

impl FrameHook for Observed {
    fn after(&mut self, polled: &Option<Result<Frame<bytes::Bytes>, tonic::Status>>) {
        let code = match polled {
            Some(Ok(frame)) => match frame.trailers_ref() {
                Some(trailers) => trailers.get("grpc-status").map_or("Unknown", code_name),
                None => return,
            },
            Some(Err(status)) => code_name(&http::HeaderValue::from(status.code() as i32)),
            None => "Unknown",
        };
        if let Some(labels) = self.labels.take() {
            labels.record(code);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // The client went away before the call finished.
        if let Some(labels) = self.labels.take() {
            labels.record("Canceled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_labels_are_a_served_method_or_unknown() {
        assert_eq!(
            call_labels("/atoms.session.v1.SessionService/ValidateSession"),
            ("atoms.session.v1.SessionService", "ValidateSession")
        );
        assert_eq!(call_labels("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health", "Check"));
        for made_up in
            ["", "/", "/grpc.health.v1.Health/MadeUp", "/grpc.reflection.x/Y", "/a/b/c", "/x.Y/ValidateSession"]
        {
            assert_eq!(call_labels(made_up), ("unknown", "unknown"), "{made_up:?}");
        }
    }
}
