//! Tower layers around every call: a global concurrency limit that sheds load at once, a
//! ceiling on open health Watch streams (which need no key and are never shed), and a body
//! wrapper that ends open server streams cleanly when the server shuts down.
//!
//! Tonic's own layers supply the rest: the request timeout (`Server::timeout`, which also
//! honours the client's `grpc-timeout`) and the tracing span per call (`Server::trace_fn`). The
//! authentication layer is in `auth.rs`.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tower::Service;

use crate::error::Error;

/// What one of our layers does with a call: answer it itself, or hand it (perhaps with more in
/// its extensions) to the service it wraps and perhaps wrap the answer. Every layer here, and
/// the authentication and metrics layers, is an `Intercept` over the same [`Intercepted`]
/// service, so the tower plumbing is written once.
pub trait Intercept: Clone + Send + Sync + 'static {
    /// Handles one call; `inner` is ready (its `poll_ready` said so).
    fn call<S>(&self, inner: &mut S, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Future: Send + 'static;
}

/// The service an [`Intercept`] layer produces: the layer's policy around `inner`.
#[derive(Clone, Debug)]
pub struct Intercepted<P, S> {
    policy: P,
    inner: S,
}

impl<P, S> Intercepted<P, S> {
    /// `policy` around `inner`.
    pub fn new(policy: P, inner: S) -> Self {
        Intercepted { policy, inner }
    }
}

impl<P, S> Service<Request<Body>> for Intercepted<P, S>
where
    P: Intercept,
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
        self.policy.call(&mut self.inner, request)
    }
}

/// Makes an [`Intercept`] type a tower `Layer` producing [`Intercepted`] (a blanket impl is not
/// allowed for a foreign trait).
macro_rules! intercepting_layer {
    ($policy:ty) => {
        impl<S> tower::Layer<S> for $policy {
            type Service = $crate::grpc::layers::Intercepted<$policy, S>;
            fn layer(&self, inner: S) -> Self::Service {
                $crate::grpc::layers::Intercepted::new(self.clone(), inner)
            }
        }
    };
}
pub(crate) use intercepting_layer;

/// Limits calls in flight across all connections. A call over the limit is answered
/// RESOURCE_EXHAUSTED immediately instead of queueing without bound. The permit lives in the
/// call's response future: it is given back when the response (or its headers, for a stream)
/// is ready, or when the future is dropped because the client cancelled or its deadline
/// passed. A server stream therefore holds its permit only until its response starts, so open
/// watch streams do not starve unary calls; their own ceiling is `revocation.max_watchers`.
///
/// Health is never shed: it answers from memory, and a probe refused under load would get a
/// busy replica restarted or taken out of rotation, moving its load onto the others. Its Watch
/// streams have a ceiling of their own, [`PublicStreamCapLayer`].
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    permits: Slots,
}

impl LoadShedLayer {
    /// At most `limit` calls in flight (capped at what a semaphore can count).
    pub fn new(limit: usize) -> LoadShedLayer {
        LoadShedLayer { permits: Slots::new(limit) }
    }
}

/// A fixed number of places, taken without waiting.
#[derive(Clone, Debug)]
struct Slots {
    semaphore: Arc<Semaphore>,
    limit: usize,
}

impl Slots {
    fn new(limit: usize) -> Slots {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Slots { semaphore: Arc::new(Semaphore::new(limit)), limit }
    }

    /// A place, held until it is dropped; `None` when all `limit` are taken.
    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.semaphore.clone().try_acquire_owned().ok()
    }
}

intercepting_layer!(LoadShedLayer);

/// Calls that never wait for a permit: health checks.
fn never_shed(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

impl Intercept for LoadShedLayer {
    fn call<S>(&self, inner: &mut S, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Future: Send + 'static,
    {
        if never_shed(request.uri().path()) {
            return Box::pin(inner.call(request));
        }
        match self.permits.take() {
            Some(permit) => {
                let future = inner.call(request);
                Box::pin(async move {
                    let response = future.await;
                    drop(permit);
                    response
                })
            }
            None => {
                let status = tonic::Status::from(Error::ResourceExhausted(format!(
                    "server overloaded: all {} call slots are in use (server.concurrency_limit); \
                     retry with backoff, or through another replica",
                    self.permits.limit
                )));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The health method whose response is a long-lived stream.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// The reflection methods (v1 and v1alpha): bidirectional streams a client may keep open.
const REFLECTION: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Caps the long-lived streams that need no key: `grpc.health.v1.Health/Watch`
/// (`server.max_health_watch_streams`) and reflection, both versions together
/// (`server.max_reflection_streams`). Health is never shed (see [`LoadShedLayer`]) and the
/// load-shed permit of a stream goes back once its response starts, so without this a caller
/// with no credentials could hold open as many streams as it likes. A stream over its cap is
/// answered RESOURCE_EXHAUSTED at once; a stream's place is held by its response body, so it
/// comes back when the stream ends, the client cancels, or shutdown ends it. Unary calls
/// (`Check`) are not limited.
#[derive(Clone, Debug)]
pub struct PublicStreamCapLayer {
    health_watch: Slots,
    reflection: Slots,
}

impl PublicStreamCapLayer {
    /// At most `health_watch` open Watch streams and `reflection` open reflection streams (each
    /// capped at what a semaphore can count).
    pub fn new(health_watch: usize, reflection: usize) -> PublicStreamCapLayer {
        PublicStreamCapLayer { health_watch: Slots::new(health_watch), reflection: Slots::new(reflection) }
    }
}

intercepting_layer!(PublicStreamCapLayer);

impl Intercept for PublicStreamCapLayer {
    fn call<S>(&self, inner: &mut S, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Future: Send + 'static,
    {
        let path = request.uri().path();
        let (places, refusal) = if path == HEALTH_WATCH {
            let advice = "poll grpc.health.v1.Health/Check instead, or retry with backoff";
            (&self.health_watch, ("health Watch streams (server.max_health_watch_streams)", advice))
        } else if REFLECTION.contains(&path) {
            let advice = "close the reflection streams your tools left open, or retry with backoff";
            (&self.reflection, ("reflection streams (server.max_reflection_streams)", advice))
        } else {
            return Box::pin(inner.call(request));
        };
        let Some(place) = places.take() else {
            let (what, advice) = refusal;
            let status = tonic::Status::from(Error::ResourceExhausted(format!(
                "this replica already serves its maximum of {} {what}; {advice}",
                places.limit
            )));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let future = inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // The place is held by the body (its closure owns the permit) until the body is dropped.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _held = &place;
                    frame
                }))
            }))
        })
    }
}

