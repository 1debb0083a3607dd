//! [`SecurityEventStore`] in redb: events by time and by user.

use super::*;

/// Writes `event` (serialised as `bytes`) and its user index entry in `tx`.
pub(super) fn append_in(tx: &WriteTransaction, event: &SecurityEvent, bytes: &[u8]) -> Result<()> {
    let when = at(event.occurred_at);
    tx.open_table(SECURITY_EVENTS)
        .map_err(unavailable)?
        .insert((when, event.event_id.as_str()), bytes)
        .map_err(unavailable)?;
    if let Some(user) = &event.user_id {
        tx.open_table(USER_SECURITY_EVENTS)
            .map_err(unavailable)?
            .insert((user.as_str(), when, event.event_id.as_str()), ())
            .map_err(unavailable)?;
    }
    Ok(())
}

#[async_trait]
impl SecurityEventStore for EmbeddedStore {
    async fn append(&self, event: &SecurityEvent) -> Result<()> {
        let event = event.clone();
        let bytes = event.to_bytes()?;
        self.write(Durability::Immediate, move |tx| append_in(tx, &event, &bytes)).await
    }

    async fn user_events(&self, query: &EventQuery) -> Result<Vec<SecurityEvent>> {
        if query.from >= query.until || query.limit == 0 {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_read().map_err(unavailable)?;
        let index = tx.open_table(USER_SECURITY_EVENTS).map_err(unavailable)?;
        let events = tx.open_table(SECURITY_EVENTS).map_err(unavailable)?;
        let user = query.user_id.as_str();
        let lower = (user, at(query.from), "");
        let mut found = Vec::new();
        let mut scan = |range: redb::Range<'_, (&str, u64, &str), ()>| -> Result<()> {
            for entry in range.rev() {
                let (k, _) = entry.map_err(unavailable)?;
                let (_, when, id) = k.value();
                if let Some(bytes) = events.get((when, id)).map_err(unavailable)? {
                    let event = SecurityEvent::from_bytes(bytes.value())?;
                    if type_matches(query, event.event_type) {
                        found.push(event);
                        if found.len() >= query.limit {
                            break;
                        }
                    }
                }
            }
            Ok(())
        };
        let upper = match &query.after {
            Some((after_at, after_id)) if *after_at < query.until => (user, at(*after_at), after_id.as_str()),
            _ => (user, at(query.until), ""),
        };
        // A resume position before the range (a crafted page token) selects nothing.
        if upper <= lower {
            return Ok(Vec::new());
        }
        scan(index.range(lower..upper).map_err(unavailable)?)?;
        Ok(found)
    }

    async fn purge_events(&self, cutoff: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, String, Option<String>)> = {
                let events = tx.open_table(SECURITY_EVENTS).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in events.range(..(at(cutoff), "")).map_err(unavailable)?.take(limit) {
                    let (k, v) = entry.map_err(unavailable)?;
                    let (when, id) = k.value();
                    let user = SecurityEvent::from_bytes(v.value()).ok().and_then(|e| e.user_id);
                    due.push((when, id.to_owned(), user));
                }
                due
            };
            let mut events = tx.open_table(SECURITY_EVENTS).map_err(unavailable)?;
            let mut index = tx.open_table(USER_SECURITY_EVENTS).map_err(unavailable)?;
            for (when, id, user) in &due {
                events.remove((*when, id.as_str())).map_err(unavailable)?;
                if let Some(user) = user {
                    index.remove((user.as_str(), *when, id.as_str())).map_err(unavailable)?;
                }
            }
            Ok(due.len())
        })
        .await
    }
}
