//! RevocationService adapter: validates every field, applies the finer authorisation, calls
//! [`Revocations`], and maps the answer.
//!
//! Who may revoke what: RevokeSession and RevokeUserSessions need the `service` or `admin` role
//! (the role table). Unlike SessionService, a `service` caller may revoke a session by
//! `session_id`, not only by token: revocation only takes access away, and the same caller may
//! already end every session of the user with RevokeUserSessions, so reserving revocation by id
//! to admins would protect nothing while keeping backends from acting on the ids they are shown
//! (the "log out that device" list, a hijack alert). Reading the list and the feed also accepts
//! `watcher`.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::pb::revocation_service_server::RevocationService;
use crate::grpc::pb::{self, revoke_session_request};
use crate::grpc::{convert, validate};
use crate::revocation::{
    Cursor, DEFAULT_REVOKE_ALL_REASON, DEFAULT_REVOKE_REASON, MAX_HEARTBEAT, MIN_HEARTBEAT, RevocationEvent,
    RevocationKind, Revocations, WatchItem, WatchRequest,
};
use crate::session::SessionRef;

mod wire;
pub use wire::RevocationServer;

/// The RevocationService implementation.
#[derive(Clone, Debug)]
pub struct RevocationAdapter {
    revocations: Revocations,
}

impl RevocationAdapter {
    /// An adapter over `revocations`.
    pub fn new(revocations: Revocations) -> RevocationAdapter {
        RevocationAdapter { revocations }
    }
}

/// The stream type of WatchRevocations.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRevocationsResponse, Status>> + Send>>;

fn kind(kind: RevocationKind) -> pb::RevocationKind {
    match kind {
        RevocationKind::Revoked => pb::RevocationKind::Revoked,
        RevocationKind::Terminated => pb::RevocationKind::Terminated,
        RevocationKind::Evicted => pb::RevocationKind::Evicted,
        RevocationKind::Hijack => pb::RevocationKind::Hijack,
        RevocationKind::RefreshFailed => pb::RevocationKind::RefreshFailed,
    }
}

/// A domain event as the contract streams it.
pub fn event(cursor: &Cursor, event: &RevocationEvent) -> pb::RevocationEvent {
    pb::RevocationEvent {
        cursor: cursor.to_string(),
        session_id: event.session_id.clone(),
        user_id: event.user_id.clone(),
        kind: kind(event.kind) as i32,
        reason: event.reason.clone(),
        revoked_by: event.revoked_by.clone().unwrap_or_default(),
        revoked_at: Some(convert::timestamp(event.revoked_at)),
        expires_at: Some(convert::timestamp(event.expires_at)),
    }
}

