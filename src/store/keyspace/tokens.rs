//! [`TokenStore`] over the key space: refresh leases, refresh records, checkpoints.

use super::*;

impl<T: Transport> KeyspaceStore<T> {
    /// Purges one indexed refresh record; `true` if this call deleted it.
    async fn purge_record(&self, member: String, now: Millis) -> Result<bool> {
        let due = self.layout.tokens("due");
        let Some((session_id, record_id)) = member.rsplit_once('|') else {
            self.transport.command(vec!["ZREM".into(), due, member], false).await?;
            return Ok(false);
        };
        let keys = vec![self.layout.refresh("rr", session_id), self.layout.refresh("rri", session_id)];
        let args = vec![record_id.to_owned(), now.to_string()];
        let (code, rest) = coded(self.transport.eval(&SCRIPTS.purge_record, keys, args, false).await?)?;
        if code == 2 {
            let at = integer(rest.first().ok_or_else(|| malformed("purge reply"))?)?;
            self.transport.command(vec!["ZADD".into(), due, at.to_string(), member], false).await?;
            return Ok(false);
        }
        self.transport.command(vec!["ZREM".into(), due, member], false).await?;
        Ok(code == 1)
    }

    /// Deletes up to `limit` leases that expired at `now` (left by holders that stopped before
    /// releasing them). An index entry is dropped only if no acquisition re-marked it meanwhile.
    async fn purge_leases(&self, now: Millis, limit: usize) -> Result<()> {
        let index = self.layout.tokens("leases");
        for (session_id, score) in self.due_with_scores(index.clone(), now.to_string(), limit).await? {
            let keys = vec![self.layout.lease(&session_id)];
            let (code, rest) =
                coded(self.transport.eval(&SCRIPTS.purge_lease, keys, vec![now.to_string()], false).await?)?;
            if code == 2 {
                let at = integer(rest.first().ok_or_else(|| malformed("purge reply"))?)?;
                let args = vec!["ZADD".into(), index.clone(), at.to_string(), session_id];
                self.transport.command(args, false).await?;
            } else {
                let args = vec![session_id, score];
                self.transport.eval(&SCRIPTS.forget_dirty, vec![index.clone()], args, false).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl<T: Transport> TokenStore for KeyspaceStore<T> {
    async fn acquire_lease(&self, lease: &RefreshLease, now: Millis) -> Result<LeaseOutcome> {
        self.bounded("acquire_lease", async {
            // The purge-index entry first (a lease never exists without one); `LT` keeps it at
            // or before the expiry of a lease already held.
            let index = vec![
                "ZADD".into(),
                self.layout.tokens("leases"),
                "LT".into(),
                lease.expires_at.to_string(),
                lease.session_id.clone(),
            ];
            self.transport.command(index, false).await?;
            let keys = vec![self.layout.lease(&lease.session_id)];
            let args =
                vec![lease.holder.clone(), lease.version.to_string(), lease.expires_at.to_string(), now.to_string()];
            let (code, rest) = coded(self.transport.eval(&SCRIPTS.acquire_lease, keys, args, false).await?)?;
            if code == 1 {
                return Ok(LeaseOutcome::Acquired);
            }
            let [holder, version, expires_at] = rest.as_slice() else { return Err(malformed("lease reply")) };
            Ok(LeaseOutcome::Held(RefreshLease {
                session_id: lease.session_id.clone(),
                holder: text(holder)?.to_owned(),
                version: unsigned(version)?,
                expires_at: integer(expires_at)?,
            }))
        })
        .await
    }

    async fn renew_lease(&self, session_id: &str, holder: &str, expires_at: Millis, now: Millis) -> Result<bool> {
        self.bounded("renew_lease", async {
            // The index entry stays where it is: at or before the expiry, which is all the purge
            // needs (it re-checks the lease and moves the entry to the real time).
            let keys = vec![self.layout.lease(session_id)];
            let args = vec![holder.to_owned(), expires_at.to_string(), now.to_string()];
            Ok(integer(&self.transport.eval(&SCRIPTS.renew_lease, keys, args, false).await?)? == 1)
        })
        .await
    }

    async fn release_lease(&self, session_id: &str, holder: &str) -> Result<()> {
        self.bounded("release_lease", async {
            let keys = vec![self.layout.lease(session_id)];
            self.transport.eval(&SCRIPTS.release_lease, keys, vec![holder.to_owned()], false).await.map(drop)
        })
        .await
    }

    async fn append_refresh_record(&self, record: &RefreshRecord, keep: usize) -> Result<()> {
        self.bounded("append_refresh_record", async {
            let json = serde_json::to_string(record).map_err(Error::internal)?;
            let due = self.layout.tokens("due");
            // The purge-index entry first (its own slot): a record never exists without one.
            let member = record_member(&record.session_id, &record.record_id);
            let index = vec!["ZADD".into(), due.clone(), record.expires_at.to_string(), member];
            self.transport.command(index, false).await?;
            let keys =
                vec![self.layout.refresh("rr", &record.session_id), self.layout.refresh("rri", &record.session_id)];
            let args =
                vec![record.record_id.clone(), format!("{}\n{json}", record.expires_at), keep.max(1).to_string()];
            let trimmed = items(self.transport.eval(&SCRIPTS.append_record, keys, args, false).await?)?;
            if !trimmed.is_empty() {
                // Only tidiness: the purge drops entries whose record is gone without counting them.
                let mut zrem = vec!["ZREM".to_owned(), due];
                for id in &trimmed {
                    zrem.push(record_member(&record.session_id, text(id)?));
                }
                if let Err(e) = self.transport.command(zrem, false).await {
                    tracing::warn!(error = %e, "could not drop trimmed refresh records from the purge index");
                }
            }
            Ok(())
        })
        .await
    }

    async fn refresh_history(&self, session_id: &str, limit: usize) -> Result<Vec<RefreshRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.bounded("refresh_history", async {
            let keys = vec![self.layout.refresh("rr", session_id), self.layout.refresh("rri", session_id)];
            let reply = self.transport.eval(&SCRIPTS.record_history, keys, vec![limit.to_string()], true).await?;
            items(reply)?
                .iter()
                .map(|value| {
                    let value = text(value)?;
                    let json = value.split_once('\n').map_or(value, |(_, json)| json);
                    serde_json::from_str(json).map_err(|e| malformed(&format!("refresh record: {e}")))
                })
                .collect()
        })
        .await
    }

    /// Walks `{tokens}:due` up to `now` until `limit` records are deleted or nothing is due:
    /// entries whose record was trimmed are dropped without counting, so the count is exact.
    /// Expired leases go too (not counted).
    async fn purge_refresh_records(&self, now: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_refresh_records", async {
            let due = self.layout.tokens("due");
            let mut deleted = 0;
            while deleted < limit {
                let members = self.due(due.clone(), now.to_string(), limit - deleted).await?;
                if members.is_empty() {
                    break;
                }
                let results: Vec<Result<bool>> = futures_util::stream::iter(members)
                    .map(|member| self.purge_record(member, now))
                    .buffer_unordered(PURGE_CONCURRENCY)
                    .collect()
                    .await;
                for result in results {
                    if result? {
                        deleted += 1;
                    }
                }
            }
            self.purge_leases(now, limit.max(1)).await?;
            Ok(deleted)
        })
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>> {
        self.bounded("checkpoint", async {
            match self.transport.command(vec!["GET".into(), self.layout.tokens(&format!("cp:{name}"))], true).await? {
                Reply::Nil => Ok(None),
                reply => text(&reply).map(|v| Some(v.to_owned())),
            }
        })
        .await
    }

    async fn save_checkpoint(&self, name: &str, value: &str) -> Result<()> {
        self.bounded("save_checkpoint", async {
            let args = vec!["SET".into(), self.layout.tokens(&format!("cp:{name}")), value.to_owned()];
            self.transport.command(args, false).await.map(drop)
        })
        .await
    }
}
