//! RevocationService as served: the generated server for every method but WatchRevocations,
//! whose live events go out as bytes encoded once per event and shared by every stream of the
//! replica ([`SharedEvent::encoded`]), instead of one conversion and one protobuf encoding per
//! watcher. The wire form is the same message either way; only who encodes it changes.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut as _, Bytes};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use prost::Message as _;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstDecoder;
use tower::Service;

use super::{RevocationAdapter, watch_response};
use crate::grpc::pb;
use crate::grpc::pb::revocation_service_server::RevocationServiceServer;
use crate::revocation::{SharedEvent, WatchItem};

const WATCH_PATH: &str = "/atoms.session.v1.RevocationService/WatchRevocations";

/// The RevocationService the server mounts (see the module comment).
#[derive(Clone)]
pub struct RevocationServer {
    generated: RevocationServiceServer<RevocationAdapter>,
    adapter: Arc<RevocationAdapter>,
    max_decoding: Option<usize>,
    max_encoding: Option<usize>,
}

impl RevocationServer {
    /// The service over `adapter`.
    pub fn new(adapter: RevocationAdapter) -> RevocationServer {
        let adapter = Arc::new(adapter);
        RevocationServer {
            generated: RevocationServiceServer::from_arc(adapter.clone()),
            adapter,
            max_decoding: None,
            max_encoding: None,
        }
    }

    /// The largest request accepted, as on a generated server.
    pub fn max_decoding_message_size(mut self, limit: usize) -> RevocationServer {
        self.generated = self.generated.max_decoding_message_size(limit);
        self.max_decoding = Some(limit);
        self
    }

    /// The largest response sent, as on a generated server.
    pub fn max_encoding_message_size(mut self, limit: usize) -> RevocationServer {
        self.generated = self.generated.max_encoding_message_size(limit);
        self.max_encoding = Some(limit);
        self
    }
}

impl NamedService for RevocationServer {
    const NAME: &'static str = <RevocationServiceServer<RevocationAdapter> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for RevocationServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return Box::pin(self.generated.call(request));
        }
        let watch = Watch(self.adapter.clone());
        let mut grpc = Grpc::new(WatchCodec).apply_max_message_size_config(self.max_decoding, self.max_encoding);
        Box::pin(async move { Ok(grpc.server_streaming(watch, request).await) })
    }
}

/// WatchRevocations answering with encoded messages.
struct Watch(Arc<RevocationAdapter>);

impl ServerStreamingService<pb::WatchRevocationsRequest> for Watch {
    type Response = Bytes;
    type ResponseStream = BoxStream<'static, Result<Bytes, Status>>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<pb::WatchRevocationsRequest>) -> Self::Future {
        let adapter = self.0.clone();
        Box::pin(async move {
            let items = adapter.watch_items(request.into_inner()).await?;
            Ok(Response::new(items.map(|item| Ok(encoded(&item?))).boxed()))
        })
    }
}

/// A watch message's encoding; a live event's is made once and shared.
fn encoded(item: &WatchItem) -> Bytes {
    let encode = || Bytes::from(watch_response(item).encode_to_vec());
    match item {
        WatchItem::Event(cursor, shared) => SharedEvent::encoded(shared, cursor, encode),
        WatchItem::Heartbeat(..) => encode(),
    }
}

/// Decodes the request with prost; sends messages already encoded.
struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = Bytes;
    type Decode = pb::WatchRevocationsRequest;
    type Encoder = Encoded;
    type Decoder = ProstDecoder<pb::WatchRevocationsRequest>;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Copies an encoded message into the frame.
struct Encoded;

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::Cursor;

    #[test]
    fn the_shared_encoding_is_the_generated_servers_message() {
        let heartbeat = WatchItem::Heartbeat(Cursor { log_id: "0123456789abcdef".into(), seq: 4 }, 1_700_000_000_123);
        let decoded = pb::WatchRevocationsResponse::decode(encoded(&heartbeat)).unwrap();
        assert_eq!(decoded, watch_response(&heartbeat));

        let cursor = Cursor { log_id: "0123456789abcdef".into(), seq: 9 };
        let shared = SharedEvent::new(crate::revocation::RevocationEvent {
            seq: 9,
            session_id: "session-9".into(),
            user_id: "user-9".into(),
            kind: crate::revocation::RevocationKind::Hijack,
            reason: "risk 0.9".into(),
            revoked_by: Some("admin".into()),
            revoked_at: 1_700_000_000_000,
            expires_at: 1_700_000_600_000,
        });
        let event = WatchItem::Event(cursor, shared);
        let (first, second) = (encoded(&event), encoded(&event));
        assert_eq!(first.as_ptr(), second.as_ptr(), "the second stream sends the first one's bytes");
        assert_eq!(pb::WatchRevocationsResponse::decode(first).unwrap(), watch_response(&event));
    }
}
