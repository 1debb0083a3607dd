//! The cheap driver: unary gRPC calls written straight onto HTTP/2 with the `h2` crate (what
//! h2load does), without tonic's client stack (its buffer task, its encoder and decoder and the
//! tower services per call). Each call frames one protobuf message, sends it with the gRPC
//! headers, reads the answer's body and takes the status from the trailers, or from the
//! headers of a trailers-only answer. It lets the server saturate before the load generator
//! does; `client_cpu_us_per_request` in every run says whether it did.

use bytes::{BufMut as _, Bytes, BytesMut};
use h2::client::SendRequest;
use http::HeaderValue;
use prost::Message;

/// One HTTP/2 connection, cloned by every slot that sends on it.
#[derive(Clone)]
pub(super) struct RawChannel {
    send: SendRequest<Bytes>,
    /// `scheme://authority`, the prefix of every request's URI.
    base: String,
}

/// Opens `n` connections to `target` (`http://host:port`; plaintext only).
pub(super) async fn connect(target: &str, n: usize) -> anyhow::Result<Vec<RawChannel>> {
    let uri: http::Uri = target.parse()?;
    anyhow::ensure!(uri.scheme_str() == Some("http"), "the h2 driver speaks plaintext HTTP/2 only; use --driver tonic");
    let authority = uri.authority().ok_or_else(|| anyhow::anyhow!("{target} has no host:port"))?.to_string();
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(&authority).await?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        channels.push(RawChannel { send, base: format!("http://{authority}") });
    }
    Ok(channels)
}

/// `message` as one gRPC length-prefixed frame (uncompressed).
pub(super) fn frame(message: &impl Message) -> Bytes {
    let mut body = BytesMut::with_capacity(5 + message.encoded_len());
    body.put_u8(0);
    body.put_u32(message.encoded_len() as u32);
    message.encode_raw(&mut body);
    body.freeze()
}

/// A call's failure as the gRPC code a client would see.
fn transport(_: h2::Error) -> tonic::Code {
    tonic::Code::Unavailable
}

fn status_code(value: Option<&HeaderValue>) -> tonic::Code {
    let code = value.and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<i32>().ok()).unwrap_or(2);
    tonic::Code::from(code)
}

impl RawChannel {
    /// Calls `path` with a [`frame`]d message; the answer's message bytes on OK, its code otherwise.
    pub(super) async fn unary(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
        body: Bytes,
    ) -> Result<Bytes, tonic::Code> {
        let mut request = http::Request::post(format!("{}{path}", self.base))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let request = request.body(()).map_err(|_| tonic::Code::Internal)?;
        let mut send = self.send.clone().ready().await.map_err(transport)?;
        let (response, mut stream) = send.send_request(request, false).map_err(transport)?;
        // A server may answer before it has read the request (a trailers-only error such as
        // UNIMPLEMENTED or UNAUTHENTICATED) and reset the stream with NO_ERROR; the body then
        // finds the stream closed. That is not the call's failure: the answer already came, so
        // the call's outcome is the response's (which fails too when the body was lost for any
        // other reason).
        let _ = stream.send_data(body, true);
        let response = response.await.map_err(transport)?;
        if response.status() != http::StatusCode::OK {
            // What a gRPC client makes of an HTTP error without a gRPC status.
            return Err(match response.status().as_u16() {
                400 => tonic::Code::Internal,
                401 => tonic::Code::Unauthenticated,
                403 => tonic::Code::PermissionDenied,
                404 => tonic::Code::Unimplemented,
                429 | 502..=504 => tonic::Code::Unavailable,
                _ => tonic::Code::Unknown,
            });
        }
        if let Some(status) = response.headers().get("grpc-status") {
            // Trailers-only: an error (or an empty OK, which no unary method answers).
            return match status_code(Some(status)) {
                tonic::Code::Ok => Ok(Bytes::new()),
                code => Err(code),
            };
        }
        let mut body = response.into_body();
        let mut answer = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(transport)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            answer.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(transport)?;
        match status_code(trailers.as_ref().and_then(|t| t.get("grpc-status"))) {
            tonic::Code::Ok if answer.len() >= 5 => Ok(answer.freeze().slice(5..)),
            tonic::Code::Ok => Err(tonic::Code::Internal),
            code => Err(code),
        }
    }
}
