//! The `redis` backend: sessions in Redis or a Redis Cluster through the `redis` crate, with the
//! key layout and Lua scripts of [`crate::store::keyspace`].
//!
//! One Redis: a multiplexed [`ConnectionManager`] (one connection, pipelined by concurrent
//! callers) created lazily, so the service starts while Redis is down and reports NOT_SERVING
//! until it is reachable; after a dropped connection the next call reconnects (one attempt, no
//! backoff), so calls fail fast during an outage and succeed as soon as Redis returns. A Redis Cluster (several
//! comma-separated nodes, or `redis+cluster://h1:p1,h2:p2`): the crate's cluster client, with
//! its own retries off (they would re-send a script whose reply was lost); the transport
//! follows slot moves by sending again only what the cluster refused without running
//! (`RedisTransport::run`). Every per-user script touches one slot thanks to the `{tag}` hash
//! tag.
//!
//! Errors: a connection failure, a timeout or a server that says it is not ready (LOADING,
//! CLUSTERDOWN, TRYAGAIN, ...) is [`Error::Unavailable`]; any other error reply is a bug or a
//! foreign value under our prefix, [`Error::Internal`].

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{ErrorKind, IntoConnectionInfo as _, RedisError, ServerErrorKind, Value};
use async_trait::async_trait;
use tokio::sync::OnceCell;

use crate::error::ConfigError;
use crate::error::{Error, Result};
use crate::store::keyspace::{KeyspaceStore, Layout, Lua, Reply, Transport};

/// Sessions in Redis or a Redis Cluster.
pub type RedisStore = KeyspaceStore<RedisTransport>;

/// Where the configuration points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One server: `redis://`, `rediss://` or `unix://`.
    Single(String),
    /// The seed nodes of a cluster.
    Cluster(Vec<String>),
}

/// Parses `redis.url`: one URL, several comma-separated ones (a cluster), or
/// `redis+cluster://[user:password@]h1:p1,h2:p2` (`rediss+cluster://` for TLS). The message
/// of an error never repeats the URL, which may hold a password.
pub fn parse_target(url: &str) -> std::result::Result<Target, String> {
    let url = url.trim();
    let check = |node: &str| -> std::result::Result<(), String> {
        node.into_connection_info().map(drop).map_err(|e| format!("not a Redis URL: {e}"))
    };
    for (scheme, plain) in [("redis+cluster://", "redis://"), ("rediss+cluster://", "rediss://")] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (userinfo, hosts) = match rest.rsplit_once('@') {
                Some((user, hosts)) => (format!("{user}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
            if hosts.contains(['/', '?']) {
                return Err(format!("a {scheme} URL lists host:port pairs only (no database, no options)"));
            }
            let nodes: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("{plain}{userinfo}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(format!("a {scheme} URL needs at least one host:port"));
            }
            nodes.iter().try_for_each(|n| check(n))?;
            return Ok(Target::Cluster(nodes));
        }
    }
    if url.contains(',') {
        let nodes: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| if n.contains("://") { n.to_owned() } else { format!("redis://{n}") })
            .collect();
        nodes.iter().try_for_each(|n| check(n))?;
        return Ok(Target::Cluster(nodes));
    }
    check(url)?;
    Ok(Target::Single(url.to_owned()))
}

/// Opens the store lazily (no connection is made here): a bad URL or prefix is an error now,
/// an unreachable server is `Unavailable` on use and in health.
pub fn open(url: &str, prefix: &str, timeout: Duration) -> std::result::Result<RedisStore, ConfigError> {
    let layout = Layout::new(prefix).map_err(|e| ConfigError(format!("setting `redis.key_prefix`: {e}")))?;
    let target = parse_target(url).map_err(|e| ConfigError(format!("setting `redis.url` (REDIS_URL): {e}")))?;
    let bad_url = |e: RedisError| ConfigError(format!("setting `redis.url` (REDIS_URL): {e}"));
    let connect_timeout = timeout.min(Duration::from_secs(1));
    let connection = match target {
        Target::Single(url) => {
            let client = ::redis::Client::open(url.as_str()).map_err(bad_url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(timeout))
                // One connection attempt per reconnect: while Redis is down every call fails at
                // once (connection refused) instead of waiting out a backoff, and each failed
                // call starts the next attempt, so service resumes with the first call after
                // Redis returns.
                .set_number_of_retries(0);
            Connection::Single(ConnectionManager::new_lazy_with_config(client, config).map_err(bad_url)?)
        }
        Target::Cluster(nodes) => {
            let client = ClusterClient::builder(nodes)
                .connection_timeout(connect_timeout)
                .response_timeout(timeout)
                // No retries by the crate: it re-sends scripts after a dropped connection or a
                // response timeout. RedisTransport::run re-sends only what provably did not run.
                .retries(0)
                .build()
                .map_err(bad_url)?;
            Connection::Cluster { client: Box::new(client), connection: Arc::new(OnceCell::new()) }
        }
    };
    Ok(KeyspaceStore::new(RedisTransport { connection }, layout, timeout))
}

