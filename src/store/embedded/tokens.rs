//! [`TokenStore`] in redb: refresh leases, refresh records, checkpoints.

use super::*;

pub(super) fn parse_lease(bytes: &[u8]) -> Result<RefreshLease> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored refresh lease is unreadable", e))
}

pub(super) fn parse_record(bytes: &[u8]) -> Result<RefreshRecord> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored refresh record is unreadable", e))
}

// Leases are committed with `Durability::None`: a crash loses them, and a lease whose holder
// crashed means nothing. Records are `Immediate`, like every other record of what happened.
#[async_trait]
impl TokenStore for EmbeddedStore {
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> Result<LeaseOutcome> {
        let lease = lease.clone();
        self.write(Durability::None, move |tx| {
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let current = match leases.get(lease.session_id.as_str()).map_err(unavailable)? {
                Some(bytes) => Some(parse_lease(bytes.value())?),
                None => None,
            };
            if let Some(current) = current.filter(|c| c.expires_at > now) {
                return Ok(LeaseOutcome::Held(current));
            }
            let bytes = serde_json::to_vec(&lease).map_err(Error::internal)?;
            leases.insert(lease.session_id.as_str(), bytes.as_slice()).map_err(unavailable)?;
            Ok(LeaseOutcome::Acquired)
        })
        .await
    }

    async fn renew_lease(&self, session_id: &str, holder: &str, expires_at: Millis, now: Millis) -> Result<bool> {
        let (session_id, holder) = (session_id.to_owned(), holder.to_owned());
        self.write(Durability::None, move |tx| {
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let current = match leases.get(session_id.as_str()).map_err(unavailable)? {
                Some(bytes) => parse_lease(bytes.value())?,
                None => return Ok(false),
            };
            if current.holder != holder || current.expires_at <= now {
                return Ok(false);
            }
            let renewed = RefreshLease { expires_at: current.expires_at.max(expires_at), ..current };
            let bytes = serde_json::to_vec(&renewed).map_err(Error::internal)?;
            leases.insert(session_id.as_str(), bytes.as_slice()).map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn release_lease(&self, session_id: &str, holder: &str) -> Result<()> {
        let (session_id, holder) = (session_id.to_owned(), holder.to_owned());
        self.write(Durability::None, move |tx| {
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let held = match leases.get(session_id.as_str()).map_err(unavailable)? {
                Some(bytes) => parse_lease(bytes.value())?.holder == holder,
                None => false,
            };
            if held {
                leases.remove(session_id.as_str()).map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> Result<()> {
        let record = record.clone();
        self.write(Durability::Immediate, move |tx| {
            let mut records = tx.open_table(REFRESH_RECORDS).map_err(unavailable)?;
            let mut expiry = tx.open_table(REFRESH_EXPIRY).map_err(unavailable)?;
            let bytes = serde_json::to_vec(&record).map_err(Error::internal)?;
            let session = record.session_id.as_str();
            records.insert((session, record.record_id.as_str()), bytes.as_slice()).map_err(unavailable)?;
            expiry.insert((at(record.expires_at), session, record.record_id.as_str()), ()).map_err(unavailable)?;
            let excess: Vec<RefreshRecord> = {
                let mut all = Vec::new();
                for entry in records.range((session, "")..=(session, "\u{10ffff}")).map_err(unavailable)? {
                    let (_, value) = entry.map_err(unavailable)?;
                    all.push(parse_record(value.value())?);
                }
                let excess = all.len().saturating_sub(keep.max(1));
                all.into_iter().take(excess).collect()
            };
            for old in &excess {
                records.remove((session, old.record_id.as_str())).map_err(unavailable)?;
                expiry.remove((at(old.expires_at), session, old.record_id.as_str())).map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn refresh_history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>> {
        let store = self.clone();
        let session_id = session_id.to_owned();
        tokio::task::spawn_blocking(move || {
            let tx = store.db.begin_read().map_err(unavailable)?;
            let records = tx.open_table(REFRESH_RECORDS).map_err(unavailable)?;
            let mut out = Vec::new();
            let session = session_id.as_str();
            for entry in records.range((session, "")..=(session, "\u{10ffff}")).map_err(unavailable)?.rev().take(limit)
            {
                let (_, value) = entry.map_err(unavailable)?;
                out.push(parse_record(value.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::internal_from("embedded store task failed", e))?
    }

    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, String, String)> = {
                let expiry = tx.open_table(REFRESH_EXPIRY).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in expiry.range(..(at(now).saturating_add(1), "", "")).map_err(unavailable)?.take(limit) {
                    let (k, _) = entry.map_err(unavailable)?;
                    let (when, session, record) = k.value();
                    due.push((when, session.to_owned(), record.to_owned()));
                }
                due
            };
            let mut expiry = tx.open_table(REFRESH_EXPIRY).map_err(unavailable)?;
            let mut records = tx.open_table(REFRESH_RECORDS).map_err(unavailable)?;
            for (when, session, record) in &due {
                expiry.remove((*when, session.as_str(), record.as_str())).map_err(unavailable)?;
                records.remove((session.as_str(), record.as_str())).map_err(unavailable)?;
            }
            // Leases of crashed holders: drop the expired ones.
            let mut leases = tx.open_table(REFRESH_LEASES).map_err(unavailable)?;
            let mut stale = Vec::new();
            for entry in leases.iter().map_err(unavailable)? {
                let (k, v) = entry.map_err(unavailable)?;
                if parse_lease(v.value())?.expires_at <= now {
                    stale.push(k.value().to_owned());
                }
            }
            for key in stale {
                leases.remove(key.as_str()).map_err(unavailable)?;
            }
            Ok(due.len())
        })
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>> {
        let store = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let tx = store.db.begin_read().map_err(unavailable)?;
            let table = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
            Ok(table.get(name.as_str()).map_err(unavailable)?.map(|v| v.value().to_owned()))
        })
        .await
        .map_err(|e| Error::internal_from("embedded store task failed", e))?
    }

    async fn save_checkpoint(&self, name: &str, value: &str) -> Result<()> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
            table.insert(name.as_str(), value.as_str()).map_err(unavailable)?;
            Ok(())
        })
        .await
    }
}
