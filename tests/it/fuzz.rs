//! Property test over the whole contract: arbitrary well-typed messages (generated from the
//! contract's own descriptors: every field kind, oversized strings, control characters, unknown
//! enum numbers, negative durations, nesting) and arbitrary bytes, sent to every RPC of the real
//! binary. Nothing may panic, every answer must be a documented status, and a rejected
//! CreateSession must leave no session behind. `FUZZ_CASES` raises the case count on demand;
//! proptest keeps any failure's seed in `tests/it/fuzz.regressions`, replayed first on every run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Buf as _, BufMut as _};
use proptest::prelude::*;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, MethodDescriptor, Value};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use session_authority::grpc::pb;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::support::{ADMIN_KEY, Process, Spawn};

/// A codec that sends and receives raw bytes, so any byte string can be a request.
#[derive(Clone, Default)]
struct Raw;

struct RawEncoder;
struct RawDecoder;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

fn methods() -> Vec<MethodDescriptor> {
    let pool = DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("the contract's descriptors decode");
    pool.services()
        .filter(|s| s.full_name().starts_with("atoms.session.v1."))
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .collect()
}

fn text(rng: &mut StdRng) -> String {
    let len = match rng.random_range(0..10) {
        0 => 0,
        1 => rng.random_range(300..5000),
        _ => rng.random_range(1..40),
    };
    (0..len)
        .map(|_| match rng.random_range(0..12) {
            0 => char::from_u32(rng.random_range(0..32)).unwrap_or('x'),
            1 => char::from_u32(rng.random_range(0x80..0x2_0000)).unwrap_or('é'),
            2 => ' ',
            _ => char::from(rng.random_range(b'!'..=b'~')),
        })
        .collect()
}

fn scalar(kind: &Kind, rng: &mut StdRng, depth: u32) -> Value {
    let extreme = rng.random_bool(0.2);
    match kind {
        Kind::Double => Value::F64(if extreme {
            [f64::NAN, f64::INFINITY, -1e308, 0.0][rng.random_range(0..4)]
        } else {
            rng.random_range(-2.0..2.0)
        }),
        Kind::Float => Value::F32(if extreme { f32::NAN } else { rng.random_range(-2.0..2.0) }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(if extreme {
            [i32::MIN, i32::MAX, -1][rng.random_range(0..3)]
        } else {
            rng.random_range(-10..100)
        }),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(if extreme {
            [i64::MIN, i64::MAX, -1][rng.random_range(0..3)]
        } else {
            rng.random_range(-10..100_000)
        }),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(if extreme { u32::MAX } else { rng.random_range(0..2000) }),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(if extreme { u64::MAX } else { rng.random_range(0..2000) }),
        Kind::Bool => Value::Bool(rng.random_bool(0.5)),
        Kind::String => Value::String(text(rng)),
        Kind::Bytes => {
            Value::Bytes((0..rng.random_range(0..64)).map(|_| rng.random::<u8>()).collect::<Vec<u8>>().into())
        }
        Kind::Enum(e) => {
            let values: Vec<i32> = e.values().map(|v| v.number()).collect();
            Value::EnumNumber(if extreme {
                rng.random_range(-5..1000)
            } else {
                values[rng.random_range(0..values.len())]
            })
        }
        Kind::Message(m) => Value::Message(message(m, rng, depth + 1)),
    }
}

fn map_key(kind: &Kind, rng: &mut StdRng) -> MapKey {
    match kind {
        Kind::String => MapKey::String(text(rng)),
        Kind::Int32 => MapKey::I32(rng.random()),
        Kind::Int64 => MapKey::I64(rng.random()),
        Kind::Uint32 => MapKey::U32(rng.random()),
        Kind::Uint64 => MapKey::U64(rng.random()),
        Kind::Bool => MapKey::Bool(rng.random()),
        _ => MapKey::String(String::new()),
    }
}

/// A random, well-typed instance of `descriptor`.
fn message(descriptor: &MessageDescriptor, rng: &mut StdRng, depth: u32) -> DynamicMessage {
    let mut message = DynamicMessage::new(descriptor.clone());
    if depth > 3 {
        return message;
    }
    for field in descriptor.fields() {
        if rng.random_bool(0.4) {
            continue;
        }
        let count = if rng.random_bool(0.05) { rng.random_range(100..400) } else { rng.random_range(0..5) };
        let value = if field.is_map() {
            let Kind::Message(entry) = field.kind() else { continue };
            let (key, value) = (entry.map_entry_key_field(), entry.map_entry_value_field());
            let map: HashMap<MapKey, Value> =
                (0..count).map(|_| (map_key(&key.kind(), rng), scalar(&value.kind(), rng, depth))).collect();
            Value::Map(map)
        } else if field.is_list() {
            Value::List((0..count).map(|_| scalar(&field.kind(), rng, depth)).collect())
        } else {
            scalar(&field.kind(), rng, depth)
        };
        message.set_field(&field, value);
    }
    message
}

/// Statuses the contract documents for a caller with the admin role. INTERNAL is documented
/// only for bytes that are not a protobuf message (gRPC's convention for a request it cannot
/// parse); anything else INTERNAL, UNKNOWN (a panic) or a dropped connection is a failure.
fn documented(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Unimplemented
        | Code::Unavailable => true,
        Code::Internal => status.message().contains("decode"),
        _ => false,
    }
}

