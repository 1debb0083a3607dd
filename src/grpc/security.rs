//! SecurityService adapter: proto in, domain calls, proto out.

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::pb::security_service_server::SecurityService;
use crate::grpc::pb::{self, detect_hijacking_request};
use crate::grpc::validate;

const TOPIC: &str = "is built by the security issue (rate limits, hijack detection, events)";

/// The SecurityService implementation.
#[derive(Clone, Debug, Default)]
pub struct SecurityAdapter;

fn unimplemented(rpc: &str) -> Status {
    Error::Unimplemented(format!("SecurityService.{rpc} {TOPIC}")).into()
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
        Err(unimplemented("CheckRateLimit"))
    }

    async fn detect_hijacking(
        &self,
        request: Request<pb::DetectHijackingRequest>,
    ) -> Result<Response<pb::DetectHijackingResponse>, Status> {
        use detect_hijacking_request::Selector;
        let r = request.into_inner();
        match &r.selector {
            Some(Selector::SessionToken(t)) => validate::session_token("session_token", t)?,
            Some(Selector::SessionId(i)) => validate::required_id("session_id", i)?,
            None => {
                return Err(Error::invalid("selector", "set session_id or session_token").into());
            }
        }
        validate::ip_address("current_ip", &r.current_ip)?;
        validate::text("current_user_agent", &r.current_user_agent)?;
        if let Some(fp) = &r.current_fingerprint {
            validate::fingerprint("current_fingerprint", fp)?;
        }
        Err(unimplemented("DetectHijacking"))
    }

    async fn detect_suspicious_activity(
        &self,
        request: Request<pb::DetectSuspiciousActivityRequest>,
    ) -> Result<Response<pb::DetectSuspiciousActivityResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("user_id", &r.user_id)?;
        validate::text("activity_type", &r.activity_type)?;
        validate::metadata("metadata", &r.metadata)?;
        Err(unimplemented("DetectSuspiciousActivity"))
    }

    async fn log_security_event(
        &self,
        request: Request<pb::LogSecurityEventRequest>,
    ) -> Result<Response<pb::LogSecurityEventResponse>, Status> {
        let r = request.into_inner();
        match pb::SecurityEventType::try_from(r.event_type) {
            Ok(pb::SecurityEventType::Unspecified) | Err(_) => {
                return Err(Error::invalid("event_type", "must be one of the 21 SecurityEventType values").into());
            }
            Ok(_) => {}
        }
        validate::optional_id("user_id", &r.user_id)?;
        validate::optional_id("session_id", &r.session_id)?;
        validate::text("details", &r.details)?;
        validate::ip_address("ip_address", &r.ip_address)?;
        if !(0.0..=1.0).contains(&r.risk_score) {
            return Err(Error::invalid("risk_score", "must be between 0 and 1").into());
        }
        validate::metadata("metadata", &r.metadata)?;
        Err(unimplemented("LogSecurityEvent"))
    }

    async fn list_security_events(
        &self,
        request: Request<pb::ListSecurityEventsRequest>,
    ) -> Result<Response<pb::ListSecurityEventsResponse>, Status> {
        let r = request.into_inner();
        validate::required_id("user_id", &r.user_id)?;
        validate::page_size("page_size", r.page_size, 50, 500)?;
        Err(unimplemented("ListSecurityEvents"))
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
        Err(unimplemented("GetSecuritySummary"))
    }
}
