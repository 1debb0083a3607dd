//! The upstream revocation queue: every revocation asks the session's provider to revoke its
//! upstream tokens (RFC 7009), off the request path and durably.
//!
//! The queue is the revocation log itself. A session's end and its `revoked` event are one atomic
//! step in the store, so the work is stored with the end; a worker walks the log from a checkpoint
//! ([`TokenStore::checkpoint`](crate::store::TokenStore::checkpoint), `<log id>.<seq>`), asks the
//! provider for each `revoked` event and moves the checkpoint past every event whose work is done.
//! An event whose provider call failed stays pending (the checkpoint does not pass it) and is tried
//! again with backoff, also by the next process after a restart: the checkpoint only says
//! "everything up to here is done". Work is done at least once: a crash between a provider call and
//! the checkpoint write repeats the call, which RFC 7009 makes harmless (revoking a revoked token
//! is a 200).
//!
//! One worker runs per store. On a shared store (Redis) the replicas elect it with a lease
//! (the token work's [`TokenStore::acquire_lease`](crate::store::TokenStore::acquire_lease)
//! under a reserved id), released on a clean shutdown; a local store (embedded, memory) belongs
//! to one process, which runs it.
//!
//! RevokeSession still asks the provider inline, so its caller sees the upstream revoked when
//! the provider is healthy; it claims the event for that time ([`UpstreamQueue::claim`]), and
//! the worker of the same replica counts a claimed success as done instead of calling again.
//! Logout-all only ends sessions and wakes the worker.
//!
//! Bounds: at most [`MAX_PENDING`] events are held pending (the worker stops reading further
//! until some are done); an event is given up [`GIVE_UP_AFTER`] after its revocation (counted
//! as `abandoned`); an event purged from the log (its list TTL passed) before the worker read
//! it is skipped with a warning. Outcomes are counted in `upstream_revocations_total{outcome}`
//! and the worker's pending events in the `upstream_revocations_pending` gauge.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::{self, Millis};
use crate::error::Result;
use crate::metrics::{UPSTREAM_REVOCATIONS, UPSTREAM_REVOCATIONS_PENDING};
use crate::model::RefreshLease;
use crate::session::{SessionEvent, SessionManager, SessionRecord};
use crate::store::{DynTokenStore, LeaseOutcome};

use super::{Cursor, RevocationEvent, RevocationKind, UpstreamOutcome, UpstreamRevoker};

/// The checkpoint's name and the lease's reserved id.
pub const QUEUE_NAME: &str = "upstream_revocations";
/// Events held pending at once.
pub const MAX_PENDING: usize = 10_000;
/// How long after its revocation an event's upstream call is still tried.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Provider calls in flight at once.
const CONCURRENCY: usize = 4;
/// The first retry delay of a failed event; doubled per failure up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// The longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the worker looks at the log when nothing wakes it.
const POLL: Duration = Duration::from_secs(1);
/// The lease's lifetime (renewed every third of it).
const LEASE_TTL: Duration = Duration::from_secs(10);
/// Events read from the log at once.
const READ_BATCH: usize = 256;
/// How long a claim of RevokeSession is remembered.
const CLAIM_TTL: Duration = Duration::from_secs(60);

/// The queue's handle: the worker ([`UpstreamQueue::run`]), the wake-up of logout-all and the
/// claims of RevokeSession.
#[derive(Debug, Clone)]
pub struct UpstreamQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sessions: SessionManager,
    tokens: DynTokenStore,
    revoker: Arc<dyn UpstreamRevoker>,
    cascade: bool,
    holder: String,
    wake: Notify,
    claims: Mutex<Claims>,
}

/// Events RevokeSession is handling or handled inline on this replica.
#[derive(Debug, Default)]
struct Claims {
    state: HashMap<(String, u64), bool>,
    order: VecDeque<(Instant, (String, u64))>,
}

/// An event the worker has read and not finished.
#[derive(Debug, Clone)]
struct Pending {
    event: RevocationEvent,
    failures: u32,
    due: Instant,
}

/// The worker's position: the log it reads, how far it read, and what is pending.
#[derive(Debug)]
struct Position {
    log_id: String,
    read_through: u64,
    pending: BTreeMap<u64, Pending>,
    saved: Option<String>,
}

