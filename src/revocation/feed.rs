//! The live revocation feed of one replica, and the watch streams it serves.
//!
//! One reader per replica tails the store's revocation log ([`RevocationFeed::run`]) and
//! publishes each event once into a bounded tokio broadcast; every watcher of the replica reads
//! from that broadcast, not from the store. The tailer is woken by the session manager after
//! each write that may append (so memory and embedded deliver at once) and polls as a fallback
//! (which is how writes made by another replica on shared storage arrive).
//!
//! A watch stream ([`RevocationFeed::watch`]) first subscribes to the broadcast, then reads the
//! history after its cursor from the log in batches, then switches to live events, skipping
//! any with a sequence number it has already delivered. Subscribing before reading the history
//! is what closes the race: an event committed after the history read is necessarily still
//! ahead of the tailer or in the broadcast. A live event that does not follow the last one
//! delivered (a gap, for example after the tailer restarted) sends the stream back to the log,
//! so delivery never depends on the broadcast being complete.
//!
//! A watcher whose client reads too slowly falls behind the broadcast's capacity; it is then
//! ended with `Aborted` and a message giving its resume cursor, instead of stalling the others
//! or buffering without bound. It resumes from that cursor and catches up from the durable log.
//! Lag while still catching up from the log is not the client's fault and is absorbed: the
//! stream re-subscribes and keeps reading the log.
//!
//! A replica serves at most `revocation.max_watchers` streams at once. Each holds a slot for its
//! whole life (the global concurrency limit lets a stream go once its response starts), and one
//! more is refused with `ResourceExhausted` before it subscribes or reads anything, so the
//! number of open streams, and with it the memory they hold, has a configured ceiling.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::revocation::{Cursor, RevocationEvent, RevocationSettings};
use crate::session::SessionManager;
use crate::store::DynRevocationLog;

/// Events read from the log per store call, by the tailer and by catching-up watchers.
const BATCH: usize = 512;
/// How often the tailer looks at the log when nobody woke it.
const POLL: Duration = Duration::from_secs(1);

/// What a watcher asks for.
#[derive(Debug, Clone, Default)]
pub struct WatchRequest {
    /// Resume after this cursor; `None` means from now.
    pub after: Option<Cursor>,
    /// Only this user's events.
    pub user_id: Option<String>,
    /// Heartbeat interval (already bounded by the caller); `None` for the default.
    pub heartbeat: Option<Duration>,
}

/// One message of a watch stream.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A revocation, with its cursor.
    Event(Cursor, Arc<SharedEvent>),
    /// A keep-alive carrying the stream's resume point: every event up to it was delivered or
    /// filtered out. The first message of every stream is one, so a watcher that started "from
    /// now" has a cursor before it has seen any event.
    Heartbeat(Cursor, Millis),
}

/// An event as the feed hands it to every stream of the replica, with room for the one
/// encoding of it that all of them send: the adapter encodes a live event once, not once per
/// watcher, so the cost of an event does not grow with the number of streams.
#[derive(Debug)]
pub struct SharedEvent {
    event: RevocationEvent,
    encoded: OnceLock<(Cursor, Bytes)>,
}

impl SharedEvent {
    /// A new event with no encoding yet.
    pub fn new(event: RevocationEvent) -> Arc<SharedEvent> {
        Arc::new(SharedEvent { event, encoded: OnceLock::new() })
    }

    /// The event's encoding at `cursor`: made by `encode` for the first stream that asks, and
    /// shared by every later stream at the same cursor. A stream at another cursor (another
    /// log's numbering) gets its own.
    pub fn encoded(&self, cursor: &Cursor, encode: impl FnOnce() -> Bytes) -> Bytes {
        match self.encoded.get() {
            Some((at, bytes)) if at == cursor => bytes.clone(),
            Some(_) => encode(),
            None => {
                let bytes = encode();
                // Two streams may race here; either encoding is the same message.
                let (at, kept) = self.encoded.get_or_init(|| (cursor.clone(), bytes.clone()));
                if at == cursor { kept.clone() } else { bytes }
            }
        }
    }
}

impl std::ops::Deref for SharedEvent {
    type Target = RevocationEvent;

    fn deref(&self) -> &RevocationEvent {
        &self.event
    }
}

/// The replica's fan-out of the revocation log.
#[derive(Debug, Clone)]
pub struct RevocationFeed {
    sessions: SessionManager,
    log: DynRevocationLog,
    live: broadcast::Sender<Arc<SharedEvent>>,
    wake: Arc<Notify>,
    /// Counts the log resets the tailer saw (a new log id, a head below its position). It is
    /// raised before any event of the new log is published, so a watcher that sees it changed
    /// ends instead of mixing two logs' numbering.
    resets: Arc<watch::Sender<u64>>,
    default_heartbeat: Duration,
    /// Streams open now, and the most allowed.
    watchers: Arc<AtomicUsize>,
    max_watchers: usize,
}

