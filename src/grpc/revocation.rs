//! RevocationService adapter: proto in, domain calls, proto out.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::pb::revocation_service_server::RevocationService;
use crate::grpc::pb::{self, revoke_session_request};
use crate::grpc::validate;

const TOPIC: &str = "is built by the revocation issue (cascading revocation and the watch stream)";

/// The RevocationService implementation.
#[derive(Clone, Debug, Default)]
pub struct RevocationAdapter;

fn unimplemented(rpc: &str) -> Status {
    Error::Unimplemented(format!("RevocationService.{rpc} {TOPIC}")).into()
}

/// The stream type of WatchRevocations.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRevocationsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RevocationService for RevocationAdapter {
    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        use revoke_session_request::Selector;
        let r = request.into_inner();
        match &r.selector {
            Some(Selector::SessionToken(t)) => validate::session_token("session_token", t)?,
            Some(Selector::SessionId(i)) => validate::required_id("session_id", i)?,
            None => {
                return Err(Error::invalid("selector", "set session_id or session_token").into());
            }
        }
        validate::text("reason", &r.reason)?;
        validate::optional_id("revoked_by", &r.revoked_by)?;
        Err(unimplemented("RevokeSession"))
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
        Err(unimplemented("RevokeUserSessions"))
    }

    async fn is_revoked(
        &self,
        request: Request<pb::IsRevokedRequest>,
    ) -> Result<Response<pb::IsRevokedResponse>, Status> {
        validate::required_id("session_id", &request.get_ref().session_id)?;
        Err(unimplemented("IsRevoked"))
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let r = request.into_inner();
        validate::optional_id("user_id", &r.user_id)?;
        validate::page_size("page_size", r.page_size, 100, validate::MAX_PAGE_SIZE)?;
        Err(unimplemented("ListRevocations"))
    }

    type WatchRevocationsStream = WatchStream;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let r = request.into_inner();
        validate::optional_id("after_cursor", &r.after_cursor)?;
        validate::optional_id("user_id", &r.user_id)?;
        validate::duration("heartbeat_interval", r.heartbeat_interval.as_ref())?;
        Err(unimplemented("WatchRevocations"))
    }
}
