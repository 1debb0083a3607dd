//! TokenService adapter: proto in, domain calls, proto out.

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::pb::token_service_server::TokenService;
use crate::grpc::pb::{self, get_access_token_request, refresh_session_request};
use crate::grpc::validate;

const TOPIC: &str = "is built by the tokens issue (TokenService against an OAuth2 provider)";

/// The TokenService implementation.
#[derive(Clone, Debug, Default)]
pub struct TokenAdapter;

fn selector_token(token: Option<&str>, id: Option<&str>) -> Result<(), Error> {
    match (token, id) {
        (Some(t), _) => validate::session_token("session_token", t),
        (_, Some(i)) => validate::required_id("session_id", i),
        _ => Err(Error::invalid("selector", "set session_token or session_id")),
    }
}

fn unimplemented(rpc: &str) -> Status {
    Error::Unimplemented(format!("TokenService.{rpc} {TOPIC}")).into()
}

#[tonic::async_trait]
impl TokenService for TokenAdapter {
    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        use get_access_token_request::Selector;
        let r = request.into_inner();
        match &r.selector {
            Some(Selector::SessionToken(t)) => selector_token(Some(t), None)?,
            Some(Selector::SessionId(i)) => selector_token(None, Some(i))?,
            None => selector_token(None, None)?,
        }
        Err(unimplemented("GetAccessToken"))
    }

    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::RefreshSessionResponse>, Status> {
        use refresh_session_request::Selector;
        let r = request.into_inner();
        match &r.selector {
            Some(Selector::SessionToken(t)) => selector_token(Some(t), None)?,
            Some(Selector::SessionId(i)) => selector_token(None, Some(i))?,
            None => selector_token(None, None)?,
        }
        validate::text("reason", &r.reason)?;
        Err(unimplemented("RefreshSession"))
    }

    async fn introspect_token(
        &self,
        request: Request<pb::IntrospectTokenRequest>,
    ) -> Result<Response<pb::IntrospectTokenResponse>, Status> {
        let r = request.into_inner();
        validate::upstream_token("token", &r.token, true)?;
        validate::optional_id("provider", &r.provider)?;
        Err(unimplemented("IntrospectToken"))
    }

    async fn get_refresh_history(
        &self,
        request: Request<pb::GetRefreshHistoryRequest>,
    ) -> Result<Response<pb::GetRefreshHistoryResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("session_id", &r.session_id)?;
        validate::page_size("limit", r.limit, 10, 100)?;
        Err(unimplemented("GetRefreshHistory"))
    }
}