impl RevocationFeed {
    /// A feed over the manager's store, woken by the manager's log signal.
    pub fn new(sessions: &SessionManager, settings: &RevocationSettings) -> RevocationFeed {
        let (live, _) = broadcast::channel(settings.watch_buffer.max(1));
        RevocationFeed {
            sessions: sessions.clone(),
            log: sessions.revocation_log(),
            live,
            wake: sessions.log_signal(),
            resets: Arc::new(watch::Sender::new(0)),
            default_heartbeat: settings.default_heartbeat,
            watchers: Arc::new(AtomicUsize::new(0)),
            max_watchers: settings.max_watchers.max(1),
        }
    }

    fn cursor(&self, seq: u64) -> Cursor {
        Cursor { log_id: self.log.log_id(), seq }
    }

    /// Ends every open stream (each ends with [`log_reset`]) and makes the tailer start over.
    async fn reset(&self, store: &DynRevocationLog, log_id: &str, rewound: bool) {
        if rewound {
            // Same id, lower numbers: give the log a new id so old cursors are void everywhere.
            if let Err(e) = store.renew_log_id(log_id).await {
                tracing::warn!(error = %e, "cannot give the rewound revocation log a new id; will retry");
            }
        }
        self.resets.send_modify(|n| *n += 1);
    }

    /// Tails the log and publishes every new event once, until `shutdown`. Store errors are
    /// logged and retried at the next wake-up or poll. A log that was reset (a new id) or went
    /// backwards (its head below the tailer's position) ends every open stream with
    /// `log_reset`, and the tailer starts over at the new head.
    pub async fn run(self, shutdown: CancellationToken) {
        let store = self.log.clone();
        let mut last: Option<(String, u64)> = None;
        loop {
            if last.is_none() {
                // Start at the head: history is for watchers to read from the log themselves.
                match store.read_revocations(0, 0).await {
                    Ok(read) => last = Some((store.log_id(), read.position.head)),
                    Err(e) => tracing::warn!(error = %e, "revocation feed cannot read the log; will retry"),
                }
            }
            if let Some((log_id, mut seq)) = last.take() {
                let mut reset = false;
                loop {
                    match store.read_revocations(seq, BATCH).await {
                        Ok(read) => {
                            let now_id = store.log_id();
                            if now_id != log_id || read.position.head < seq {
                                let rewound = now_id == log_id;
                                tracing::warn!(
                                    old_log = %log_id, new_log = %now_id, position = seq, head = read.position.head,
                                    "the revocation log was reset or went backwards; ending every watch stream \
                                     (clients re-snapshot with ListRevocations)"
                                );
                                self.reset(&store, &log_id, rewound).await;
                                reset = true;
                                break;
                            }
                            if seq < read.position.trimmed_through {
                                // Behind what the log retains: jump to the highest purged event,
                                // so the retained ones after it are still published; watchers
                                // see the gap and read the log themselves (or get OUT_OF_RANGE).
                                tracing::warn!(seq, "revocation feed fell behind the log's retention");
                                seq = read.position.trimmed_through;
                                continue;
                            }
                            let full = read.events.len() == BATCH;
                            for event in read.events {
                                seq = event.seq;
                                // No receiver is not an error: nobody is watching.
                                let _ = self.live.send(SharedEvent::new(event));
                            }
                            if !full {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "revocation feed cannot read the log; will retry");
                            break;
                        }
                    }
                }
                if reset {
                    // Start over at once at the new head; nothing of the new log is missed.
                    continue;
                }
                last = Some((log_id, seq));
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Opens a watch stream. Fails with `ResourceExhausted` when the replica already serves
    /// `max_watchers` streams, and with `OutOfRange` when the cursor belongs to another log, is
    /// ahead of this one, or is older than what the log retains.
    pub async fn watch(&self, request: WatchRequest) -> Result<impl Stream<Item = Result<WatchItem>> + Send + 'static> {
        let slot = Slot::take(&self.watchers, self.max_watchers).ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "this replica already serves its maximum of {} revocation watch streams (revocation.max_watchers); \
                 share one stream per process, close idle ones, or watch through another replica, and retry with backoff",
                self.max_watchers
            ))
        })?;
        // Subscribe before reading anything: see the module comment.
        let live = self.live.subscribe();
        let resets = self.resets.subscribe();
        let generation = *resets.borrow();
        let position = self.log.read_revocations(0, 0).await?.position;
        let log_id = self.log.log_id();
        let start = match &request.after {
            None => position.head,
            Some(cursor) => {
                let resnapshot = "re-snapshot with ListRevocations and watch from its cursor";
                if cursor.log_id != log_id {
                    return Err(Error::LogReset(format!(
                        "after_cursor {cursor} is from another revocation log (the store was replaced or reset); {resnapshot}"
                    )));
                }
                if cursor.seq > position.head {
                    return Err(Error::OutOfRange(format!(
                        "after_cursor {cursor} is ahead of the revocation log (head {}); {resnapshot}",
                        self.cursor(position.head)
                    )));
                }
                if cursor.seq < position.trimmed_through {
                    return Err(out_of_retention(cursor));
                }
                cursor.seq
            }
        };
        let heartbeat = request.heartbeat.unwrap_or(self.default_heartbeat);
        let watch = Watch {
            feed: self.clone(),
            live,
            resets,
            generation,
            log_id,
            last: start,
            user_id: request.user_id,
            heartbeat,
            next_heartbeat: Instant::now() + heartbeat,
            pending: VecDeque::new(),
            catching_up: true,
            started: false,
            done: false,
            _slot: slot,
        };
        Ok(futures_util::stream::unfold(watch, |mut watch| async move {
            let item = watch.next().await?;
            Some((item, watch))
        }))
    }
}

