//! [`SessionStore`] in redb: records and their indexes, the revocation log.

use super::*;

pub(super) fn meta_u64(meta: &impl redb::ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<u64> {
    match meta.get(key).map_err(unavailable)? {
        Some(bytes) => {
            let raw: [u8; 8] =
                bytes.value().try_into().map_err(|_| Error::internal("embedded store: malformed log metadata"))?;
            Ok(u64::from_be_bytes(raw))
        }
        None => Ok(0),
    }
}

pub(super) fn set_meta_u64(tx: &WriteTransaction, key: &str, value: u64) -> Result<()> {
    let mut meta = tx.open_table(REVOCATION_META).map_err(unavailable)?;
    meta.insert(key, value.to_be_bytes().as_slice()).map_err(unavailable)?;
    Ok(())
}

/// Appends the event of `end` (if it has one) for the just-ended `record`, in the caller's
/// transaction, so the end and its event commit together or not at all.
pub(super) fn append_in(tx: &WriteTransaction, end: &EndSession, record: &SessionRecord) -> Result<()> {
    let head = meta_u64(&tx.open_table(REVOCATION_META).map_err(unavailable)?, META_HEAD)?;
    let seq = head + 1;
    let Some(event) = end.event_for(record, seq) else { return Ok(()) };
    let bytes = serde_json::to_vec(&event).map_err(Error::internal)?;
    tx.open_table(REVOCATION_LOG).map_err(unavailable)?.insert(seq, bytes.as_slice()).map_err(unavailable)?;
    tx.open_table(REVOCATION_SESSIONS)
        .map_err(unavailable)?
        .insert(event.session_id.as_str(), seq)
        .map_err(unavailable)?;
    tx.open_table(REVOCATION_USERS)
        .map_err(unavailable)?
        .insert((event.user_id.as_str(), seq), ())
        .map_err(unavailable)?;
    tx.open_table(REVOCATION_EXPIRY)
        .map_err(unavailable)?
        .insert((at(event.expires_at), seq), ())
        .map_err(unavailable)?;
    set_meta_u64(tx, META_HEAD, seq)
}

pub(super) fn parse_event(bytes: &[u8]) -> Result<RevocationEvent> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal_from("stored revocation event is unreadable", e))
}

pub(super) fn load(tx: &WriteTransaction, hash: &TokenHash) -> Result<Option<SessionRecord>> {
    let table = tx.open_table(SESSIONS).map_err(unavailable)?;
    let found = table.get(hash.as_slice()).map_err(unavailable)?;
    match found {
        Some(bytes) => SessionRecord::from_bytes(bytes.value()).map(Some),
        None => Ok(None),
    }
}

/// Writes a record that already exists, moving its expiry entry if retention changed.
pub(super) fn save(tx: &WriteTransaction, record: &SessionRecord, old_retain_until: Millis) -> Result<()> {
    let mut sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
    sessions.insert(record.token_hash.as_slice(), record.to_bytes(RECORD_FORMAT)?.as_slice()).map_err(unavailable)?;
    if old_retain_until != record.retain_until {
        let mut expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
        expiry.remove((at(old_retain_until), record.token_hash.as_slice())).map_err(unavailable)?;
        expiry.insert((at(record.retain_until), record.token_hash.as_slice()), ()).map_err(unavailable)?;
    }
    Ok(())
}

/// Indexes `add` under `session` and drops the entries of `drop` that point at it.
pub(super) fn reindex_upstream(
    tx: &WriteTransaction,
    session: &TokenHash,
    drop: &[String],
    add: &[String],
) -> Result<()> {
    let mut upstream = tx.open_table(UPSTREAM_TOKENS).map_err(unavailable)?;
    for hex_hash in drop.iter().filter(|h| !add.contains(h)) {
        let Ok(key) = hex::decode(hex_hash) else { continue };
        let points_here = upstream.get(key.as_slice()).map_err(unavailable)?.is_some_and(|v| v.value() == session);
        if points_here {
            upstream.remove(key.as_slice()).map_err(unavailable)?;
        }
    }
    for hex_hash in add {
        let Ok(key) = hex::decode(hex_hash) else { continue };
        upstream.insert(key.as_slice(), session.as_slice()).map_err(unavailable)?;
    }
    Ok(())
}