/// Methods whose responses are long-lived streams: the revocation feed, health Watch, and
/// reflection (a client may keep its stream open for a whole session).
fn is_server_stream(path: &str) -> bool {
    matches!(path, "/atoms.session.v1.RevocationService/WatchRevocations" | HEALTH_WATCH) || REFLECTION.contains(&path)
}

/// Ends open server streams with UNAVAILABLE ("server shutting down, reconnect") when the
/// shutdown token fires, so graceful shutdown does not wait forever on a watch stream.
#[derive(Clone, Debug)]
pub struct ShutdownStreamsLayer {
    shutdown: CancellationToken,
}

impl ShutdownStreamsLayer {
    /// Streams end when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> ShutdownStreamsLayer {
        ShutdownStreamsLayer { shutdown }
    }
}

intercepting_layer!(ShutdownStreamsLayer);

impl Intercept for ShutdownStreamsLayer {
    fn call<S>(&self, inner: &mut S, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Future: Send + 'static,
    {
        let streaming = is_server_stream(request.uri().path());
        let shutdown = self.shutdown.clone();
        // The request side of a stream ends too: a bidirectional call (reflection) whose client
        // keeps sending holds its HTTP/2 stream, and with it graceful shutdown, until it ends.
        let request = if streaming {
            request.map(|body| Hooked::wrap(body, EndOnShutdown::new(&shutdown, false)))
        } else {
            request
        };
        let future = inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            if !streaming {
                return Ok(response);
            }
            Ok(response.map(|body| Hooked::wrap(body, EndOnShutdown::new(&shutdown, true))))
        })
    }
}

/// What a [`Hooked`] body does around the frames of the body it wraps.
pub(crate) trait FrameHook: Send + Unpin + 'static {
    /// Runs before each poll of the inner body; a frame returned here ends the body.
    fn before(&mut self, _cx: &mut Context<'_>) -> Option<Frame<bytes::Bytes>> {
        None
    }
    /// Sees every frame (or end, or error) the inner body yields, before it is passed on.
    fn after(&mut self, _polled: &Option<Result<Frame<bytes::Bytes>, tonic::Status>>) {}
}

/// A response body that passes the inner body's frames through its hook and ends after
/// trailers, an error or the inner end. Both body wrappers (stream shutdown and the RPC
/// metrics) are hooks over it, so the `http_body::Body` plumbing is written once.
pub(crate) struct Hooked<H> {
    inner: Body,
    hook: H,
    ended: bool,
}

impl<H: FrameHook> Hooked<H> {
    /// `inner` with `hook` around its frames, boxed as tonic's body.
    pub(crate) fn wrap(inner: Body, hook: H) -> Body {
        Body::new(Hooked { inner, hook, ended: false })
    }
}

impl<H: FrameHook> http_body::Body for Hooked<H> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(last) = this.hook.before(cx) {
            this.ended = true;
            return Poll::Ready(Some(Ok(last)));
        }
        let polled = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        this.ended = !matches!(&polled, Some(Ok(frame)) if !frame.is_trailers());
        this.hook.after(&polled);
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// Ends a long-lived stream's body once shutdown begins, with a trailers frame: the response's
/// carries UNAVAILABLE ("reconnect and resume"); the request's is empty, which tonic's server
/// decoder reads as the client having finished sending.
struct EndOnShutdown {
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The response side (UNAVAILABLE), not the request side.
    response: bool,
}

impl EndOnShutdown {
    fn new(shutdown: &CancellationToken, response: bool) -> EndOnShutdown {
        EndOnShutdown { shutdown: Box::pin(shutdown.clone().cancelled_owned()), response }
    }
}

impl FrameHook for EndOnShutdown {
    fn before(&mut self, cx: &mut Context<'_>) -> Option<Frame<bytes::Bytes>> {
        if self.shutdown.as_mut().poll(cx).is_pending() {
            return None;
        }
        let mut trailers = http::HeaderMap::new();
        if self.response {
            let status = tonic::Status::unavailable("server shutting down; reconnect and resume from your last cursor");
            if let Err(e) = status.add_header(&mut trailers) {
                tracing::warn!(error = %e, "could not encode the shutdown status");
            }
        }
        Some(Frame::trailers(trailers))
    }
}