/// The end of a stream whose log was reset or went backwards.
fn log_reset(cursor: &Cursor) -> Error {
    Error::LogReset(format!(
        "the revocation log was reset or went backwards (storage flushed, restarted without persistence, \
         or failed over with a lost tail), so cursor {cursor} and every earlier one are void; \
         re-snapshot with ListRevocations and watch from its cursor"
    ))
}

fn out_of_retention(cursor: &Cursor) -> Error {
    Error::OutOfRange(format!(
        "after_cursor {cursor} is older than what the revocation log retains; re-snapshot with ListRevocations and watch from its cursor"
    ))
}

/// The state of one watch stream.
struct Watch {
    feed: RevocationFeed,
    live: broadcast::Receiver<Arc<SharedEvent>>,
    /// The feed's reset counter, as of the stream's start.
    resets: watch::Receiver<u64>,
    generation: u64,
    /// The log this stream reads: its cursors carry this id, whatever the store's id is now.
    log_id: String,
    /// Every event up to this sequence number was delivered or filtered out.
    last: u64,
    user_id: Option<String>,
    heartbeat: Duration,
    next_heartbeat: Instant,
    /// Events in order, starting at `last + 1`, not yet delivered.
    pending: VecDeque<Arc<SharedEvent>>,
    /// Reading from the log rather than the broadcast.
    catching_up: bool,
    started: bool,
    done: bool,
    _slot: Slot,
}

/// One of the replica's `max_watchers` places, and one unit of the
/// `revocation_watchers_connected` gauge, held for as long as a stream lives.
struct Slot {
    watchers: Arc<AtomicUsize>,
}

impl Slot {
    /// A place if fewer than `max` are taken.
    fn take(watchers: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        watchers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1)).ok()?;
        metrics::gauge!(crate::metrics::WATCHERS_CONNECTED).increment(1.0);
        Some(Slot { watchers: watchers.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(crate::metrics::WATCHERS_CONNECTED).decrement(1.0);
    }
}

impl Watch {
    fn heartbeat(&mut self) -> WatchItem {
        self.next_heartbeat = Instant::now() + self.heartbeat;
        WatchItem::Heartbeat(self.cursor(self.last), self.feed.sessions.now())
    }

    fn cursor(&self, seq: u64) -> Cursor {
        Cursor { log_id: self.log_id.clone(), seq }
    }

    /// Whether the log was reset since the stream started, as the tailer saw it.
    fn was_reset(&self) -> bool {
        *self.resets.borrow() != self.generation
    }

    fn wanted(&self, event: &RevocationEvent) -> bool {
        self.user_id.as_deref().is_none_or(|user| user == event.user_id)
    }

    /// Takes a live event: already delivered ones are skipped, the next one is queued, and one
    /// beyond it means a gap, which the log fills.
    fn accept_live(&mut self, event: Arc<SharedEvent>) {
        let expected = self.last + 1 + self.pending.len() as u64;
        if event.seq < expected {
            return;
        }
        if event.seq == expected && !self.catching_up {
            self.pending.push_back(event);
        } else {
            self.catching_up = true;
        }
    }

