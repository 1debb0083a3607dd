//! Revocation fan-out: K `WatchRevocations` streams over C connections, revocations issued at a
//! steady rate, and the delay from each revocation to its delivery on every stream and to the
//! last stream. The reference is a bare tokio broadcast behind the same proto, served from this
//! process, driven by the same client code: the difference is what the authority adds.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{Stream, StreamExt as _};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use session_authority::grpc::pb;
use session_authority::grpc::pb::revocation_service_client::RevocationServiceClient;
use session_authority::grpc::pb::revocation_service_server::{RevocationService, RevocationServiceServer};
use session_authority::grpc::pb::session_service_client::SessionServiceClient;
use tokio::sync::broadcast;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Response, Status};

/// What a fan-out run measured.
pub struct FanoutOutcome {
    /// Revocation to delivery on each stream, µs (client clock, from the RevokeSession send).
    pub per_subscriber_us: Histogram<u64>,
    /// Revocation to delivery on the last of the K streams, µs.
    pub to_last_us: Histogram<u64>,
    /// Server timestamp (`revoked_at`) to delivery on each stream, µs (millisecond resolution).
    pub from_server_stamp_us: Histogram<u64>,
    /// Events delivered over all streams.
    pub delivered: u64,
    /// Events expected (revocations × streams).
    pub expected: u64,
}

impl FanoutOutcome {
    pub fn to_json(&self, label: &str, watchers: usize, connections: usize) -> Value {
        let q = |h: &Histogram<u64>| json!({ "p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "max": h.max() });
        json!({
            "label": label,
            "watchers": watchers,
            "connections": connections,
            "delivered": self.delivered,
            "expected": self.expected,
            "per_subscriber_us": q(&self.per_subscriber_us),
            "to_last_subscriber_us": q(&self.to_last_us),
            "from_server_timestamp_us": q(&self.from_server_stamp_us),
        })
    }

    pub fn line(&self, label: &str) -> String {
        format!(
            "{label:<22} delivered {}/{}  per-subscriber p50 {}us p99 {}us  to-last p50 {}us p99 {}us max {}us",
            self.delivered,
            self.expected,
            self.per_subscriber_us.value_at_quantile(0.5),
            self.per_subscriber_us.value_at_quantile(0.99),
            self.to_last_us.value_at_quantile(0.5),
            self.to_last_us.value_at_quantile(0.99),
            self.to_last_us.max(),
        )
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn unix_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn authed<T>(auth: &Option<MetadataValue<Ascii>>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(auth) = auth {
        request.metadata_mut().insert("authorization", auth.clone());
    }
    request
}

/// Measures fan-out on `target`. Session ids to revoke are created first (unless the target is
/// the reference, which accepts any id).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    target: &str,
    auth: &Option<MetadataValue<Ascii>>,
    watchers: usize,
    connections: usize,
    revocations: usize,
    rate: f64,
    create_sessions: bool,
) -> anyhow::Result<FanoutOutcome> {
    let channels = crate::connect(target, connections.max(1)).await?;
    let ids: Vec<String> = if create_sessions {
        let mut client = SessionServiceClient::new(channels[0].clone());
        let mut ids = Vec::with_capacity(revocations);
        for n in 0..revocations {
            let request = authed(auth, crate::create_request(&format!("fanout-{}-{n}", std::process::id())));
            ids.push(
                client.create_session(request).await?.into_inner().session.map(|s| s.session_id).unwrap_or_default(),
            );
        }
        ids
    } else {
        (0..revocations).map(|n| format!("ref-{n}")).collect()
    };

    // When each revocation was sent (client clock), and per event how many streams have it.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let arrivals: Arc<Mutex<HashMap<String, (usize, Instant)>>> = Arc::new(Mutex::new(HashMap::new()));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers.max(1));
    let mut streams = Vec::new();
    for w in 0..watchers {
        let mut client = RevocationServiceClient::new(channels[w % channels.len()].clone());
        let request = authed(auth, pb::WatchRevocationsRequest::default());
        let mut stream = client.watch_revocations(request).await?.into_inner();
        let sent = sent.clone();
        let arrivals = arrivals.clone();
        let ready = ready_tx.clone();
        let expected = revocations;
        streams.push(tokio::spawn(async move {
            let mut per = histogram();
            let mut stamp = histogram();
            let mut received = 0usize;
            let mut announced = false;
            while received < expected {
                let message = match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
                    Ok(Ok(Some(message))) => message,
                    _ => break,
                };
                match message.message {
                    Some(pb::watch_revocations_response::Message::Heartbeat(_)) if !announced => {
                        announced = true;
                        let _ = ready.send(()).await;
                    }
                    Some(pb::watch_revocations_response::Message::Event(event)) => {
                        let now = Instant::now();
                        let at = sent.lock().unwrap_or_else(|p| p.into_inner()).get(&event.session_id).copied();
                        let Some(at) = at else { continue };
                        received += 1;
                        let _ = per.record((now - at).as_micros().max(1) as u64);
                        if let Some(ts) = &event.revoked_at {
                            let server_us = ts.seconds * 1_000_000 + i64::from(ts.nanos) / 1_000;
                            let _ = stamp.record((unix_micros() - server_us).max(1) as u64);
                        }
                        let mut arrivals = arrivals.lock().unwrap_or_else(|p| p.into_inner());
                        let entry = arrivals.entry(event.session_id).or_insert((0, now));
                        entry.0 += 1;
                        entry.1 = now;
                    }
                    _ => {}
                }
            }
            (per, stamp, received as u64)
        }));
    }
    drop(ready_tx);
    for _ in 0..watchers {
        if tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await.ok().flatten().is_none() {
            anyhow::bail!("a watch stream did not start (no opening heartbeat within 30 s)");
        }
    }

    let mut revoker = RevocationServiceClient::new(channels[0].clone());
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let start = Instant::now();
    for (n, id) in ids.iter().enumerate() {
        tokio::time::sleep_until((start + interval.mul_f64(n as f64)).into()).await;
        sent.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), Instant::now());
        let request = authed(
            auth,
            pb::RevokeSessionRequest {
                selector: Some(pb::revoke_session_request::Selector::SessionId(id.clone())),
                reason: "bench".into(),
                revoked_by: "loadgen".into(),
            },
        );
        revoker.revoke_session(request).await?;
    }

