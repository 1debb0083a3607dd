//! Idle slides held in memory and committed together, off the request path.
//!
//! A validation that slides a session's idle timeout used to be a write transaction of its own.
//! On redb that is the single writer's turn, a copy-on-write of the record's B-tree path and a
//! commit, for every validation of a session not seen within `session.idle_slide_step` (all of
//! them, in a store of a million sessions). Now [`SessionStore::touch`] only records the slide
//! here. The next write transaction of any kind applies every pending slide first, in the same
//! transaction, and a flush scheduled [`FLUSH_AFTER`] after the first pending slide makes sure
//! one comes. So a burst of validations costs one write transaction, and every other write (an
//! end, a compare-and-swap, the sweep) sees the slides before it decides anything.
//!
//! Reads merge the pending slide into the record they return, so a validation sees the latest
//! slide at once. A slide never moves `idle_expires_at` or `last_accessed_at` backwards and is
//! never applied to an ended session. Slides are committed with `Durability::None` unless the
//! transaction that applies them is durable anyway: a crash or a kill loses at most the slides of
//! the last few milliseconds, which only makes those sessions look idle sooner, never valid longer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;

/// How long a slide may wait in memory before a flush commits it.
pub(super) const FLUSH_AFTER: Duration = Duration::from_millis(20);
/// Pending slides at which a touch commits them itself rather than adding more.
pub(super) const MAX_PENDING: usize = 16_384;

/// Slides not yet written, by token hash.
#[derive(Default)]
pub(super) struct PendingSlides {
    slides: Mutex<HashMap<TokenHash, Touch>>,
    flush_scheduled: AtomicBool,
}

impl std::fmt::Debug for PendingSlides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSlides").field("pending", &self.len()).finish()
    }
}

/// Merges `touch` into `into`: the later of each time, the newest address.
fn merge(into: &mut Touch, touch: Touch) {
    into.last_accessed_at = into.last_accessed_at.max(touch.last_accessed_at);
    into.idle_expires_at = into.idle_expires_at.max(touch.idle_expires_at);
    if touch.ip_address.is_some() {
        into.ip_address = touch.ip_address;
    }
}

/// Applies `touch` to `record` if it is active, as the store's `touch` always did.
pub(super) fn apply(record: &mut SessionRecord, touch: &Touch) -> bool {
    if record.state.is_terminal() {
        return false;
    }
    record.idle_expires_at = record.idle_expires_at.max(touch.idle_expires_at);
    record.last_accessed_at = record.last_accessed_at.max(touch.last_accessed_at);
    if let Some(ip) = &touch.ip_address {
        record.ip_address = Some(ip.clone());
    }
    true
}

impl PendingSlides {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenHash, Touch>> {
        // The map holds plain values; a panic elsewhere cannot leave it half-written.
        self.slides.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a slide; returns how many are pending now.
    pub(super) fn add(&self, hash: TokenHash, touch: Touch) -> usize {
        let mut slides = self.lock();
        match slides.get_mut(&hash) {
            Some(pending) => merge(pending, touch),
            None => {
                slides.insert(hash, touch);
            }
        }
        slides.len()
    }

    /// Whether the caller should schedule a flush (true once per batch).
    pub(super) fn claim_flush(&self) -> bool {
        !self.flush_scheduled.swap(true, Ordering::AcqRel)
    }

    /// Takes every pending slide for the write transaction that will apply them.
    pub(super) fn take(&self) -> HashMap<TokenHash, Touch> {
        self.flush_scheduled.store(false, Ordering::Release);
        let mut slides = self.lock();
        if slides.is_empty() { HashMap::new() } else { std::mem::take(&mut *slides) }
    }

    /// Puts back slides whose transaction did not commit (newer ones win).
    pub(super) fn restore(&self, taken: HashMap<TokenHash, Touch>) {
        let mut slides = self.lock();
        for (hash, touch) in taken {
            match slides.get_mut(&hash) {
                Some(pending) => merge(pending, touch),
                None => {
                    slides.insert(hash, touch);
                }
            }
        }
    }

    /// `record` with its pending slide, if any.
    pub(super) fn read_through(&self, mut record: SessionRecord) -> SessionRecord {
        if let Some(touch) = self.lock().get(&record.token_hash) {
            apply(&mut record, touch);
        }
        record
    }

    /// Slides pending now.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Writes `slides` in `tx`: each to its session if it is still stored and active. A slide that
/// cannot be written (an unreadable record) is dropped with a warning, so that it can never
/// stop the write it rides with, nor every write after it.
pub(super) fn write_slides(tx: &WriteTransaction, slides: &HashMap<TokenHash, Touch>) {
    for (hash, touch) in slides {
        let written = load(tx, hash).and_then(|found| match found {
            Some(mut record) => {
                if apply(&mut record, touch) {
                    let retain = record.retain_until;
                    save(tx, &record, retain)?;
                }
                Ok(())
            }
            None => Ok(()),
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "embedded store: an idle slide could not be written; dropped");
        }
    }
}