pub(super) fn end_in(tx: &WriteTransaction, hash: &TokenHash, end: &EndSession) -> Result<EndOutcome> {
    let Some(mut record) = load(tx, hash)? else { return Ok(EndOutcome::NotFound) };
    if record.state.is_terminal() {
        return Ok(EndOutcome::AlreadyEnded(record));
    }
    let old_retain = record.retain_until;
    record.state = end.state;
    record.end_reason = Some(end.reason.clone());
    record.ended_at = Some(end.at);
    record.retain_until = end.retain_until_for(&record);
    record.version += 1;
    save(tx, &record, old_retain)?;
    append_in(tx, end, &record)?;
    Ok(EndOutcome::Ended(record))
}

pub(super) fn user_records(tx: &WriteTransaction, user_id: &str) -> Result<Vec<SessionRecord>> {
    let users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
    let mut records = Vec::new();
    for entry in users.range((user_id, "")..).map_err(unavailable)? {
        let (key, hash) = entry.map_err(unavailable)?;
        if key.value().0 != user_id {
            break;
        }
        if let Some(record) = load(tx, &to_hash(hash.value())?)? {
            records.push(record);
        }
    }
    Ok(records)
}

#[async_trait]
impl RevocationLog for EmbeddedStore {
    fn log_id(&self) -> String {
        self.log_id.to_string()
    }

    async fn read_revocations(&self, after: u64, limit: usize) -> Result<LogRead> {
        let (tx, position) = self.position()?;
        let log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
        let mut events = Vec::new();
        if limit > 0 {
            for entry in log.range(after.saturating_add(1)..).map_err(unavailable)?.take(limit) {
                let (_, bytes) = entry.map_err(unavailable)?;
                events.push(parse_event(bytes.value())?);
            }
        }
        Ok(LogRead { events, position })
    }