struct Target {
    server: Process,
    runtime: tokio::runtime::Runtime,
    channel: tonic::transport::Channel,
    methods: Vec<MethodDescriptor>,
    created_users: Mutex<Vec<String>>,
    // A static is never dropped: the watchdog kills the server when the test binary exits.
    _watchdog: crate::servers::Watchdog,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let server = Spawn::default().arg("--storage").arg("memory").without_create_limit().start();
        let channel = runtime.block_on(server.channel());
        let watchdog = crate::servers::Watchdog::new(&[server.pid()], &tempfile::tempdir().unwrap().keep());
        Target {
            server,
            runtime,
            channel,
            methods: methods(),
            created_users: Mutex::new(Vec::new()),
            _watchdog: watchdog,
        }
    })
}

async fn send(
    channel: tonic::transport::Channel,
    method: &MethodDescriptor,
    body: Vec<u8>,
) -> Result<(), tonic::Status> {
    let path: http::uri::PathAndQuery =
        format!("/{}/{}", method.parent_service().full_name(), method.name()).parse().unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    request.set_timeout(std::time::Duration::from_secs(5));
    if method.is_server_streaming() {
        let mut stream = grpc.server_streaming(request, path, Raw).await?.into_inner();
        // The first message (a heartbeat) or the stream's status is the answer.
        stream.message().await.map(|_| ())
    } else {
        grpc.unary(request, path, Raw).await.map(|_| ())
    }
}

fn check(seed: u64, method_index: usize, raw: bool) -> Result<(), TestCaseError> {
    let target = target();
    let method = &target.methods[method_index % target.methods.len()];
    let mut rng = StdRng::seed_from_u64(seed);
    let (body, user) = if raw {
        ((0..rng.random_range(0..256)).map(|_| rng.random::<u8>()).collect(), None)
    } else {
        let message = message(&method.input(), &mut rng, 0);
        let user = message.get_field_by_name("user_id").and_then(|v| v.as_str().map(str::to_owned));
        (message.encode_to_vec(), user)
    };
    let result = target.runtime.block_on(send(target.channel.clone(), method, body));
    if let Err(status) = &result {
        prop_assert!(
            documented(status),
            "{}: undocumented status {:?}: {}",
            method.name(),
            status.code(),
            status.message()
        );
    }
    if method.name() == "CreateSession"
        && let Some(user) = user
    {
        if result.is_ok() {
            target.created_users.lock().unwrap().push(user);
        } else if !target.created_users.lock().unwrap().contains(&user) && !user.is_empty() && user.len() <= 256 {
            // A rejected creation left nothing behind for that user.
            let listed = target.runtime.block_on(async {
                let mut admin = target.server.sessions(Some(ADMIN_KEY)).await;
                admin
                    .list_user_sessions(pb::ListUserSessionsRequest {
                        user_id: user.clone(),
                        page_size: 10,
                        ..Default::default()
                    })
                    .await
            });
            if let Ok(listed) = listed {
                prop_assert!(listed.into_inner().sessions.is_empty(), "a rejected CreateSession stored a session");
            }
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(600)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("regressions"))), ..ProptestConfig::default() })]

    #[test]
    fn well_typed_messages_to_every_rpc(seed in any::<u64>(), method in 0usize..64) {
        check(seed, method, false)?;
    }

    #[test]
    fn arbitrary_bytes_to_every_rpc(seed in any::<u64>(), method in 0usize..64) {
        check(seed, method, true)?;
    }
}

#[test]
fn the_server_survives_the_fuzzing_and_every_rpc_was_reached() {
    // Runs the generators once over every method in order, then checks the process is alive.
    let target = target();
    for index in 0..target.methods.len() {
        check(index as u64, index, false).unwrap();
        check(index as u64, index, true).unwrap();
    }
    assert_eq!(target.methods.len(), 21, "every RPC of the contract (6 + 4 + 5 + 6) is exercised");
    let alive = Arc::new(target.runtime.block_on(async {
        let mut health = tonic_health::pb::health_client::HealthClient::new(target.channel.clone());
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok()
    }));
    assert!(*alive, "the server still answers health checks");
}