    fn end(&mut self, error: Error) -> Option<Result<WatchItem>> {
        self.done = true;
        Some(Err(error))
    }

    async fn next(&mut self) -> Option<Result<WatchItem>> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(Ok(self.heartbeat()));
        }
        loop {
            // Checked before every event: live events after a reset belong to the new log.
            if self.was_reset() {
                let cursor = self.cursor(self.last);
                return self.end(log_reset(&cursor));
            }
            while let Some(event) = self.pending.pop_front() {
                self.last = event.seq;
                if self.wanted(&event) {
                    self.next_heartbeat = Instant::now() + self.heartbeat;
                    metrics::counter!(crate::metrics::REVOCATIONS_DELIVERED).increment(1);
                    return Some(Ok(WatchItem::Event(self.cursor(event.seq), event)));
                }
            }
            if self.catching_up {
                let read = match self.feed.log.read_revocations(self.last, BATCH).await {
                    Ok(read) => read,
                    Err(e) => return self.end(e),
                };
                if self.feed.log.log_id() != self.log_id || read.position.head < self.last {
                    let cursor = self.cursor(self.last);
                    return self.end(log_reset(&cursor));
                }
                if self.last < read.position.trimmed_through {
                    let cursor = self.cursor(self.last);
                    return self.end(out_of_retention(&cursor));
                }
                if !read.events.is_empty() {
                    self.pending.extend(read.events.into_iter().map(SharedEvent::new));
                    continue;
                }
                // Caught up with the log: take what the broadcast holds, then go live.
                self.catching_up = false;
                loop {
                    match self.live.try_recv() {
                        Ok(event) => self.accept_live(event),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => {
                            // Lag while reading the log is absorbed: start over at the live
                            // tail and read the log once more.
                            self.live = self.live.resubscribe();
                            self.catching_up = true;
                            break;
                        }
                        Err(_) => break,
                    }
                    if self.catching_up {
                        break;
                    }
                }
                continue;
            }
            tokio::select! {
                received = self.live.recv() => match received {
                    Ok(event) => self.accept_live(event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let cursor = self.cursor(self.last);
                        return self.end(Error::Aborted(format!(
                            "this watcher fell {missed} events behind the live feed; resume with after_cursor \"{cursor}\""
                        )));
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let cursor = self.cursor(self.last);
                        return self.end(Error::unavailable(format!(
                            "the revocation feed stopped; reconnect and resume with after_cursor \"{cursor}\""
                        )));
                    }
                },
                _ = self.resets.changed() => {}
                () = tokio::time::sleep_until(self.next_heartbeat) => return Some(Ok(self.heartbeat())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> RevocationEvent {
        RevocationEvent {
            seq,
            session_id: "s".into(),
            user_id: "u".into(),
            kind: crate::revocation::RevocationKind::Revoked,
            reason: "r".into(),
            revoked_by: None,
            revoked_at: 1,
            expires_at: 2,
        }
    }

    #[test]
    fn an_event_is_encoded_once_per_cursor_and_shared() {
        let shared = SharedEvent::new(event(7));
        let at = Cursor { log_id: "log-a".into(), seq: 7 };
        let mut calls = 0;
        let first = shared.encoded(&at, || {
            calls += 1;
            Bytes::from_static(b"a7")
        });
        let second = shared.encoded(&at, || {
            calls += 1;
            Bytes::from_static(b"other")
        });
        assert_eq!((first.as_ref(), second.as_ref(), calls), (&b"a7"[..], &b"a7"[..], 1));
        assert_eq!(first.as_ptr(), second.as_ptr(), "the second stream gets the same bytes, not a copy");
        let elsewhere = Cursor { log_id: "log-b".into(), seq: 7 };
        assert_eq!(shared.encoded(&elsewhere, || Bytes::from_static(b"b7")).as_ref(), b"b7");
        assert_eq!(shared.encoded(&at, || Bytes::from_static(b"again")).as_ref(), b"a7", "the first stays");
    }

    #[test]
    fn slots_are_bounded_and_given_back_on_drop() {
        let watchers = Arc::new(AtomicUsize::new(0));
        let first = Slot::take(&watchers, 2).unwrap();
        let second = Slot::take(&watchers, 2).unwrap();
        assert!(Slot::take(&watchers, 2).is_none());
        assert_eq!(watchers.load(Ordering::Acquire), 2, "a refused take leaves the count alone");
        drop(first);
        let third = Slot::take(&watchers, 2).unwrap();
        assert!(Slot::take(&watchers, 2).is_none());
        drop((second, third));
        assert_eq!(watchers.load(Ordering::Acquire), 0);
    }
}