fn non_empty(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

#[tonic::async_trait]
impl RevocationService for RevocationAdapter {
    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        use revoke_session_request::Selector;
        let r = request.into_inner();
        let by = match &r.selector {
            Some(Selector::SessionToken(t)) => {
                validate::session_token("session_token", t)?;
                SessionRef::Token(t.clone())
            }
            Some(Selector::SessionId(i)) => {
                validate::required_id("session_id", i)?;
                SessionRef::Id(i.clone())
            }
            Some(Selector::UpstreamToken(t)) => {
                validate::upstream_token("upstream_token", t, true)?;
                SessionRef::Upstream(t.clone())
            }
            None => {
                return Err(Error::invalid("selector", "set session_id, session_token or upstream_token").into());
            }
        };
        validate::text("reason", &r.reason)?;
        validate::optional_id("revoked_by", &r.revoked_by)?;
        let reason = non_empty(&r.reason).unwrap_or(DEFAULT_REVOKE_REASON);
        let revoked = self.revocations.revoke_session(&by, reason, non_empty(&r.revoked_by)).await?;
        Ok(Response::new(pb::RevokeSessionResponse {
            event: revoked.event.as_ref().map(|e| event(&self.revocations.cursor(e.seq), e)),
            already_ended: revoked.already_ended,
        }))
    }

    async fn revoke_user_sessions(
        &self,
        request: Request<pb::RevokeUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeUserSessionsResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("user_id", &r.user_id)?;
        validate::optional_id("except_session_id", &r.except_session_id)?;
        validate::text("reason", &r.reason)?;
        validate::optional_id("revoked_by", &r.revoked_by)?;
        let reason = non_empty(&r.reason).unwrap_or(DEFAULT_REVOKE_ALL_REASON);
        let ids = self
            .revocations
            .revoke_user(&r.user_id, non_empty(&r.except_session_id), reason, non_empty(&r.revoked_by))
            .await?;
        Ok(Response::new(pb::RevokeUserSessionsResponse {
            revoked_count: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            session_ids: ids,
        }))
    }

    async fn is_revoked(
        &self,
        request: Request<pb::IsRevokedRequest>,
    ) -> Result<Response<pb::IsRevokedResponse>, Status> {
        let r = request.get_ref();
        let entry = match (r.session_id.is_empty(), r.upstream_token.is_empty()) {
            (false, true) => {
                validate::required_id("session_id", &r.session_id)?;
                self.revocations.is_revoked(&r.session_id).await?
            }
            (true, false) => {
                validate::upstream_token("upstream_token", &r.upstream_token, true)?;
                self.revocations.is_token_revoked(&r.upstream_token).await?
            }
            _ => return Err(Error::invalid("session_id", "set exactly one of session_id and upstream_token").into()),
        };
        Ok(Response::new(pb::IsRevokedResponse {
            revoked: entry.is_some(),
            event: entry.as_ref().map(|e| event(&self.revocations.cursor(e.seq), e)),
        }))
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let r = request.into_inner();
        validate::optional_id("user_id", &r.user_id)?;
        let page_size = validate::page_size("page_size", r.page_size, 100, validate::MAX_PAGE_SIZE)?;
        validate::optional_id("page_token", &r.page_token)?;
        let list = self.revocations.list(non_empty(&r.user_id), page_size as usize, non_empty(&r.page_token)).await?;
        Ok(Response::new(pb::ListRevocationsResponse {
            entries: list.entries.iter().map(|e| event(&self.revocations.cursor(e.seq), e)).collect(),
            cursor: list.cursor.to_string(),
            next_page_token: list.next_page_token.unwrap_or_default(),
        }))
    }

    type WatchRevocationsStream = WatchStream;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let items = self.watch_items(request.into_inner()).await?;
        Ok(Response::new(Box::pin(items.map(|item| Ok(watch_response(&item?))))))
    }
}

impl RevocationAdapter {
    /// Opens the feed for a WatchRevocations request, each field checked once.
    async fn watch_items(
        &self,
        r: pb::WatchRevocationsRequest,
    ) -> Result<impl Stream<Item = Result<WatchItem, Error>> + Send + 'static, Status> {
        validate::optional_id("after_cursor", &r.after_cursor)?;
        validate::optional_id("user_id", &r.user_id)?;
        let heartbeat = validate::duration("heartbeat_interval", r.heartbeat_interval.as_ref())?
            .filter(|d| !d.is_zero())
            .map(heartbeat_within_bounds)
            .transpose()?;
        let after = non_empty(&r.after_cursor).map(|c| Cursor::parse("after_cursor", c)).transpose()?;
        let watch = WatchRequest { after, user_id: non_empty(&r.user_id).map(str::to_owned), heartbeat };
        Ok(self.revocations.feed().watch(watch).await?)
    }
}

/// One message of a watch stream as the contract sends it.
fn watch_response(item: &WatchItem) -> pb::WatchRevocationsResponse {
    use pb::watch_revocations_response::Message;
    let message = match item {
        WatchItem::Event(cursor, e) => Message::Event(event(cursor, e)),
        WatchItem::Heartbeat(cursor, at) => {
            Message::Heartbeat(pb::Heartbeat { cursor: cursor.to_string(), sent_at: Some(convert::timestamp(*at)) })
        }
    };
    pb::WatchRevocationsResponse { message: Some(message) }
}

/// A requested heartbeat interval, refused outside 1 s..5 min rather than silently changed.
fn heartbeat_within_bounds(requested: Duration) -> Result<Duration, Error> {
    if (MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&requested) {
        Ok(requested)
    } else {
        Err(Error::invalid("heartbeat_interval", "must be between 1s and 5m (or unset for the default 15s)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_bounds() {
        assert!(heartbeat_within_bounds(Duration::from_millis(999)).is_err());
        assert!(heartbeat_within_bounds(Duration::from_secs(1)).is_ok());
        assert!(heartbeat_within_bounds(Duration::from_secs(300)).is_ok());
        assert!(heartbeat_within_bounds(Duration::from_secs(301)).is_err());
    }
}