impl Position {
    /// Everything at or below this is done.
    fn done_through(&self) -> u64 {
        self.pending.keys().next().map_or(self.read_through, |first| first - 1)
    }

    fn checkpoint(&self) -> String {
        Cursor { log_id: self.log_id.clone(), seq: self.done_through() }.to_string()
    }
}

impl UpstreamQueue {
    /// The queue of `sessions`' store, calling `revoker`; with `cascade` off every event is done
    /// at once without a call (the checkpoint keeps up, so turning cascade on later does not
    /// revoke what was revoked while it was off).
    pub fn new(
        sessions: SessionManager,
        tokens: DynTokenStore,
        revoker: Arc<dyn UpstreamRevoker>,
        cascade: bool,
    ) -> UpstreamQueue {
        let holder = uuid::Uuid::new_v4().simple().to_string();
        UpstreamQueue {
            inner: Arc::new(Inner {
                sessions,
                tokens,
                revoker,
                cascade,
                holder,
                wake: Notify::new(),
                claims: Mutex::default(),
            }),
        }
    }

    /// The provider client.
    pub fn revoker(&self) -> &Arc<dyn UpstreamRevoker> {
        &self.inner.revoker
    }

    /// Wakes the worker (new work in the log).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Marks the event `cursor` as being handled inline; [`UpstreamQueue::settle`] says how it
    /// went.
    pub fn claim(&self, cursor: &Cursor) {
        let mut claims = self.inner.claims.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while claims.order.front().is_some_and(|(at, _)| now.duration_since(*at) > CLAIM_TTL) {
            if let Some((_, key)) = claims.order.pop_front() {
                claims.state.remove(&key);
            }
        }
        let key = (cursor.log_id.clone(), cursor.seq);
        claims.state.insert(key.clone(), false);
        claims.order.push_back((now, key));
    }

    /// Ends a claim: `done` when the provider revoked the tokens (the worker will not call
    /// again), otherwise the worker does the work as for any event.
    pub fn settle(&self, cursor: &Cursor, done: bool) {
        let mut claims = self.inner.claims.lock().unwrap_or_else(|p| p.into_inner());
        let key = (cursor.log_id.clone(), cursor.seq);
        if done {
            claims.state.insert(key, true);
        } else {
            claims.state.remove(&key);
        }
        drop(claims);
        if !done {
            self.wake();
        }
    }

    /// `Some(true)`: handled inline; `Some(false)`: being handled inline; `None`: not claimed.
    fn claimed(&self, log_id: &str, seq: u64) -> Option<bool> {
        let claims = self.inner.claims.lock().unwrap_or_else(|p| p.into_inner());
        claims.state.get(&(log_id.to_owned(), seq)).copied()
    }