/// Commands over a Redis connection or a cluster client.
#[derive(Clone)]
pub struct RedisTransport {
    connection: Connection,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster { client: Box<ClusterClient>, connection: Arc<OnceCell<ClusterConnection>> },
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.connection {
            Connection::Single(_) => "single",
            Connection::Cluster { .. } => "cluster",
        };
        f.debug_struct("RedisTransport").field("kind", &kind).finish_non_exhaustive()
    }
}

/// Either connection, as one `ConnectionLike`.
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ::redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a ::redis::Cmd) -> ::redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisTransport {
    async fn conn(&self) -> Result<Conn> {
        match &self.connection {
            Connection::Single(manager) => Ok(Conn::Single(manager.clone())),
            Connection::Cluster { client, connection } => {
                let connection =
                    connection.get_or_try_init(|| client.get_async_connection()).await.map_err(to_error)?;
                Ok(Conn::Cluster(connection.clone()))
            }
        }
    }

    /// Runs `attempt`, and again only where that cannot run a command twice.
    ///
    /// One Redis: a read once more when the connection had dropped (the manager reconnects in
    /// between); writes are never repeated. A cluster: the crate's client makes no retries of
    /// its own (it would re-send a script whose connection dropped after the node ran it, or
    /// whose reply timed out), so this loop does: up to [`CLUSTER_RESENDS`] times with a short
    /// backoff, a call the cluster refused without running it (MOVED, ASK, TRYAGAIN,
    /// CLUSTERDOWN, MASTERDOWN, LOADING, READONLY, no connection to the node, connection refused),
    /// and a read after any connection failure. The store's deadline (`storage.timeout`) bounds
    /// the whole loop.
    ///
    /// An ASK (the slot is being migrated and the keys are already at the new node) is sent
    /// to that node as `ASKING` + `asked`, the call in a form that needs nothing loaded there.
    async fn run<F, Fut>(&self, read_only: bool, asked: &::redis::Cmd, attempt: F) -> Result<Reply>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Value, RedisError>>,
    {
        let clustered = matches!(self.connection, Connection::Cluster { .. });
        let mut resends = 0u32;
        let mut redirect: Option<(String, u16)> = None;
        loop {
            let result = match redirect.take() {
                Some((host, port)) => Self::asking(self.conn().await?, host, port, asked).await,
                None => attempt(self.conn().await?).await,
            };
            let e = match result {
                Ok(value) => return to_reply(value),
                Err(e) => e,
            };
            if clustered && matches!(e.kind(), ErrorKind::Server(ServerErrorKind::Ask)) {
                redirect = e
                    .redirect_node()
                    .and_then(|(node, _)| node.rsplit_once(':'))
                    .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)));
            }
            let again = if clustered {
                resends < CLUSTER_RESENDS && (not_run(&e) || (read_only && connection_failed(&e)))
            } else {
                resends == 0 && read_only && (e.is_connection_dropped() || e.is_io_error())
            };
            if !again {
                return Err(to_error(e));
            }
            if clustered && redirect.is_none() {
                tokio::time::sleep(Duration::from_millis(25 << resends)).await;
            }
            resends += 1;
        }
    }

    /// `ASKING` then `cmd` on the cluster node at `host:port`, on one connection.
    async fn asking(conn: Conn, host: String, port: u16, cmd: &::redis::Cmd) -> std::result::Result<Value, RedisError> {
        let Conn::Cluster(mut connection) = conn else {
            return Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::Unsupported)));
        };
        let mut pipe = ::redis::Pipeline::new();
        pipe.add_command(::redis::cmd("ASKING")).add_command(cmd.clone());
        let route = ::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port };
        let mut replies = connection.route_pipeline(pipe, 1, 1, route).await?;
        match replies.pop() {
            Some(Value::ServerError(e)) => Err(e.into()),
            Some(value) => Ok(value),
            None => Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))),
        }
    }
}

