//! [`SecurityEventStore`] over the key space: per-user and global event indexes.

use super::*;

#[async_trait]
impl<T: Transport> SecurityEventStore for KeyspaceStore<T> {
    async fn append(&self, event: &SecurityEvent) -> Result<()> {
        self.bounded("append_event", async {
            let json = serde_json::to_string(event).map_err(Error::internal)?;
            let value = format!("{}\n{json}", event.event_type.as_str());
            let member = event_member(event);
            let at = event.occurred_at.to_string();
            match &event.user_id {
                Some(user) => {
                    // The global time index first (its own slot): an event is never stored
                    // without the entry that lets the retention purge find it.
                    let index = vec!["ZADD".into(), self.layout.events("time"), at.clone(), member];
                    self.transport.command(index, false).await?;
                    let keys = vec![self.layout.user_events("ev", user), self.layout.user_events("evi", user)];
                    let args = vec![event.event_id.clone(), value, at, event.event_id.clone()];
                    self.transport.eval(&SCRIPTS.event_append, keys, args, false).await.map(drop)
                }
                None => {
                    let keys = vec![self.layout.events("nouser"), self.layout.events("time")];
                    let args = vec![event.event_id.clone(), value, at, member];
                    self.transport.eval(&SCRIPTS.event_append, keys, args, false).await.map(drop)
                }
            }
        })
        .await
    }

    async fn user_events(&self, query: &EventQuery) -> Result<Vec<SecurityEvent>> {
        if query.from >= query.until || query.limit == 0 {
            return Ok(Vec::new());
        }
        // The exclusive upper bound, as in the memory store: the resume position when it is
        // inside the range, else `until`.
        let (upper_at, upper_id) = match &query.after {
            Some((at, id)) if *at < query.until => (*at, id.clone()),
            _ => (query.until, String::new()),
        };
        if (upper_at, upper_id.as_str()) <= (query.from, "") {
            return Ok(Vec::new());
        }
        self.bounded("user_events", async {
            let user = &query.user_id;
            let keys = vec![self.layout.user_events("ev", user), self.layout.user_events("evi", user)];
            let mut args = vec![query.from.to_string(), upper_at.to_string(), upper_id, query.limit.to_string()];
            args.extend(query.types.iter().map(|t| t.as_str().to_owned()));
            let reply = self.transport.eval(&SCRIPTS.user_events, keys, args, true).await?;
            items(reply)?
                .iter()
                .map(|value| serde_json::from_str(text(value)?).map_err(|e| malformed(&format!("security event: {e}"))))
                .collect()
        })
        .await
    }

    async fn purge_events(&self, cutoff: Millis, limit: usize) -> Result<usize> {
        self.bounded("purge_events", async {
            let time = self.layout.events("time");
            let due = self.due(time.clone(), format!("({cutoff}"), limit).await?;
            let mut deleted = 0;
            for member in due {
                let parts: Vec<&str> = member.splitn(4, '|').collect();
                let n = match parts.as_slice() {
                    ["n", id] => {
                        let keys = vec![self.layout.events("nouser"), time.clone()];
                        let args = vec![(*id).to_owned(), member.clone()];
                        integer(&self.transport.eval(&SCRIPTS.event_delete, keys, args, false).await?)?
                    }
                    ["u", _, user_hex, id] => {
                        let user = hex::decode(user_hex)
                            .ok()
                            .and_then(|b| String::from_utf8(b).ok())
                            .ok_or_else(|| malformed("security event index entry"))?;
                        let keys = vec![self.layout.user_events("ev", &user), self.layout.user_events("evi", &user)];
                        let n = integer(
                            &self
                                .transport
                                .eval(&SCRIPTS.event_delete, keys, vec![(*id).to_owned(), (*id).to_owned()], false)
                                .await?,
                        )?;
                        self.transport.command(vec!["ZREM".into(), time.clone(), member.clone()], false).await?;
                        n
                    }
                    _ => {
                        self.transport.command(vec!["ZREM".into(), time.clone(), member.clone()], false).await?;
                        0
                    }
                };
                deleted += usize::try_from(n).unwrap_or(0);
            }
            Ok(deleted)
        })
        .await
    }
}
