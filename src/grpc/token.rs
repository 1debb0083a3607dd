//! TokenService adapter: validates every field, calls [`TokenManager`], maps the answer.
//!
//! Acting by `session_id` is open to the `service` role here (unlike SessionService, where it
//! needs `admin`): the contract lets backends fetch a session's upstream token by id, and the
//! auth layer already limits TokenService to `service` and `admin`. GetRefreshHistory is
//! `admin` only (auth table).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::convert::SessionSelector as _;
use crate::grpc::pb;
use crate::grpc::pb::token_service_server::TokenService;
use crate::grpc::{convert, validate};
use crate::session::SessionRef;
use crate::token::{RefreshRecord, TokenManager};

/// The TokenService implementation.
#[derive(Clone, Debug)]
pub struct TokenAdapter {
    tokens: TokenManager,
}

impl TokenAdapter {
    /// An adapter over `tokens`.
    pub fn new(tokens: TokenManager) -> TokenAdapter {
        TokenAdapter { tokens }
    }
}

fn selector(token: Option<&String>, id: Option<&String>) -> Result<SessionRef, Error> {
    match (token, id) {
        (Some(t), _) => {
            validate::session_token("session_token", t)?;
            Ok(SessionRef::Token(t.clone()))
        }
        (_, Some(i)) => {
            validate::required_id("session_id", i)?;
            Ok(SessionRef::Id(i.clone()))
        }
        _ => Err(Error::invalid("selector", "set session_token or session_id")),
    }
}

fn record(r: &RefreshRecord) -> pb::RefreshRecord {
    pb::RefreshRecord {
        record_id: r.record_id.clone(),
        session_id: r.session_id.clone(),
        refreshed_at: Some(convert::timestamp(r.refreshed_at)),
        reason: r.reason.clone(),
        success: r.success,
        error: r.error.clone().unwrap_or_default(),
        rotated: r.rotated,
        old_access_token_hash: r.old_access_token_hash.clone(),
        new_access_token_hash: r.new_access_token_hash.clone().unwrap_or_default(),
        old_refresh_token_hash: r.old_refresh_token_hash.clone().unwrap_or_default(),
        new_refresh_token_hash: r.new_refresh_token_hash.clone().unwrap_or_default(),
        old_expires_at: r.old_expires_at.map(convert::timestamp),
        new_expires_at: r.new_expires_at.map(convert::timestamp),
        attempts: r.attempts,
        grace_period_ends_at: r.grace_period_ends_at.map(convert::timestamp),
    }
}

#[tonic::async_trait]
impl TokenService for TokenAdapter {
    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        let r = request.into_inner();
        let (token, id) = r.selector.parts();
        let by = selector(token, id)?;
        let token = self.tokens.access_token(&by).await?;
        Ok(Response::new(pb::GetAccessTokenResponse {
            access_token: token.token.expose_secret().to_owned(),
            token_type: token.token_type,
            expires_at: token.expires_at.map(convert::timestamp),
            refreshed: token.refreshed,
            scopes: token.scopes,
        }))
    }

    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::RefreshSessionResponse>, Status> {
        let r = request.into_inner();
        let (token, id) = r.selector.parts();
        let by = selector(token, id)?;
        validate::text("reason", &r.reason)?;
        let refreshed = self.tokens.refresh(&by, r.force, &r.reason).await?;
        let now = self.tokens.now();
        Ok(Response::new(pb::RefreshSessionResponse {
            session: Some(convert::session(&refreshed.session, now)),
            access_token_expires_at: refreshed.session.token_expires_at.map(convert::timestamp),
            refreshed: refreshed.refreshed,
            rotated: refreshed.rotated,
            record: refreshed.record.as_ref().map(record),
        }))
    }

    async fn introspect_token(
        &self,
        request: Request<pb::IntrospectTokenRequest>,
    ) -> Result<Response<pb::IntrospectTokenResponse>, Status> {
        let r = request.into_inner();
        validate::upstream_token("token", &r.token, true)?;
        validate::optional_id("provider", &r.provider)?;
        if !matches!(r.token_type_hint.as_str(), "" | "access_token" | "refresh_token") {
            return Err(Error::invalid("token_type_hint", "expected access_token or refresh_token").into());
        }
        let token = SecretString::from(r.token);
        let answer = self.tokens.introspect(&token, &r.token_type_hint, &r.provider).await?;
        let i = answer.introspection;
        Ok(Response::new(pb::IntrospectTokenResponse {
            active: i.active,
            scope: i.scope,
            client_id: i.client_id,
            username: i.username,
            token_type: i.token_type,
            exp: i.exp.map(convert::timestamp),
            iat: i.iat.map(convert::timestamp),
            nbf: i.nbf.map(convert::timestamp),
            sub: i.sub,
            aud: i.aud,
            iss: i.iss,
            jti: i.jti,
            cached: answer.cached,
            cache_ttl: answer.cache_ttl.map(|d| convert::duration(Duration::from_millis(d.as_millis() as u64))),
        }))
    }

    async fn get_refresh_history(
        &self,
        request: Request<pb::GetRefreshHistoryRequest>,
    ) -> Result<Response<pb::GetRefreshHistoryResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("session_id", &r.session_id)?;
        let limit = validate::page_size("limit", r.limit, 10, 100)?;
        let records = self.tokens.history(&r.session_id, limit as usize).await?;
        Ok(Response::new(pb::GetRefreshHistoryResponse { records: records.iter().map(record).collect() }))
    }
}
