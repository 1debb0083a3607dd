//! [`SessionStore`] over the key space: records, indexes, the revocation log and its outbox.

use super::*;

#[async_trait]
impl<T: Transport> RevocationLog for KeyspaceStore<T> {
    fn log_id(&self) -> String {
        self.log_id.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn read_revocations(&self, after: u64, limit: usize) -> Result<LogRead> {
        self.bounded("read_revocations", async {
            if let Err(e) = self.drain_stale().await {
                tracing::warn!(error = %e, "stale revocation outboxes not drained; will retry");
            }
            let keys = vec![self.layout.log("meta"), self.layout.log("stream")];
            let args = vec![new_log_id(), format!("{}-0", after.saturating_add(1)), limit.to_string()];
            let mut reply = items(self.transport.eval(&SCRIPTS.read_log, keys, args, true).await?)?;
            let position = self.position(&reply)?;
            let entries = reply.pop().ok_or_else(|| malformed("log reply"))?;
            let events = items(entries)?.into_iter().map(log_event).collect::<Result<Vec<_>>>()?;
            Ok(LogRead { events, position })
        })
        .await
    }

    async fn renew_log_id(&self, seen: &str) -> Result<()> {
        self.bounded("renew_log_id", async {
            let keys = vec![self.layout.log("meta")];
            let reply =
                self.transport.eval(&SCRIPTS.renew_log_id, keys, vec![seen.to_owned(), new_log_id()], false).await?;
            self.remember_log_id(&reply)
        })
        .await
    }

    async fn revocation_entry(&self, session_id: &str, now: Millis) -> Result<Option<RevocationEvent>> {
        self.bounded("revocation_entry", async {
            let keys = vec![self.layout.log("meta"), self.layout.log("sess"), self.layout.log("stream")];
            let args = vec![new_log_id(), session_id.to_owned()];
            let mut reply = items(self.transport.eval(&SCRIPTS.log_entry, keys, args, true).await?)?.into_iter();
            let (Some(id), Some(entries)) = (reply.next(), reply.next()) else {
                return Err(malformed("log entry reply"));
            };
            self.remember_log_id(&id)?;
            match items(entries)?.into_iter().next() {
                Some(entry) => Ok(Some(log_event(entry)?).filter(|e| e.expires_at > now)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_revocations(&self, query: RevocationQuery<'_>) -> Result<RevocationPage> {
        let RevocationQuery { user_id, after, through, limit, now } = query;
        self.bounded("list_revocations", async {
            let stream = self.layout.log("stream");
            let index = user_id.map_or_else(|| stream.clone(), |user| self.layout.log(&format!("u:{user}")));
            let keys = vec![self.layout.log("meta"), stream, index];
            let args = vec![
                new_log_id(),
                after.to_string(),
                through.map(|t| t.to_string()).unwrap_or_default(),
                limit.to_string(),
                now.to_string(),
                if user_id.is_some() { "1" } else { "0" }.into(),
                format!("{}-0", after.saturating_add(1)),
            ];
            let mut reply = items(self.transport.eval(&SCRIPTS.list_log, keys, args, true).await?)?;
            let position = self.position(&reply)?;
            let entries = reply.pop().ok_or_else(|| malformed("list reply"))?;
            let entries = items(entries)?.into_iter().map(log_event).collect::<Result<Vec<_>>>()?;
            Ok(RevocationPage { entries, position })
        })
        .await
    }

    async fn purge_revocations(&self, now: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_revocations", async {
            let args = vec![now.to_string(), limit.to_string(), self.layout.log("u:")];
            let n = integer(&self.transport.eval(&SCRIPTS.purge_log, self.log_keys(), args, false).await?)?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
        .await
    }
}

#[async_trait]
impl<T: Transport> SessionStore for KeyspaceStore<T> {
    async fn create_recorded(
        &self,
        record: SessionRecord,
        cap: u32,
        eviction: EndSession,
        with: CreateWith,
    ) -> Result<CreateOutcome> {
        crate::store::create_in_steps(self, record, cap, eviction, with).await
    }

    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>> {
        let tag = hash_tag(&record.token_hash);
        if tag != shard_tag(&record.user_id) || id_tag(&record.session_id) != Some(tag.as_str()) {
            return Err(Error::internal("session token, id and user route to different shards"));
        }
        self.bounded("create", async {
            // The index entries first: a record never exists without them.
            let due =
                vec!["ZADD".into(), self.layout.due(), record.retain_until.to_string(), due_member(&record.token_hash)];
            self.transport.command(due, false).await?;
            let deadline = vec![
                "ZADD".into(),
                self.layout.deadlines(),
                record.deadline().to_string(),
                due_member(&record.token_hash),
            ];
            self.transport.command(deadline, false).await?;
            self.index_upstream(&record).await?;
            if eviction.kind.is_some() {
                self.mark_outbox(&tag).await?;
            }
            let hash_hex = hex::encode(record.token_hash);
            let (mut keys, mut args) = self.sink(&tag);
            keys.extend([
                self.layout.record(&record.token_hash),
                self.layout.id(&tag, &record.session_id),
                self.layout.user(&tag, &record.user_id),
            ]);
            let doc = record.to_text(self.format)?;
            args.extend([
                self.layout.records(&tag),
                eviction.at.to_string(),
                cap.to_string(),
                state_name(eviction.state).into(),
                eviction.reason.clone(),
                eviction.retain_until.to_string(),
                hash_hex,
                doc,
                record.session_id.clone(),
                record.user_id.clone(),
                record.created_at.to_string(),
                record.absolute_expires_at.to_string(),
                record.idle_expires_at.to_string(),
                record.last_accessed_at.to_string(),
                record.retain_until.to_string(),
                record.version.to_string(),
                state_name(record.state).into(),
                eviction.kind.map_or("", RevocationKind::as_str).to_owned(),
                encode_by(eviction.revoked_by.as_deref()),
            ]);
            let reply = items(self.transport.eval(&SCRIPTS.create, keys, args, false).await?)?;
            if let [Reply::Data(marker), key] = reply.as_slice()
                && marker.as_slice() == b"!log"
            {
                return Err(log_unwritable(text(key)?));
            }
            let evicted = reply.into_iter().map(required).collect::<Result<Vec<_>>>()?;
            for ended in &evicted {
                self.lower_due_after_write(&ended.token_hash, ended.retain_until).await;
            }
            if !evicted.is_empty() {
                self.drain_after_write(&tag).await;
            }
            Ok(evicted)
        })
        .await
    }

    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        self.bounded("get_by_token", async {
            record(self.transport.command(vec!["HGETALL".into(), self.layout.record(token_hash)], true).await?)
        })
        .await
    }

    async fn get_by_upstream(&self, upstream_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let member = self
            .bounded("get_by_upstream", async {
                let args = vec!["GET".into(), self.layout.upstream(&hex::encode(upstream_hash))];
                match self.transport.command(args, true).await? {
                    Reply::Nil => Ok(None),
                    reply => text(&reply).map(|m| Some(m.to_owned())),
                }
            })
            .await?;
        let hash: Option<TokenHash> = member
            .as_deref()
            .and_then(|m| m.split_once(':'))
            .and_then(|(_, hex_hash)| hex::decode(hex_hash).ok())
            .and_then(|bytes| bytes.try_into().ok());
        match hash {
            Some(hash) => self.get_by_token(&hash).await,
            None => Ok(None),
        }
    }

    async fn get_by_id(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let Some(tag) = id_tag(session_id) else { return Ok(None) };
        self.bounded("get_by_id", async {
            let keys = vec![self.layout.id(tag, session_id)];
            record(self.transport.eval(&SCRIPTS.get_by_id, keys, vec![self.layout.records(tag)], true).await?)
        })
        .await
    }

    async fn list_user(&self, user_id: &str) -> Result<Vec<SessionRecord>> {
        let tag = shard_tag(user_id);
        self.bounded("list_user", async {
            let keys = vec![self.layout.user(&tag, user_id)];
            let reply = self.transport.eval(&SCRIPTS.list_user, keys, vec![self.layout.records(&tag)], true).await?;
            items(reply)?.into_iter().map(required).collect()
        })
        .await
    }

    async fn touch(&self, token_hash: &TokenHash, touch: Touch) -> Result<()> {
        self.bounded("touch", async {
            let (changed, ip) = match touch.ip_address {
                Some(ip) => ("1".to_owned(), ip),
                None => ("0".to_owned(), String::new()),
            };
            let args = vec![touch.last_accessed_at.to_string(), touch.idle_expires_at.to_string(), changed, ip];
            self.transport.eval(&SCRIPTS.touch, vec![self.layout.record(token_hash)], args, false).await.map(drop)
        })
        .await
    }

    async fn compare_and_swap(&self, record: &SessionRecord, expected_version: u64) -> Result<CasOutcome> {
        self.bounded("compare_and_swap", async {
            self.index_upstream(record).await?;
            let doc = record.to_text(self.format)?;
            let args = vec![
                expected_version.to_string(),
                doc,
                record.absolute_expires_at.to_string(),
                record.idle_expires_at.to_string(),
                record.last_accessed_at.to_string(),
            ];
            let keys = vec![self.layout.record(&record.token_hash)];
            let (code, mut rest) = coded(self.transport.eval(&SCRIPTS.compare_and_swap, keys, args, false).await?)?;
            Ok(match code {
                0 => CasOutcome::NotFound,
                1 => CasOutcome::Swapped,
                _ => CasOutcome::Conflict(Box::new(required(rest.pop().unwrap_or(Reply::Nil))?)),
            })
        })
        .await
    }

    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome> {
        self.bounded("end", async {
            let tag = hash_tag(token_hash);
            if end.kind.is_some() {
                self.mark_outbox(&tag).await?;
            }
            let (mut keys, mut args) = self.sink(&tag);
            keys.push(self.layout.record(token_hash));
            args.extend([
                state_name(end.state).into(),
                end.reason.clone(),
                end.at.to_string(),
                end.retain_until.to_string(),
                end.kind.map_or("", RevocationKind::as_str).to_owned(),
                encode_by(end.revoked_by.as_deref()),
            ]);
            let (code, mut rest) = coded(self.transport.eval(&SCRIPTS.end, keys, args, false).await?)?;
            Ok(match code {
                0 => EndOutcome::NotFound,
                1 => {
                    let ended = required(rest.pop().unwrap_or(Reply::Nil))?;
                    self.lower_due_after_write(token_hash, ended.retain_until).await;
                    if end.kind.is_some() {
                        self.drain_after_write(&tag).await;
                    }
                    EndOutcome::Ended(ended)
                }
                3 => return Err(log_unwritable(text(rest.first().unwrap_or(&Reply::Nil))?)),
                _ => EndOutcome::AlreadyEnded(required(rest.pop().unwrap_or(Reply::Nil))?),
            })
        })
        .await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_expired", async {
            let due = self.due(self.layout.due(), now.to_string(), limit).await?;
            let results: Vec<Result<bool>> = futures_util::stream::iter(due)
                .map(|member| self.purge_one(member, now))
                .buffer_unordered(PURGE_CONCURRENCY)
                .collect()
                .await;
            let mut deleted = 0;
            for result in results {
                if result? {
                    deleted += 1;
                }
            }
            Ok(deleted)
        })
        .await
    }

    async fn take_timed_out(&self, now: Millis, limit: usize) -> Result<TimedOut> {
        self.bounded("take_timed_out", async {
            let due = self.due(self.layout.deadlines(), now.to_string(), limit).await?;
            let mut found = TimedOut { sessions: Vec::new(), walked: due.len() };
            let looked: Vec<Result<Option<SessionRecord>>> = futures_util::stream::iter(due)
                .map(|member| self.look_at_deadline(member, now))
                .buffer_unordered(PURGE_CONCURRENCY)
                .collect()
                .await;
            for record in looked {
                found.sessions.extend(record?);
            }
            Ok(found)
        })
        .await
    }

    async fn count(&self) -> Result<u64> {
        // The purge index has one entry per record (plus, briefly, entries of creations in
        // flight or that failed after their entry was written): O(1) instead of a key scan.
        self.bounded("count", async {
            let n = integer(&self.transport.command(vec!["ZCARD".into(), self.layout.due()], true).await?)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.bounded("ping", async { self.transport.command(vec!["PING".into()], true).await.map(drop) }).await
    }

    async fn server_time(&self) -> Result<Option<Millis>> {
        self.bounded("server_time", async {
            let reply = items(self.transport.command(vec!["TIME".into()], true).await?)?;
            let [seconds, micros] = reply.as_slice() else { return Err(malformed("TIME reply")) };
            let number = |r: &Reply| -> Result<i64> {
                match r {
                    Reply::Int(n) => Ok(*n),
                    other => text(other)?.parse().map_err(|_| malformed("TIME reply")),
                }
            };
            Ok(Some(number(seconds)?.saturating_mul(1000).saturating_add(number(micros)? / 1000)))
        })
        .await
    }

    async fn warn_about_settings(&self) {
        for (setting, wanted, why) in [
            ("appendonly", "yes", "a restart would lose the revocation log's tail"),
            ("maxmemory-policy", "noeviction", "eviction may drop revocation-log keys"),
        ] {
            let args = vec!["CONFIG".into(), "GET".into(), setting.into()];
            let reply = self.bounded("config_get", self.transport.command(args, true)).await;
            let value = match reply.and_then(items) {
                Ok(reply) => match reply.as_slice() {
                    [_, value] => text(value).map(str::to_owned),
                    _ => Err(malformed("CONFIG GET reply")),
                },
                Err(e) => Err(e),
            };
            match value {
                Ok(value) if value == wanted => {}
                Ok(value) => tracing::warn!(
                    setting,
                    value = %value,
                    "Redis has `{setting} {value}`: {why}, so revocations could be lost or watchers \
                     reset; set `{setting} {wanted}` on the server (CONFIG SET {setting} {wanted}, and in redis.conf)"
                ),
                Err(e) => {
                    tracing::debug!(setting, error = %e, "could not check the Redis setting (CONFIG GET refused?)")
                }
            }
        }
    }
}