    async fn revocation_entry(&self, session_id: &str, now: Millis) -> Result<Option<RevocationEvent>> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let by_session = tx.open_table(REVOCATION_SESSIONS).map_err(unavailable)?;
        let Some(seq) = by_session.get(session_id).map_err(unavailable)?.map(|v| v.value()) else { return Ok(None) };
        let log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
        let event = match log.get(seq).map_err(unavailable)? {
            Some(bytes) => parse_event(bytes.value())?,
            None => return Ok(None),
        };
        Ok(Some(event).filter(|e| e.expires_at > now))
    }

    async fn list_revocations(&self, query: RevocationQuery<'_>) -> Result<RevocationPage> {
        let RevocationQuery { user_id, after, through, limit, now } = query;
        let (tx, position) = self.position()?;
        let through = through.unwrap_or(position.head);
        let log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
        let mut entries = Vec::new();
        if after >= through {
            return Ok(RevocationPage { entries, position });
        }
        let mut keep = |bytes: &[u8]| -> Result<bool> {
            let event = parse_event(bytes)?;
            if event.expires_at > now {
                entries.push(event);
            }
            Ok(entries.len() < limit)
        };
        match user_id {
            Some(user) => {
                let users = tx.open_table(REVOCATION_USERS).map_err(unavailable)?;
                for entry in users.range((user, after + 1)..=(user, through)).map_err(unavailable)? {
                    let (key, _) = entry.map_err(unavailable)?;
                    let Some(bytes) = log.get(key.value().1).map_err(unavailable)? else { continue };
                    if !keep(bytes.value())? {
                        break;
                    }
                }
            }
            None => {
                for entry in log.range(after + 1..=through).map_err(unavailable)? {
                    let (_, bytes) = entry.map_err(unavailable)?;
                    if !keep(bytes.value())? {
                        break;
                    }
                }
            }
        }
        Ok(RevocationPage { entries, position })
    }

    async fn purge_revocations(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, u64)> = {
                let expiry = tx.open_table(REVOCATION_EXPIRY).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in expiry.range(..=(at(now), u64::MAX)).map_err(unavailable)?.take(limit) {
                    let (key, _) = entry.map_err(unavailable)?;
                    due.push(key.value());
                }
                due
            };
            if due.is_empty() {
                return Ok(0);
            }
            let mut trimmed = meta_u64(&tx.open_table(REVOCATION_META).map_err(unavailable)?, META_TRIMMED)?;
            let mut expiry = tx.open_table(REVOCATION_EXPIRY).map_err(unavailable)?;
            let mut log = tx.open_table(REVOCATION_LOG).map_err(unavailable)?;
            let mut by_session = tx.open_table(REVOCATION_SESSIONS).map_err(unavailable)?;
            let mut by_user = tx.open_table(REVOCATION_USERS).map_err(unavailable)?;
            for (until, seq) in &due {
                expiry.remove((*until, *seq)).map_err(unavailable)?;
                let removed = log.remove(*seq).map_err(unavailable)?;
                if let Some(bytes) = removed {
                    let event = parse_event(bytes.value())?;
                    by_session.remove(event.session_id.as_str()).map_err(unavailable)?;
                    by_user.remove((event.user_id.as_str(), *seq)).map_err(unavailable)?;
                }
                trimmed = trimmed.max(*seq);
            }
            drop((expiry, log, by_session, by_user));
            set_meta_u64(tx, META_TRIMMED, trimmed)?;
            Ok(due.len())
        })
        .await
    }
}

