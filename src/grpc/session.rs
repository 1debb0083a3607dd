//! SessionService adapter: proto in, domain calls, proto out.

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::pb;
use crate::grpc::pb::session_service_server::SessionService;
use crate::grpc::validate;

const TOPIC: &str = "is built by the sessions issue (SessionService on a storage layer)";

/// The SessionService implementation.
#[derive(Clone, Debug, Default)]
pub struct SessionAdapter;

fn unimplemented(rpc: &str) -> Status {
    Error::Unimplemented(format!("SessionService.{rpc} {TOPIC}")).into()
}

/// Every field of a CreateSession request within its limits.
fn validate_create(r: &pb::CreateSessionRequest) -> Result<(), Error> {
    validate::required_id("user_id", &r.user_id)?;
    validate::upstream_token("access_token", &r.access_token, true)?;
    validate::upstream_token("refresh_token", &r.refresh_token, false)?;
    validate::upstream_token("id_token", &r.id_token, false)?;
    validate::duration("expires_in", r.expires_in.as_ref())?;
    validate::string_list("scopes", &r.scopes)?;
    if let Some(fp) = &r.device_fingerprint {
        validate::fingerprint("device_fingerprint", fp)?;
    }
    validate::ip_address("ip_address", &r.ip_address)?;
    validate::text("user_agent", &r.user_agent)?;
    validate::optional_id("provider", &r.provider)?;
    validate::optional_id("token_type", &r.token_type)?;
    if validate::duration("idle_timeout", r.idle_timeout.as_ref())?.is_some_and(|d| d.is_zero()) {
        return Err(Error::invalid("idle_timeout", "must be greater than zero when set"));
    }
    if validate::duration("absolute_timeout", r.absolute_timeout.as_ref())?.is_some_and(|d| d.is_zero()) {
        return Err(Error::invalid("absolute_timeout", "must be greater than zero when set"));
    }
    validate::metadata("metadata", &r.metadata)
}

#[tonic::async_trait]
impl SessionService for SessionAdapter {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        validate_create(request.get_ref())?;
        Err(unimplemented("CreateSession"))
    }

    async fn validate_session(
        &self,
        request: Request<pb::ValidateSessionRequest>,
    ) -> Result<Response<pb::ValidateSessionResponse>, Status> {
        validate::session_token("session_token", &request.get_ref().session_token)?;
        Err(unimplemented("ValidateSession"))
    }

    async fn get_session(
        &self,
        _request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        Err(unimplemented("GetSession"))
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Result<Response<pb::ListUserSessionsResponse>, Status> {
        validate::required_id("user_id", &request.get_ref().user_id)?;
        Err(unimplemented("ListUserSessions"))
    }

    async fn update_session(
        &self,
        _request: Request<pb::UpdateSessionRequest>,
    ) -> Result<Response<pb::UpdateSessionResponse>, Status> {
        Err(unimplemented("UpdateSession"))
    }

    async fn terminate_session(
        &self,
        _request: Request<pb::TerminateSessionRequest>,
    ) -> Result<Response<pb::TerminateSessionResponse>, Status> {
        Err(unimplemented("TerminateSession"))
    }
}