    /// Runs the worker until `shutdown`: leads while this replica holds the queue's lease, and
    /// otherwise waits for it to lapse.
    pub async fn run(self, shutdown: CancellationToken) {
        let local = matches!(self.inner.sessions.store().server_time().await, Ok(None));
        loop {
            let led = if local { Ok(true) } else { self.acquire().await };
            match led {
                Ok(true) => {
                    if let Err(e) = self.lead(local, &shutdown).await {
                        tracing::warn!(error = %e, "the upstream revocation queue stopped; it starts again shortly");
                    }
                    metrics::gauge!(UPSTREAM_REVOCATIONS_PENDING).set(0.0);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not take the upstream revocation queue's lease"),
            }
            if !local {
                let _ = self.inner.tokens.release_lease(QUEUE_NAME, &self.inner.holder).await;
            }
            if shutdown.is_cancelled() {
                return;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(LEASE_TTL / 3) => {}
            }
        }
    }

    async fn acquire(&self) -> Result<bool> {
        let now = self.inner.sessions.now();
        let lease = RefreshLease {
            session_id: QUEUE_NAME.to_owned(),
            holder: self.inner.holder.clone(),
            version: 0,
            expires_at: clock::add(now, LEASE_TTL),
        };
        Ok(match self.inner.tokens.acquire_lease(&lease, now).await? {
            LeaseOutcome::Acquired => true,
            LeaseOutcome::Held(other) => other.holder == self.inner.holder,
        })
    }

    /// Does the queue's work until the lease is lost, a storage error or `shutdown`.
    async fn lead(&self, local: bool, shutdown: &CancellationToken) -> Result<()> {
        let mut position = self.load().await?;
        let mut renew_at = Instant::now() + LEASE_TTL / 3;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if !local && Instant::now() >= renew_at {
                let now = self.inner.sessions.now();
                let held = self
                    .inner
                    .tokens
                    .renew_lease(QUEUE_NAME, &self.inner.holder, clock::add(now, LEASE_TTL), now)
                    .await?;
                if !held {
                    tracing::warn!("the upstream revocation queue's lease was lost; another replica leads it");
                    return Ok(());
                }
                renew_at = Instant::now() + LEASE_TTL / 3;
            }
            self.read(&mut position).await?;
            self.work(&mut position).await;
            let checkpoint = position.checkpoint();
            if position.saved.as_deref() != Some(checkpoint.as_str()) {
                self.inner.tokens.save_checkpoint(QUEUE_NAME, &checkpoint).await?;
                position.saved = Some(checkpoint);
            }
            metrics::gauge!(UPSTREAM_REVOCATIONS_PENDING).set(position.pending.len() as f64);
            let now = Instant::now();
            let next_due = position.pending.values().map(|p| p.due).min();
            let mut wait = next_due.map_or(POLL, |due| due.saturating_duration_since(now)).min(POLL);
            if !local {
                wait = wait.min(renew_at.saturating_duration_since(now));
            }
            let wait = wait.max(Duration::from_millis(10));
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The position of the checkpoint, or the log's head when there is none (a new store, or
    /// one written before the queue existed, whose revocations were cascaded inline).
    async fn load(&self) -> Result<Position> {
        let store = self.inner.sessions.revocation_log();
        let log_id = store.log_id();
        let saved = self.inner.tokens.checkpoint(QUEUE_NAME).await?;
        let from = saved.as_deref().and_then(|text| Cursor::parse("checkpoint", text).ok());
        let read_through = match from {
            Some(cursor) if cursor.log_id == log_id => cursor.seq,
            // Another log (a reset store): all of it is new.
            Some(_) => 0,
            None => store.read_revocations(0, 0).await?.position.head,
        };
        Ok(Position { log_id, read_through, pending: BTreeMap::new(), saved })
    }

    /// Reads new events into `position.pending`.
    async fn read(&self, position: &mut Position) -> Result<()> {
        let store = self.inner.sessions.revocation_log();
        let log_id = store.log_id();
        if log_id != position.log_id {
            tracing::warn!("the revocation log was reset; the upstream revocation queue starts on the new log");
            *position = Position { log_id, read_through: 0, pending: BTreeMap::new(), saved: position.saved.take() };
        }
        while position.pending.len() < MAX_PENDING {
            let room = (MAX_PENDING - position.pending.len()).min(READ_BATCH);
            let read = store.read_revocations(position.read_through, room).await?;
            let head = read.position.head;
            if head < position.read_through {
                // The log went backwards under the same id (the feed renews its id): start over
                // at what is there; repeated calls are harmless.
                tracing::warn!(head, read_through = position.read_through, "the revocation log went backwards");
                position.read_through = read.position.trimmed_through.min(head);
                continue;
            }
            if position.read_through < read.position.trimmed_through {
                tracing::warn!(
                    from = position.read_through,
                    through = read.position.trimmed_through,
                    "revocation events were purged before the upstream revocation queue read them; their upstream tokens are left to expire"
                );
                position.read_through = read.position.trimmed_through;
                continue;
            }
            let Some(last) = read.events.last().map(|e| e.seq) else { return Ok(()) };
            let now = Instant::now();
            for event in read.events {
                if event.kind == RevocationKind::Revoked {
                    position.pending.insert(event.seq, Pending { event, failures: 0, due: now });
                }
            }
            position.read_through = last;
        }
        Ok(())
    }

    /// Tries every due pending event, a few at a time.
    async fn work(&self, position: &mut Position) {
        use futures_util::StreamExt as _;
        let now = Instant::now();
        let due: Vec<Pending> = position.pending.values().filter(|p| p.due <= now).cloned().collect();
        if due.is_empty() {
            return;
        }
        let log_id = position.log_id.clone();
        let results: Vec<(u64, Option<Pending>)> = futures_util::stream::iter(due)
            .map(|pending| {
                let log_id = &log_id;
                async move {
                    let seq = pending.event.seq;
                    (seq, self.attempt(log_id, pending).await)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (seq, again) in results {
            match again {
                Some(pending) => position.pending.insert(seq, pending),
                None => position.pending.remove(&seq),
            };
        }
    }

    /// One try of one event: `None` when its work is done, otherwise the event to try again.
    async fn attempt(&self, log_id: &str, mut pending: Pending) -> Option<Pending> {
        let event = &pending.event;
        let count = |outcome: &'static str| metrics::counter!(UPSTREAM_REVOCATIONS, "outcome" => outcome).increment(1);
        match self.claimed(log_id, event.seq) {
            Some(true) => return None,
            Some(false) => {
                pending.due = Instant::now() + INITIAL_BACKOFF;
                return Some(pending);
            }
            None => {}
        }
        if !self.inner.cascade {
            count("skipped");
            return None;
        }
        let now: Millis = self.inner.sessions.now();
        if clock::add(event.revoked_at, GIVE_UP_AFTER) <= now {
            count("abandoned");
            tracing::warn!(session_id = %event.session_id, failures = pending.failures, "gave up revoking the upstream tokens of a revoked session");
            return None;
        }
        let record = match self.inner.sessions.store().get_by_id(&event.session_id).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                count("gone");
                return None;
            }
            Err(e) => {
                tracing::warn!(session_id = %event.session_id, error = %e, "could not read a revoked session for its upstream revocation; will retry");
                return Some(self.backoff(pending));
            }
        };
        match self.inner.revoker.revoke(&record).await {
            UpstreamOutcome::Revoked => count("revoked"),
            UpstreamOutcome::NotConfigured => count("not_configured"),
            UpstreamOutcome::Skipped => count("skipped"),
            UpstreamOutcome::Rejected(cause) => {
                count("rejected");
                tracing::warn!(session_id = %event.session_id, %cause, "the provider refused to revoke a revoked session's upstream tokens; not retried");
                self.report(&record, &cause).await;
            }
            UpstreamOutcome::Failed(cause) => {
                count("failed");
                tracing::warn!(session_id = %event.session_id, %cause, failures = pending.failures + 1, "upstream token revocation failed; will retry");
                // One security event per revocation, at its first failure, not one per retry.
                if pending.failures == 0 {
                    self.report(&record, &cause).await;
                }
                return Some(self.backoff(pending));
            }
        }
        None
    }

    /// Records a failed upstream revocation in the security event log.
    async fn report(&self, session: &SessionRecord, cause: &str) {
        self.inner.sessions.report(SessionEvent::UpstreamRevocationFailed { session, error: cause }).await;
    }

    fn backoff(&self, mut pending: Pending) -> Pending {
        pending.failures = pending.failures.saturating_add(1);
        let delay = INITIAL_BACKOFF.saturating_mul(1 << pending.failures.min(16).saturating_sub(1)).min(MAX_BACKOFF);
        pending.due = Instant::now() + delay;
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Pending {
        Pending {
            event: RevocationEvent {
                seq,
                session_id: format!("s{seq}"),
                user_id: "u".into(),
                kind: RevocationKind::Revoked,
                reason: "r".into(),
                revoked_by: None,
                revoked_at: 0,
                expires_at: 1,
            },
            failures: 0,
            due: Instant::now(),
        }
    }

    #[test]
    fn the_checkpoint_never_passes_a_pending_event() {
        let mut position = Position { log_id: "abc".into(), read_through: 9, pending: BTreeMap::new(), saved: None };
        assert_eq!(position.checkpoint(), "abc.9");
        position.pending.insert(4, event(4));
        position.pending.insert(7, event(7));
        assert_eq!(position.checkpoint(), "abc.3");
        position.pending.remove(&4);
        assert_eq!(position.checkpoint(), "abc.6");
    }
}
