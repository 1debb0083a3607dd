//! SessionService adapter: checks and parses every field once (a CreateSession request becomes a
//! [`NewSession`] through `TryFrom`), checks the finer authorisation (acting on a session by id
//! needs the admin role), calls [`SessionManager`], and maps the answer. The rules about what
//! the request asks for (the provider, the validate_failure limit) are the manager's.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::auth::Caller;
use crate::grpc::convert::SessionSelector as _;
use crate::grpc::pb;
use crate::grpc::pb::session_service_server::SessionService;
use crate::grpc::{convert, validate};
use crate::session::{InvalidReason, NewSession, RequestContext, SessionManager, SessionRef, Validation};

/// The SessionService implementation.
#[derive(Clone, Debug)]
pub struct SessionAdapter {
    sessions: SessionManager,
}

impl SessionAdapter {
    /// An adapter over `sessions`.
    pub fn new(sessions: SessionManager) -> SessionAdapter {
        SessionAdapter { sessions }
    }
}

/// A CreateSession request as the domain's command: each field checked within its limits and
/// parsed, once.
impl TryFrom<pb::CreateSessionRequest> for NewSession {
    type Error = Error;

    fn try_from(r: pb::CreateSessionRequest) -> Result<NewSession, Error> {
        validate::required_id("user_id", &r.user_id)?;
        validate::upstream_token("access_token", &r.access_token, true)?;
        validate::upstream_token("refresh_token", &r.refresh_token, false)?;
        validate::upstream_token("id_token", &r.id_token, false)?;
        validate::string_list("scopes", &r.scopes)?;
        validate::text("user_agent", &r.user_agent)?;
        validate::optional_id("provider", &r.provider)?;
        validate::optional_id("token_type", &r.token_type)?;
        validate::metadata("metadata", &r.metadata)?;
        Ok(NewSession {
            user_id: r.user_id,
            access_token: SecretString::from(r.access_token),
            refresh_token: secret(&r.refresh_token),
            id_token: secret(&r.id_token),
            token_type: r.token_type,
            expires_in: validate::duration("expires_in", r.expires_in.as_ref())?,
            scopes: r.scopes,
            fingerprint: optional_fingerprint("device_fingerprint", r.device_fingerprint.as_ref())?,
            ip_address: validate::ip_address("ip_address", &r.ip_address)?,
            user_agent: (!r.user_agent.is_empty()).then_some(r.user_agent),
            provider: r.provider,
            idle_timeout: validate::positive_duration("idle_timeout", r.idle_timeout.as_ref())?,
            absolute_timeout: validate::positive_duration("absolute_timeout", r.absolute_timeout.as_ref())?,
            metadata: r.metadata.into_iter().collect(),
        })
    }
}

/// A session named by token (any caller of the service) or by id (admin only).
pub(crate) fn session_ref<R>(
    request: &Request<R>,
    token: Option<&String>,
    id: Option<&String>,
) -> Result<SessionRef, Error> {
    match (token, id) {
        (Some(token), _) => {
            validate::session_token("session_token", token)?;
            Ok(SessionRef::Token(token.clone()))
        }
        (None, Some(id)) => {
            validate::required_id("session_id", id)?;
            let admin = request.extensions().get::<Caller>().is_some_and(Caller::is_admin);
            if !admin {
                return Err(Error::PermissionDenied(
                    "acting on a session by session_id needs the admin role; present the session_token instead".into(),
                ));
            }
            Ok(SessionRef::Id(id.clone()))
        }
        (None, None) => Err(Error::invalid("selector", "set session_token or session_id")),
    }
}

fn optional_fingerprint(
    field: &str,
    fp: Option<&pb::DeviceFingerprint>,
) -> Result<Option<crate::session::Fingerprint>, Error> {
    match fp {
        Some(fp) => {
            validate::fingerprint(field, fp)?;
            Ok(Some(convert::fingerprint(fp)))
        }
        None => Ok(None),
    }
}

fn invalid_reason(reason: InvalidReason) -> pb::InvalidReason {
    match reason {
        InvalidReason::NotFound => pb::InvalidReason::NotFound,
        InvalidReason::Expired => pb::InvalidReason::Expired,
        InvalidReason::Revoked => pb::InvalidReason::Revoked,
        InvalidReason::Terminated => pb::InvalidReason::Terminated,
        InvalidReason::DeviceMismatch => pb::InvalidReason::DeviceMismatch,
        InvalidReason::HijackSuspected => pb::InvalidReason::HijackSuspected,
    }
}

fn secret(value: &str) -> Option<SecretString> {
    (!value.is_empty()).then(|| SecretString::from(value.to_owned()))
}