    let mut per_subscriber_us = histogram();
    let mut from_server_stamp_us = histogram();
    let mut delivered = 0;
    for stream in streams {
        let (per, stamp, received) = stream.await?;
        per_subscriber_us.add(&per).ok();
        from_server_stamp_us.add(&stamp).ok();
        delivered += received;
    }
    let mut to_last_us = histogram();
    let sent = sent.lock().unwrap_or_else(|p| p.into_inner());
    for (id, (count, last)) in arrivals.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if *count == watchers
            && let Some(at) = sent.get(id)
        {
            let _ = to_last_us.record((*last - *at).as_micros().max(1) as u64);
        }
    }
    Ok(FanoutOutcome {
        per_subscriber_us,
        to_last_us,
        from_server_stamp_us,
        delivered,
        expected: (revocations * watchers) as u64,
    })
}

/// The reference: RevokeSession publishes straight into a tokio broadcast that every
/// WatchRevocations stream forwards. No storage, no log, no auth.
#[derive(Clone)]
pub struct Reference {
    events: broadcast::Sender<pb::RevocationEvent>,
}

impl Reference {
    pub fn new() -> Reference {
        Reference { events: broadcast::channel(65_536).0 }
    }

    /// Serves the reference on a free loopback port; returns its URL.
    pub async fn serve(self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RevocationServiceServer::new(self))
                .serve_with_incoming(incoming),
        );
        Ok(format!("http://{addr}"))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRevocationsResponse, Status>> + Send>>;

fn not_here() -> Status {
    Status::unimplemented("the fan-out reference implements only RevokeSession and WatchRevocations")
}

#[tonic::async_trait]
impl RevocationService for Reference {
    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let session_id = match request.into_inner().selector {
            Some(pb::revoke_session_request::Selector::SessionId(id)) => id,
            _ => return Err(Status::invalid_argument("session_id")),
        };
        let micros = unix_micros();
        let event = pb::RevocationEvent {
            cursor: String::new(),
            session_id,
            revoked_at: Some(prost_types::Timestamp {
                seconds: micros / 1_000_000,
                nanos: ((micros % 1_000_000) * 1000) as i32,
            }),
            ..Default::default()
        };
        let _ = self.events.send(event.clone());
        Ok(Response::new(pb::RevokeSessionResponse { event: Some(event), already_ended: false }))
    }

    async fn revoke_user_sessions(
        &self,
        _: Request<pb::RevokeUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeUserSessionsResponse>, Status> {
        Err(not_here())
    }

    async fn is_revoked(&self, _: Request<pb::IsRevokedRequest>) -> Result<Response<pb::IsRevokedResponse>, Status> {
        Err(not_here())
    }

    async fn list_revocations(
        &self,
        _: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        Err(not_here())
    }

    type WatchRevocationsStream = WatchStream;

    async fn watch_revocations(
        &self,
        _: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let receiver = self.events.subscribe();
        let hello = pb::WatchRevocationsResponse {
            message: Some(pb::watch_revocations_response::Message::Heartbeat(pb::Heartbeat::default())),
        };
        let events = tokio_stream::wrappers::BroadcastStream::new(receiver).filter_map(|item| async move {
            item.ok().map(|event| {
                Ok(pb::WatchRevocationsResponse {
                    message: Some(pb::watch_revocations_response::Message::Event(event)),
                })
            })
        });
        Ok(Response::new(Box::pin(futures_util::stream::once(async move { Ok(hello) }).chain(events))))
    }
}
