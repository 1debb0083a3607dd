//! SecurityService adapter: validates every field, checks the finer authorisation (naming a
//! session by id needs the admin role, as everywhere), calls [`Security`], and maps the answer.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::convert::SessionSelector as _;
use crate::grpc::pb;
use crate::grpc::pb::security_service_server::SecurityService;
use crate::grpc::session::session_ref;
use crate::grpc::{convert, validate};
use crate::security::events::EventDraft;
use crate::security::{ListEvents, Security};
use crate::session::RequestContext;

/// The SecurityService implementation.
#[derive(Clone, Debug)]
pub struct SecurityAdapter {
    security: Security,
}

impl SecurityAdapter {
    /// An adapter over `security`.
    pub fn new(security: Security) -> SecurityAdapter {
        SecurityAdapter { security }
    }
}

#[tonic::async_trait]
impl SecurityService for SecurityAdapter {
    async fn check_rate_limit(
        &self,
        request: Request<pb::CheckRateLimitRequest>,
    ) -> Result<Response<pb::CheckRateLimitResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("rule_name", &r.rule_name)?;
        validate::required_id("key", &r.key)?;
        let decision = self.security.check_rate_limit(&r.rule_name, &r.key, r.cost, r.consume).await?;
        Ok(Response::new(pb::CheckRateLimitResponse {
            allowed: decision.allowed,
            limit: decision.limit,
            remaining: decision.remaining,
            retry_after: (!decision.allowed).then(|| convert::duration(decision.retry_after)),
            reset_after: Some(convert::duration(decision.reset_after)),
        }))
    }

    async fn detect_hijacking(
        &self,
        request: Request<pb::DetectHijackingRequest>,
    ) -> Result<Response<pb::DetectHijackingResponse>, Status> {
        let (token, id) = request.get_ref().selector.parts();
        let by = session_ref(&request, token, id)?;
        let r = request.into_inner();
        let ip_address = validate::ip_address("current_ip", &r.current_ip)?;
        validate::text("current_user_agent", &r.current_user_agent)?;
        let fingerprint = match &r.current_fingerprint {
            Some(fp) => {
                validate::fingerprint("current_fingerprint", fp)?;
                Some(convert::fingerprint(fp)).filter(|f| !f.is_empty())
            }
            None => None,
        };
        let user_agent = if r.current_user_agent.is_empty() {
            fingerprint.as_ref().and_then(|f| f.user_agent.clone())
        } else {
            Some(r.current_user_agent)
        };
        let context = RequestContext { fingerprint, ip_address, user_agent };
        let answer = self.security.detect_hijacking(&by, &context).await?;
        Ok(Response::new(pb::DetectHijackingResponse {
            is_suspicious: answer.is_suspicious,
            risk_score: answer.risk_score,
            reasons: answer.reasons,
            session_terminated: answer.session_terminated,
        }))
    }

    async fn detect_suspicious_activity(
        &self,
        request: Request<pb::DetectSuspiciousActivityRequest>,
    ) -> Result<Response<pb::DetectSuspiciousActivityResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("user_id", &r.user_id)?;
        validate::text("activity_type", &r.activity_type)?;
        validate::metadata("metadata", &r.metadata)?;
        let metadata: BTreeMap<String, String> = r.metadata.into_iter().collect();
        let answer = self.security.detect_suspicious_activity(&r.user_id, &r.activity_type, metadata).await?;
        Ok(Response::new(pb::DetectSuspiciousActivityResponse {
            is_suspicious: answer.is_suspicious,
            risk_score: answer.risk_score,
            reasons: answer.reasons,
        }))
    }

    async fn log_security_event(
        &self,
        request: Request<pb::LogSecurityEventRequest>,
    ) -> Result<Response<pb::LogSecurityEventResponse>, Status> {
        let r = request.into_inner();
        let Some(event_type) = convert::event_type(r.event_type) else {
            return Err(Error::invalid("event_type", "must be one of the 21 SecurityEventType values").into());
        };
        validate::optional_id("user_id", &r.user_id)?;
        validate::optional_id("session_id", &r.session_id)?;
        validate::text("details", &r.details)?;
        let ip = validate::ip_address("ip_address", &r.ip_address)?;
        if !(0.0..=1.0).contains(&r.risk_score) {
            return Err(Error::invalid("risk_score", "must be between 0 and 1").into());
        }
        validate::metadata("metadata", &r.metadata)?;
        let mut draft = EventDraft::new(event_type)
            .user(r.user_id)
            .session(r.session_id)
            .ip(ip.map(|ip| ip.to_string()))
            .details(r.details)
            .risk(r.risk_score);
        draft.metadata = r.metadata.into_iter().collect();
        let event = self.security.log_event(draft).await?;
        Ok(Response::new(pb::LogSecurityEventResponse { event: Some(convert::security_event(&event)) }))
    }

    async fn list_security_events(
        &self,
        request: Request<pb::ListSecurityEventsRequest>,
    ) -> Result<Response<pb::ListSecurityEventsResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("user_id", &r.user_id)?;
        let page_size = validate::page_size("page_size", r.page_size, 50, 500)?;
        validate::optional_id("page_token", &r.page_token)?;
        if r.event_types.len() > EVENT_TYPE_FILTER_MAX {
            return Err(Error::invalid("event_types", format!("at most {EVENT_TYPE_FILTER_MAX} entries")).into());
        }
        let mut types = Vec::with_capacity(r.event_types.len());
        for value in &r.event_types {
            let event_type = convert::event_type(*value)
                .ok_or_else(|| Error::invalid("event_types", format!("{value} is not a SecurityEventType")))?;
            types.push(event_type);
        }
        let start = r.start_time.as_ref().map(convert::millis);
        let end = r.end_time.as_ref().map(convert::millis);
        if let (Some(start), Some(end)) = (start, end)
            && start >= end
        {
            return Err(Error::invalid("end_time", "must be after start_time").into());
        }
        let list = ListEvents {
            user_id: r.user_id,
            start,
            end,
            types,
            page_size: page_size as usize,
            page_token: (!r.page_token.is_empty()).then_some(r.page_token),
        };
        let page = self.security.list_events(&list).await?;
        Ok(Response::new(pb::ListSecurityEventsResponse {
            events: page.events.iter().map(convert::security_event).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn get_security_summary(
        &self,
        request: Request<pb::GetSecuritySummaryRequest>,
    ) -> Result<Response<pb::GetSecuritySummaryResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("user_id", &r.user_id)?;
        if r.hours > 24 * 366 {
            return Err(Error::invalid("hours", "at most 8784 (366 days)").into());
        }
        let summary = self.security.summary(&r.user_id, r.hours).await?;
        Ok(Response::new(convert::summary(&summary)))
    }
}

/// Most entries in the `event_types` filter (duplicates are harmless, more is abuse).
const EVENT_TYPE_FILTER_MAX: usize = 64;