#[tonic::async_trait]
impl SessionService for SessionAdapter {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let new = NewSession::try_from(request.into_inner())?;
        let created = self.sessions.create(new).await?;
        let now = self.sessions.now();
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(convert::session(&created.session, now)),
            session_token: created.token.expose_secret().to_owned(),
            evicted_session_ids: created.evicted.into_iter().map(|s| s.session_id).collect(),
        }))
    }

    async fn validate_session(
        &self,
        request: Request<pb::ValidateSessionRequest>,
    ) -> Result<Response<pb::ValidateSessionResponse>, Status> {
        let r = request.into_inner();
        validate::session_token("session_token", &r.session_token)?;
        validate::text("user_agent", &r.user_agent)?;
        let fingerprint = optional_fingerprint("device_fingerprint", r.device_fingerprint.as_ref())?;
        let user_agent = if r.user_agent.is_empty() {
            fingerprint.as_ref().and_then(|f| f.user_agent.clone())
        } else {
            Some(r.user_agent)
        };
        let context =
            RequestContext { ip_address: validate::ip_address("ip_address", &r.ip_address)?, fingerprint, user_agent };
        let validation = self.sessions.validate(&r.session_token, &context).await?;
        let response = match validation {
            Validation::Valid { session, needs_refresh, risk_score, reasons } => pb::ValidateSessionResponse {
                valid: true,
                reason: pb::InvalidReason::Unspecified as i32,
                session: Some(convert::session(&session, self.sessions.now())),
                needs_refresh,
                risk_score,
                reasons,
                end_reason: String::new(),
            },
            Validation::Invalid { reason, end_reason, risk_score, reasons } => pb::ValidateSessionResponse {
                valid: false,
                reason: invalid_reason(reason) as i32,
                session: None,
                needs_refresh: false,
                risk_score,
                reasons,
                end_reason: end_reason.unwrap_or_default(),
            },
        };
        Ok(Response::new(response))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let (token, id) = request.get_ref().selector.parts();
        let by = session_ref(&request, token, id)?;
        let fingerprint = optional_fingerprint("device_fingerprint", request.get_ref().device_fingerprint.as_ref())?;
        let client_ip = validate::ip_address("ip_address", &request.get_ref().ip_address)?;
        let session = self.sessions.get_used(&by, fingerprint.as_ref(), client_ip).await?;
        Ok(Response::new(pb::GetSessionResponse { session: Some(convert::session(&session, self.sessions.now())) }))
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Result<Response<pb::ListUserSessionsResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("user_id", &r.user_id)?;
        let page_size = validate::page_size("page_size", r.page_size, 50, 500)?;
        if r.states.len() > 4 {
            return Err(Error::invalid("states", "at most the four states").into());
        }
        validate::optional_id("page_token", &r.page_token)?;
        let page_token = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let page = self
            .sessions
            .list_user(&r.user_id, &convert::state_filter(&r.states), page_size as usize, page_token)
            .await?;
        let now = self.sessions.now();
        Ok(Response::new(pb::ListUserSessionsResponse {
            sessions: page.sessions.iter().map(|s| convert::session(s, now)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn update_session(
        &self,
        request: Request<pb::UpdateSessionRequest>,
    ) -> Result<Response<pb::UpdateSessionResponse>, Status> {
        let (token, id) = request.get_ref().selector.parts();
        let by = session_ref(&request, token, id)?;
        let r = request.into_inner();
        validate::metadata("metadata", &r.metadata)?;
        validate::string_list("remove_metadata_keys", &r.remove_metadata_keys)?;
        let fingerprint = optional_fingerprint("device_fingerprint", r.device_fingerprint.as_ref())?;
        let merge: BTreeMap<String, String> = r.metadata.into_iter().collect();
        let session = self.sessions.update(&by, merge, &r.remove_metadata_keys, fingerprint).await?;
        Ok(Response::new(pb::UpdateSessionResponse { session: Some(convert::session(&session, self.sessions.now())) }))
    }

    async fn terminate_session(
        &self,
        request: Request<pb::TerminateSessionRequest>,
    ) -> Result<Response<pb::TerminateSessionResponse>, Status> {
        let (token, id) = request.get_ref().selector.parts();
        let by = session_ref(&request, token, id)?;
        let reason = &request.get_ref().reason;
        validate::text("reason", reason)?;
        let reason = match (reason.is_empty(), &by) {
            (false, _) => reason.clone(),
            (true, SessionRef::Token(_)) => "user_logout".to_owned(),
            (true, SessionRef::Id(_) | SessionRef::Upstream(_)) => "admin_termination".to_owned(),
        };
        let (session, already_ended) = self.sessions.terminate(&by, &reason).await?;
        Ok(Response::new(pb::TerminateSessionResponse {
            session: Some(convert::session(&session, self.sessions.now())),
            already_ended,
        }))
    }
}