/// How many times a cluster call is sent again (see [`RedisTransport::run`]).
const CLUSTER_RESENDS: u32 = 3;

/// The cluster refused the call without running it: another node owns the slot, the slot is
/// moving, the cluster or node is not ready, or the command never left (no connection).
fn not_run(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
        ),
        ErrorKind::ClusterConnectionNotFound => true,
        _ => e.is_connection_refusal(),
    }
}

/// The connection failed or timed out: whether a write ran is unknown.
fn connection_failed(e: &RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_timeout()
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn clustered(&self) -> bool {
        matches!(self.connection, Connection::Cluster { .. })
    }

    async fn command(&self, args: Vec<String>, read_only: bool) -> Result<Reply> {
        let Some((name, rest)) = args.split_first() else { return Err(Error::internal("empty command")) };
        let mut cmd = ::redis::cmd(name);
        for arg in rest {
            cmd.arg(arg);
        }
        self.run(read_only, &cmd, |mut conn| {
            let cmd = cmd.clone();
            async move { cmd.query_async::<Value>(&mut conn).await }
        })
        .await
    }

    async fn eval(&self, lua: &Lua, keys: Vec<String>, args: Vec<String>, read_only: bool) -> Result<Reply> {
        let mut invocation = lua.script.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        for arg in &args {
            invocation.arg(arg);
        }
        // After an ASK the new node may not have the script: EVAL with the source.
        let mut asked = ::redis::cmd("EVAL");
        asked.arg(lua.source).arg(keys.len()).arg(&keys).arg(&args);
        // EVALSHA; on NOSCRIPT (not run) the crate loads the script and sends EVALSHA again.
        self.run(read_only, &asked, |mut conn| {
            let invocation = &invocation;
            async move { invocation.invoke_async::<Value>(&mut conn).await }
        })
        .await
    }
}

fn to_error(e: RedisError) -> Error {
    let unavailable = match e.kind() {
        ErrorKind::Server(kind) => match kind {
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask => true,
            _ => matches!(e.code(), Some("OOM" | "BUSY" | "LOADING")),
        },
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType | ErrorKind::InvalidClientConfig => false,
        ErrorKind::Extension => matches!(e.code(), Some("OOM" | "BUSY" | "LOADING")),
        _ => true,
    };
    if unavailable {
        Error::unavailable(format!("session storage (redis) is unavailable: {e}"))
    } else {
        Error::internal_from("redis", e)
    }
}

fn to_reply(value: Value) -> Result<Reply> {
    Ok(match value {
        Value::Nil => Reply::Nil,
        Value::Int(n) => Reply::Int(n),
        Value::BulkString(bytes) => Reply::Data(bytes),
        Value::SimpleString(text) => Reply::Data(text.into_bytes()),
        Value::Okay => Reply::Data(b"OK".to_vec()),
        Value::Array(items) | Value::Set(items) => {
            Reply::Array(items.into_iter().map(to_reply).collect::<Result<_>>()?)
        }
        Value::Boolean(b) => Reply::Int(i64::from(b)),
        Value::ServerError(e) => return Err(to_error(e.into())),
        other => return Err(Error::internal(format!("redis: unexpected reply {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_one_server_or_a_cluster() {
        assert_eq!(parse_target("redis://127.0.0.1:6379").unwrap(), Target::Single("redis://127.0.0.1:6379".into()));
        assert_eq!(
            parse_target("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/").unwrap(),
            Target::Cluster(vec!["redis://:pw@10.0.0.1:7000".into(), "redis://:pw@10.0.0.2:7001".into()])
        );
        assert_eq!(
            parse_target("redis://a:1, b:2").unwrap(),
            Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert!(matches!(parse_target("rediss+cluster://h:1").unwrap(), Target::Cluster(n) if n[0] == "rediss://h:1"));
        let e = parse_target("http://user:secret@host").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(parse_target("redis+cluster://h:1/0").is_err());
        assert!(parse_target("redis+cluster://").is_err());
    }
}
