//! A TCP proxy with a partition switch, for network-fault tests: a replica reaches its peer
//! (redis-server) through it, and the test cuts or heals the path without touching either end.
//!
//! Two kinds of partition:
//! - [`Mode::BlackHole`]: what a dropped route or a silent firewall looks like. Connections stay
//!   open but no byte moves in either direction (the proxy stops reading, so what the ends send
//!   waits in socket buffers, as unacknowledged segments wait for retransmission); new
//!   connections are accepted and connected upstream, but nothing is forwarded. Neither end sees
//!   an error: only its own timeouts can tell. Healing forwards what waited, in order, as TCP
//!   would after the path returns.
//! - [`Mode::Reset`]: what a restarting firewall or a crashed middlebox looks like. Every open
//!   connection is reset (RST, zero linger), and new ones are accepted and reset at once.
//!
//! And one fault of the middle of a call, [`Proxy::lose_replies_to`]: a request that contains
//! given byte strings reaches the server, and the connection closes when its reply comes back,
//! before a byte of it reaches the client (a connection lost after the server acted, where the
//! client cannot know whether its request ran).
//!
//! The proxy runs on the test's Tokio runtime and stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copies bytes both ways.
    Forward,
    /// Keeps connections open and forwards nothing.
    BlackHole,
    /// Resets every connection, open or new.
    Reset,
}

/// A running proxy to one upstream address.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    lose: Arc<LoseReplies>,
    acceptor: JoinHandle<()>,
}

/// The requests whose replies are lost, and how many were.
#[derive(Default)]
struct LoseReplies {
    patterns: Mutex<Vec<Vec<u8>>>,
    lost: AtomicUsize,
}

impl LoseReplies {
    fn matches(&self, bytes: &[u8]) -> bool {
        let patterns = self.patterns.lock().unwrap();
        !patterns.is_empty() && patterns.iter().all(|p| bytes.windows(p.len().max(1)).any(|w| w == p.as_slice()))
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Forward);
        let accepted = Arc::new(AtomicUsize::new(0));
        let lose = Arc::new(LoseReplies::default());
        let acceptor = tokio::spawn(accept_loop(listener, upstream, mode.clone(), accepted.clone(), lose.clone()));
        Proxy { addr, mode, accepted, lose, acceptor }
    }

    /// From now on, a request (one read from the client) that contains every one of `patterns`
    /// is forwarded, and its connection is closed when the server's next bytes arrive, which are
    /// dropped. An empty list turns this off.
    pub fn lose_replies_to(&self, patterns: &[&[u8]]) {
        *self.lose.patterns.lock().unwrap() = patterns.iter().map(|p| p.to_vec()).collect();
    }

    /// Replies lost so far by [`Proxy::lose_replies_to`].
    pub fn lost_replies(&self) -> usize {
        self.lose.lost.load(Ordering::Relaxed)
    }

    /// `redis://` at the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Switches every connection, open or new, to `mode`.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Connections accepted so far (a client's reconnects show here).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        // Open connections see the channel close and end.
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    lose: Arc<LoseReplies>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == Mode::Reset {
            reset(&client);
            continue;
        }
        let rx = mode.subscribe();
        let lose = lose.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                reset(&client);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            // Zero linger on both sockets: closing them in `Reset` sends RST, not FIN.
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Each direction ends on EOF, an error or `Reset`; the sockets close when both
            // halves of each are dropped.
            let armed = AtomicBool::new(false);
            let requests = Direction::Requests { lose: &lose, armed: &armed };
            let replies = Direction::Replies { lose: &lose, armed: &armed };
            tokio::join!(
                pump(client_read, server_write, rx.clone(), requests),
                pump(server_read, client_write, rx, replies)
            );
        });
    }
}

/// Closes a socket with RST.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Waits until the mode is `Forward`; `false` on `Reset` or when the proxy is gone.
async fn forwarding(rx: &mut watch::Receiver<Mode>) -> bool {
    loop {
        match *rx.borrow_and_update() {
            Mode::Forward => return true,
            Mode::Reset => return false,
            Mode::BlackHole => {}
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

/// Which way a pump copies, for [`Proxy::lose_replies_to`]: a matching request arms its
/// connection, and the next reply on an armed connection closes it.
enum Direction<'a> {
    Requests { lose: &'a LoseReplies, armed: &'a AtomicBool },
    Replies { lose: &'a LoseReplies, armed: &'a AtomicBool },
}

/// Copies `from` to `to` while the mode is `Forward`. Bytes read just before a black-hole are
/// held until the path heals (never dropped: TCP does not lose bytes in the middle of a stream).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut rx: watch::Receiver<Mode>, way: Direction<'_>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !forwarding(&mut rx).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            // A partition while waiting for bytes: stop reading (reads are cancel-safe).
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        match way {
            Direction::Requests { lose, armed } => {
                if lose.matches(&buf[..n]) {
                    armed.store(true, Ordering::SeqCst);
                }
            }
            Direction::Replies { lose, armed } => {
                if armed.swap(false, Ordering::SeqCst) {
                    lose.lost.fetch_add(1, Ordering::Relaxed);
                    // Dropping both halves of the client's socket closes it; the request side
                    // sees its read end on the client's close.
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
        if !forwarding(&mut rx).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
