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
//! The proxy runs on the test's Tokio runtime and stops when dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Forward);
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio::spawn(accept_loop(listener, upstream, mode.clone(), accepted.clone()));
        Proxy { addr, mode, accepted, acceptor }
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
) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == Mode::Reset {
            reset(&client);
            continue;
        }
        let rx = mode.subscribe();
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
            tokio::join!(pump(client_read, server_write, rx.clone()), pump(server_read, client_write, rx));
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

/// Copies `from` to `to` while the mode is `Forward`. Bytes read just before a black-hole are
/// held until the path heals (never dropped: TCP does not lose bytes in the middle of a stream).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut rx: watch::Receiver<Mode>) {
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
        if !forwarding(&mut rx).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