/// Ends the oldest of `record`'s user's active sessions beyond `cap - 1` with `eviction`, then
/// inserts `record` with its index entries, in `tx`.
fn create_in(
    tx: &WriteTransaction,
    record: &SessionRecord,
    cap: u32,
    eviction: &EndSession,
) -> Result<Vec<SessionRecord>> {
    let mut active: Vec<SessionRecord> =
        user_records(tx, &record.user_id)?.into_iter().filter(|s| s.is_active_at(eviction.at)).collect();
    active.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
    let excess = (active.len() + 1).saturating_sub(cap as usize);
    let mut evicted = Vec::with_capacity(excess);
    for old in active.iter().take(excess) {
        if let EndOutcome::Ended(ended) = end_in(tx, &old.token_hash, eviction)? {
            evicted.push(ended);
        }
    }
    let hash = record.token_hash.as_slice();
    tx.open_table(SESSIONS)
        .map_err(unavailable)?
        .insert(hash, record.to_bytes(RECORD_FORMAT)?.as_slice())
        .map_err(unavailable)?;
    tx.open_table(SESSION_IDS).map_err(unavailable)?.insert(record.session_id.as_str(), hash).map_err(unavailable)?;
    tx.open_table(USER_SESSIONS)
        .map_err(unavailable)?
        .insert((record.user_id.as_str(), record.session_id.as_str()), hash)
        .map_err(unavailable)?;
    tx.open_table(SESSION_EXPIRY)
        .map_err(unavailable)?
        .insert((at(record.retain_until), hash), ())
        .map_err(unavailable)?;
    tx.open_table(SESSION_DEADLINES)
        .map_err(unavailable)?
        .insert((at(record.deadline()), hash), ())
        .map_err(unavailable)?;
    reindex_upstream(tx, &record.token_hash, &[], &record.upstream_hashes)?;
    Ok(evicted)
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn create(&self, record: SessionRecord, cap: u32, eviction: EndSession) -> Result<Vec<SessionRecord>> {
        self.write(Durability::Immediate, move |tx| create_in(tx, &record, cap, &eviction)).await
    }

    async fn create_recorded(
        &self,
        record: SessionRecord,
        cap: u32,
        eviction: EndSession,
        with: CreateWith,
    ) -> Result<CreateOutcome> {
        let event = with.event.map(|event| event.to_bytes().map(|bytes| (event, bytes))).transpose()?;
        let limit = with.limit;
        let max_keys = self.max_limiter_keys;
        self.write(Durability::Immediate, move |tx| {
            if let Some(limit) = &limit {
                let decision = limits::decide_in(tx, &limit.rule, &limit.key, 1, limit.now, true, max_keys)?;
                if !decision.allowed {
                    return Ok(CreateOutcome::Refused(decision));
                }
            }
            let evicted = create_in(tx, &record, cap, &eviction)?;
            if let Some((event, bytes)) = &event {
                events::append_in(tx, event, bytes)?;
            }
            Ok(CreateOutcome::Created(evicted))
        })
        .await
    }

    async fn get_by_token(&self, token_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        // A read is a few microseconds from redb's cache: not worth a thread hop.
        self.read_session(token_hash)
    }

    async fn get_by_upstream(&self, upstream_hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let hash = {
            let tx = self.db.begin_read().map_err(unavailable)?;
            let upstream = tx.open_table(UPSTREAM_TOKENS).map_err(unavailable)?;
            match upstream.get(upstream_hash.as_slice()).map_err(unavailable)? {
                Some(hash) => to_hash(hash.value())?,
                None => return Ok(None),
            }
        };
        self.read_session(&hash)
    }

    async fn get_by_id(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let hash = {
            let tx = self.db.begin_read().map_err(unavailable)?;
            let ids = tx.open_table(SESSION_IDS).map_err(unavailable)?;
            match ids.get(session_id).map_err(unavailable)? {
                Some(hash) => to_hash(hash.value())?,
                None => return Ok(None),
            }
        };
        self.read_session(&hash)
    }

    async fn list_user(&self, user_id: &str) -> Result<Vec<SessionRecord>> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
        let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
        let mut records = Vec::new();
        for entry in users.range((user_id, "")..).map_err(unavailable)? {
            let (key, hash) = entry.map_err(unavailable)?;
            if key.value().0 != user_id {
                break;
            }
            if let Some(bytes) = sessions.get(hash.value()).map_err(unavailable)? {
                records.push(self.slides.read_through(SessionRecord::from_bytes(bytes.value())?));
            }
        }
        Ok(records)
    }

    async fn touch(&self, token_hash: &TokenHash, touch: Touch) -> Result<()> {
        // Held in memory and written by the next write transaction (see `slides`).
        let pending = self.slides.add(*token_hash, touch);
        if pending >= slides::MAX_PENDING {
            return self.write(Durability::None, |_| Ok(())).await;
        }
        if self.slides.claim_flush() {
            let store = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(slides::FLUSH_AFTER).await;
                if store.slides.len() == 0 {
                    return;
                }
                if let Err(e) = store.write(Durability::None, |_| Ok(())).await {
                    tracing::warn!(error = %e, "embedded store: idle slides not written yet; the next write retries them");
                }
            });
        }
        Ok(())
    }

    async fn compare_and_swap(&self, record: &SessionRecord, expected_version: u64) -> Result<CasOutcome> {
        let next = record.clone();
        self.write(Durability::Immediate, move |tx| {
            let Some(current) = load(tx, &next.token_hash)? else { return Ok(CasOutcome::NotFound) };
            if current.version != expected_version || current.state.is_terminal() {
                return Ok(CasOutcome::Conflict(Box::new(current)));
            }
            let next = next.swapped_over(&current);
            save(tx, &next, current.retain_until)?;
            reindex_upstream(tx, &next.token_hash, &current.upstream_hashes, &next.upstream_hashes)?;
            Ok(CasOutcome::Swapped)
        })
        .await
    }

    async fn end(&self, token_hash: &TokenHash, end: EndSession) -> Result<EndOutcome> {
        let hash = *token_hash;
        self.write(Durability::Immediate, move |tx| end_in(tx, &hash, &end)).await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<usize> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, TokenHash)> = {
                let expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in expiry.range(..=(at(now), [0xffu8; 32].as_slice())).map_err(unavailable)?.take(limit) {
                    let (key, _) = entry.map_err(unavailable)?;
                    let (until, hash) = key.value();
                    due.push((until, to_hash(hash)?));
                }
                due
            };
            let mut expiry = tx.open_table(SESSION_EXPIRY).map_err(unavailable)?;
            let mut sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut ids = tx.open_table(SESSION_IDS).map_err(unavailable)?;
            let mut users = tx.open_table(USER_SESSIONS).map_err(unavailable)?;
            let mut purged = Vec::new();
            for (until, hash) in &due {
                expiry.remove((*until, hash.as_slice())).map_err(unavailable)?;
                let removed = sessions.remove(hash.as_slice()).map_err(unavailable)?;
                if let Some(bytes) = removed {
                    let record = SessionRecord::from_bytes(bytes.value())?;
                    ids.remove(record.session_id.as_str()).map_err(unavailable)?;
                    users.remove((record.user_id.as_str(), record.session_id.as_str())).map_err(unavailable)?;
                    purged.push(record);
                }
            }
            for record in &purged {
                reindex_upstream(tx, &record.token_hash, &record.upstream_hashes, &[])?;
            }
            Ok(due.len())
        })
        .await
    }

    async fn take_timed_out(&self, now: Millis, limit: usize) -> Result<TimedOut> {
        self.write(Durability::Immediate, move |tx| {
            let due: Vec<(u64, TokenHash)> = {
                let deadlines = tx.open_table(SESSION_DEADLINES).map_err(unavailable)?;
                let mut due = Vec::new();
                for entry in deadlines.range(..=(at(now), [0xffu8; 32].as_slice())).map_err(unavailable)?.take(limit) {
                    let (key, _) = entry.map_err(unavailable)?;
                    let (deadline, hash) = key.value();
                    due.push((deadline, to_hash(hash)?));
                }
                due
            };
            let mut deadlines = tx.open_table(SESSION_DEADLINES).map_err(unavailable)?;
            let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut found = TimedOut { sessions: Vec::new(), walked: due.len() };
            for (deadline, hash) in &due {
                deadlines.remove((*deadline, hash.as_slice())).map_err(unavailable)?;
                let Some(bytes) = sessions.get(hash.as_slice()).map_err(unavailable)? else { continue };
                let record = SessionRecord::from_bytes(bytes.value())?;
                if record.state.is_terminal() {
                    continue;
                }
                if record.deadline() > now {
                    deadlines.insert((at(record.deadline()), hash.as_slice()), ()).map_err(unavailable)?;
                } else {
                    found.sessions.push(record);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn count(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
        sessions.len().map_err(unavailable)
    }

    /// Reads every record in one read transaction on a blocking thread: the cost grows with
    /// all stored sessions, which is why only the periodic gauge sampler calls it. Readers
    /// never block the writer in redb.
    async fn count_active(&self, now: Millis) -> Result<Option<u64>> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(unavailable)?;
            let sessions = tx.open_table(SESSIONS).map_err(unavailable)?;
            let mut active = 0;
            for entry in sessions.iter().map_err(unavailable)? {
                let (_, bytes) = entry.map_err(unavailable)?;
                if SessionRecord::from_bytes(bytes.value())?.is_active_at(now) {
                    active += 1;
                }
            }
            Ok(Some(active))
        })
        .await
        .map_err(|e| Error::internal_from("embedded store task failed", e))?
    }

    async fn ping(&self) -> Result<()> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        tx.open_table(SESSIONS).map_err(unavailable)?;
        Ok(())
    }
}
