//! Envoy's two external services on the authority's own server: external authorization
//! (`envoy.service.auth.v3.Authorization/Check`) and rate limiting
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), both for the `proxy` role.
//!
//! `Check` reads the session token (`Authorization: Bearer`, else the `envoy.cookie` cookie),
//! the client address (the source address Envoy reports, or `x-forwarded-for` with
//! `envoy.trusted_hops`), `user-agent` and `accept-language`, and validates the session exactly
//! as ValidateSession does: idle slide, device check, hijack scoring, and the `validate_failure`
//! allowance per client network. A valid session adds `x-user-id` and `x-session-id` (and the
//! upstream access token, refreshed when due, with `envoy.forward_access_token`) to the request,
//! overwriting whatever the client sent under those names. Every denial is an HTTP answer Envoy
//! sends as it is: 401 with a JSON body and `www-authenticate`, 429 with `retry-after`, and 503
//! when storage could not be read: a session that could not be checked is never allowed.
//!
//! `ShouldRateLimit` maps each descriptor to a named rule (the `envoy.ratelimit.rule_entry`
//! entry) and key (the `envoy.ratelimit.key_entry` entry, else the other entries), and decides
//! on the same limiter state and with the same semantics as CheckRateLimit.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code as RlsCode, DescriptorStatus, RateLimit, rate_limit::Unit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse, rate_limit_service_server};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use secrecy::{ExposeSecret, SecretString};
use tonic::{Request, Response, Status};

use crate::clock::Millis;
use crate::config::EnvoyConfig;
use crate::error::Error;
use crate::grpc::validate;
use crate::security::Security;
use crate::session::{Fingerprint, InvalidReason, RequestContext, SessionManager, SessionRef, Validation};
use crate::token::TokenManager;

/// Checks answered by the authority, by `decision` (`ok`, `unauthenticated`, `rate_limited`,
/// `unavailable`).
pub const EXT_AUTHZ_CHECKS: &str = "ext_authz_checks_total";

/// What `Check` reads from one proxied HTTP request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxiedRequest {
    /// The session token, when the request carries one.
    pub token: Option<String>,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// The `user-agent` header.
    pub user_agent: Option<String>,
    /// The `accept-language` header.
    pub accept_language: Option<String>,
}

/// One header of the proxied request, by lower-case name, from either form Envoy sends
/// (`headers`, or `header_map` with `encode_raw_headers`).
pub(crate) fn header<'a>(check: &'a CheckRequest, name: &str) -> Option<&'a str> {
    let http = check.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
    if let Some(value) = http.headers.get(name) {
        return Some(value.as_str());
    }
    http.header_map
        .as_ref()?
        .headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .and_then(|h| if h.value.is_empty() { std::str::from_utf8(&h.raw_value).ok() } else { Some(h.value.as_str()) })
}

/// The source address Envoy reports for the downstream connection.
pub(crate) fn source_address(check: &CheckRequest) -> Option<IpAddr> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    let peer = check.attributes.as_ref()?.source.as_ref()?;
    match peer.address.as_ref()?.address.as_ref()? {
        Address::SocketAddress(socket) => socket.address.parse().ok(),
        _ => None,
    }
}

/// The client address: with `trusted_hops` set, the entry of `x-forwarded-for` that Envoy's
/// `xff_num_trusted_hops` would pick (the `hops + 1`-th from the right: Envoy appended its peer
/// itself, and `hops` trusted proxies each appended theirs); the source address when the header
/// is shorter than that, is malformed, or `trusted_hops` is unset.
pub fn client_ip(source: Option<IpAddr>, forwarded_for: Option<&str>, trusted_hops: Option<usize>) -> Option<IpAddr> {
    let Some(hops) = trusted_hops else { return source };
    let Some(header) = forwarded_for else { return source };
    let entries: Vec<&str> = header.split(',').map(str::trim).collect();
    let picked = entries.len().checked_sub(hops + 1).and_then(|i| entries.get(i));
    picked.and_then(|entry| entry.parse().ok()).or(source)
}

/// The session token: `Authorization: Bearer <token>` first, else the cookie named `cookie`.
pub fn session_token(authorization: Option<&str>, cookies: Option<&str>, cookie: &str) -> Option<String> {
    if let Some((scheme, token)) = authorization.and_then(|v| v.trim().split_once(' '))
        && scheme.eq_ignore_ascii_case("bearer")
        && !token.trim().is_empty()
    {
        return Some(token.trim().to_owned());
    }
    // Envoy joins repeated Cookie headers with "; ": one list of `name=value` pairs.
    cookies?
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie)
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
        .filter(|value| !value.is_empty())
}

/// Reads what `Check` needs from `check` under `settings`.
pub fn read_request(check: &CheckRequest, settings: &EnvoyConfig) -> ProxiedRequest {
    let text = |name| header(check, name).map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    ProxiedRequest {
        token: session_token(header(check, "authorization"), header(check, "cookie"), &settings.cookie),
        client_ip: client_ip(source_address(check), header(check, "x-forwarded-for"), settings.trusted_hops),
        user_agent: text("user-agent"),
        accept_language: text("accept-language"),
    }
}

/// The outcome of one `Check`.
#[derive(Debug)]
pub enum Decision {
    /// The session is valid.
    Allow {
        /// Its owner.
        user_id: String,
        /// Its id.
        session_id: String,
        /// The upstream access token, when forwarded.
        access_token: Option<SecretString>,
        /// Until when this answer may be reused: the session's deadline, capped by the access
        /// token's expiry when one is forwarded.
        valid_until: Millis,
    },
    /// The request may not proceed.
    Deny(Denial),
}

/// A denied `Check`: the HTTP answer Envoy sends the client.
#[derive(Debug, Clone)]
pub struct Denial {
    /// 401, 429 or 503.
    pub http_status: u16,
    /// The gRPC code in CheckResponse.status.
    pub code: tonic::Code,
    /// A stable machine-readable name: `missing_token`, `invalid_token`, `expired`, `revoked`,
    /// `terminated`, `device_mismatch`, `hijack_suspected`, `rate_limited`, `unavailable`.
    pub error: &'static str,
    /// What a person can act on.
    pub message: String,
    /// For 429 and 503: when to retry.
    pub retry_after: Option<Duration>,
}

impl Denial {
    fn unauthenticated(error: &'static str, message: impl Into<String>) -> Denial {
        Denial {
            http_status: 401,
            code: tonic::Code::Unauthenticated,
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 503: the session could not be checked.
    pub fn unavailable(message: impl Into<String>) -> Denial {
        Denial {
            http_status: 503,
            code: tonic::Code::Unavailable,
            error: "unavailable",
            message: message.into(),
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    fn rate_limited(retry_after: Duration) -> Denial {
        Denial {
            http_status: 429,
            code: tonic::Code::ResourceExhausted,
            error: "rate_limited",
            message: "too many requests with sessions that are not valid from this network; retry later".into(),
            retry_after: Some(retry_after),
        }
    }

    /// The metrics label of this denial.
    fn label(&self) -> &'static str {
        match self.http_status {
            429 => "rate_limited",
            503 => "unavailable",
            _ => "unauthenticated",
        }
    }

    /// The CheckResponse Envoy turns into this HTTP answer.
    pub fn into_response(self) -> CheckResponse {
        let mut headers = vec![header_option("content-type", "application/json")];
        if self.http_status == 401 {
            // RFC 6750 §3: no `error` attribute when the request carried no token at all.
            let value = if self.error == "missing_token" {
                "Bearer realm=\"session-authority\"".to_owned()
            } else {
                format!(
                    "Bearer realm=\"session-authority\", error=\"invalid_token\", error_description=\"{}\"",
                    self.error
                )
            };
            headers.push(header_option("www-authenticate", &value));
        }
        if let Some(after) = self.retry_after {
            headers.push(header_option("retry-after", &after.as_secs().max(1).to_string()));
        }
        let body = serde_json::json!({ "error": self.error, "message": self.message }).to_string();
        CheckResponse {
            status: Some(rpc::Status { code: self.code as i32, message: self.message, details: Vec::new() }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: i32::from(self.http_status) }),
                headers,
                body,
            })),
        }
    }
}

/// A header that replaces any header of the same name.
fn header_option(key: &str, value: &str) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_owned(), value: value.to_owned(), raw_value: Vec::new() }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

fn plain_header(key: &str, value: &str) -> HeaderValue {
    HeaderValue { key: key.to_owned(), value: value.to_owned(), raw_value: Vec::new() }
}

fn string_value(text: &str) -> Value {
    Value { kind: Some(Kind::StringValue(text.to_owned())) }
}

/// The dynamic metadata of an allowed Check (`user_id`, `session_id`, `valid_until_ms`): what
/// Envoy's access log may show, and what a caching sidecar indexes its entries by.
pub fn allow_metadata(user_id: &str, session_id: &str, valid_until: Millis) -> Struct {
    let mut fields = std::collections::HashMap::new();
    fields.insert("user_id".to_owned(), string_value(user_id));
    fields.insert("session_id".to_owned(), string_value(session_id));
    fields.insert("valid_until_ms".to_owned(), Value { kind: Some(Kind::NumberValue(valid_until as f64)) });
    Struct { fields }
}

/// `(session_id, valid_until)` of an allowed CheckResponse, from its dynamic metadata.
pub fn allowed_session(response: &CheckResponse) -> Option<(String, Millis)> {
    if response.status.as_ref().is_some_and(|s| s.code != 0) {
        return None;
    }
    let Some(HttpResponse::OkResponse(_)) = &response.http_response else { return None };
    let fields = &response.dynamic_metadata.as_ref()?.fields;
    let session_id = match fields.get("session_id")?.kind.as_ref()? {
        Kind::StringValue(id) if !id.is_empty() => id.clone(),
        _ => return None,
    };
    let valid_until = match fields.get("valid_until_ms")?.kind.as_ref()? {
        Kind::NumberValue(ms) => *ms as Millis,
        _ => return None,
    };
    Some((session_id, valid_until))
}

impl Decision {
    fn into_response(self, settings: &EnvoyConfig) -> CheckResponse {
        match self {
            Decision::Deny(denial) => denial.into_response(),
            Decision::Allow { user_id, session_id, access_token, valid_until } => {
                let mut headers = vec![
                    header_option(&settings.user_id_header, &user_id),
                    header_option(&settings.session_id_header, &session_id),
                ];
                if let Some(token) = &access_token {
                    headers.push(header_option("authorization", &format!("Bearer {}", token.expose_secret())));
                }
                CheckResponse {
                    status: Some(rpc::Status { code: 0, message: String::new(), details: Vec::new() }),
                    dynamic_metadata: Some(allow_metadata(&user_id, &session_id, valid_until)),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse { headers, ..Default::default() })),
                }
            }
        }
    }
}

/// The ext_authz `Check` service.
#[derive(Clone, Debug)]
pub struct ExtAuthzAdapter {
    sessions: SessionManager,
    tokens: TokenManager,
    settings: Arc<EnvoyConfig>,
}

impl ExtAuthzAdapter {
    /// The service over the authority's domain.
    pub fn new(sessions: SessionManager, tokens: TokenManager, settings: EnvoyConfig) -> Self {
        ExtAuthzAdapter { sessions, tokens, settings: Arc::new(settings) }
    }

    /// Decides one proxied request.
    pub async fn decide(&self, request: ProxiedRequest) -> Decision {
        let Some(token) = request.token else {
            return Decision::Deny(Denial::unauthenticated(
                "missing_token",
                format!(
                    "no session: send `Authorization: Bearer <session token>` or the `{}` cookie",
                    self.settings.cookie
                ),
            ));
        };
        let fingerprint = (request.user_agent.is_some() || request.accept_language.is_some()).then(|| Fingerprint {
            user_agent: request.user_agent.clone(),
            accept_language: request.accept_language.clone(),
            ..Fingerprint::default()
        });
        let context = RequestContext { fingerprint, ip_address: request.client_ip, user_agent: request.user_agent };
        // A token of any shape is looked up: one that is not a session token names none, and
        // that answer counts against the client like any other unknown token.
        let session = match self.sessions.validate(&token, &context).await {
            Ok(Validation::Valid { session, .. }) => session,
            Ok(Validation::Invalid { reason, .. }) => return Decision::Deny(invalid(reason)),
            Err(Error::RateLimited { retry_after, .. } | Error::LimiterFull { retry_after, .. }) => {
                return Decision::Deny(Denial::rate_limited(retry_after));
            }
            Err(e) => return Decision::Deny(unavailable(&e)),
        };
        let mut valid_until = session.deadline();
        let access_token = if self.settings.forward_access_token {
            match self.tokens.access_token(&SessionRef::Id(session.session_id.clone())).await {
                Ok(token) => {
                    if let Some(expires) = token.expires_at {
                        valid_until = valid_until.min(expires);
                    }
                    Some(token.token)
                }
                Err(e @ (Error::Unavailable { .. } | Error::Internal { .. } | Error::Aborted(_))) => {
                    return Decision::Deny(unavailable(&e));
                }
                Err(e) => {
                    return Decision::Deny(Denial::unauthenticated(
                        "invalid_token",
                        format!("the session's upstream access token cannot be used: {e}"),
                    ));
                }
            }
        } else {
            None
        };
        Decision::Allow {
            user_id: session.user_id.clone(),
            session_id: session.session_id.clone(),
            access_token,
            valid_until,
        }
    }
}

fn unavailable(e: &Error) -> Denial {
    tracing::warn!(error = %e, "ext_authz Check could not check a session; refusing it (fail closed)");
    Denial::unavailable("the session could not be checked right now; retry shortly")
}

fn invalid(reason: InvalidReason) -> Denial {
    let (error, message) = match reason {
        InvalidReason::NotFound => ("invalid_token", "the session token names no session"),
        InvalidReason::Expired => ("expired", "the session has expired; sign in again"),
        InvalidReason::Revoked => ("revoked", "the session was revoked; sign in again"),
        InvalidReason::Terminated => ("terminated", "the session has ended; sign in again"),
        InvalidReason::DeviceMismatch => ("device_mismatch", "the session belongs to another device"),
        InvalidReason::HijackSuspected => ("hijack_suspected", "the session was ended as a suspected hijack"),
    };
    Denial::unauthenticated(error, message)
}

#[tonic::async_trait]
impl Authorization for ExtAuthzAdapter {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let proxied = read_request(request.get_ref(), &self.settings);
        let decision = self.decide(proxied).await;
        let label = match &decision {
            Decision::Allow { .. } => "ok",
            Decision::Deny(denial) => denial.label(),
        };
        metrics::counter!(EXT_AUTHZ_CHECKS, "decision" => label).increment(1);
        Ok(Response::new(decision.into_response(&self.settings)))
    }
}

/// The rate-limit service.
#[derive(Clone, Debug)]
pub struct RateLimitAdapter {
    security: Security,
    settings: Arc<EnvoyConfig>,
}

impl RateLimitAdapter {
    /// The service over the authority's limiter.
    pub fn new(security: Security, settings: EnvoyConfig) -> Self {
        RateLimitAdapter { security, settings: Arc::new(settings) }
    }

    /// `(rule, key)` of one descriptor.
    fn rule_and_key(&self, index: usize, descriptor: &RateLimitDescriptor) -> Result<(String, String), Error> {
        let field = format!("descriptors[{index}]");
        let entry = |name: &str| descriptor.entries.iter().find(|e| e.key == name).map(|e| e.value.clone());
        let rule = entry(&self.settings.rule_entry).ok_or_else(|| {
            Error::invalid(
                &field,
                format!(
                    "has no `{}` entry naming a rule (envoy.ratelimit.rule_entry); add a generic_key action with descriptor_key: {}",
                    self.settings.rule_entry, self.settings.rule_entry
                ),
            )
        })?;
        let key = entry(&self.settings.key_entry).unwrap_or_else(|| {
            descriptor
                .entries
                .iter()
                .filter(|e| e.key != self.settings.rule_entry)
                .map(|e| format!("{}={}", e.key, e.value))
                .collect::<Vec<_>>()
                .join(";")
        });
        validate::required_id(&format!("{field}.{}", self.settings.rule_entry), &rule)?;
        if key.is_empty() {
            return Err(Error::invalid(&field, "has no entry besides the rule to key the limit by"));
        }
        validate::required_id(&format!("{field}.key"), &key)?;
        Ok((rule, key))
    }
}

/// The Envoy unit of a rule whose period is exactly one of them.
fn unit_of(period: Duration) -> Option<Unit> {
    match period.as_secs() {
        _ if period.subsec_nanos() != 0 => None,
        1 => Some(Unit::Second),
        60 => Some(Unit::Minute),
        3600 => Some(Unit::Hour),
        86_400 => Some(Unit::Day),
        604_800 => Some(Unit::Week),
        _ => None,
    }
}

#[tonic::async_trait]
impl rate_limit_service_server::RateLimitService for RateLimitAdapter {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let r = request.into_inner();
        if r.descriptors.is_empty() {
            return Err(Error::invalid("descriptors", "required: at least one descriptor").into());
        }
        if r.descriptors.len() > 16 {
            return Err(Error::invalid("descriptors", "at most 16 descriptors per request").into());
        }
        let mut statuses = Vec::with_capacity(r.descriptors.len());
        let mut over = false;
        let mut retry_after = Duration::ZERO;
        let mut headers = Vec::new();
        // Every descriptor is read and its rule looked up before any is decided: a bad one spends
        // no unit of the others.
        let mut checks = Vec::with_capacity(r.descriptors.len());
        for (index, descriptor) in r.descriptors.iter().enumerate() {
            let (rule, key) = self.rule_and_key(index, descriptor)?;
            let period = self.security.limiter().rule(&rule)?.period;
            let cost =
                descriptor.hits_addend.as_ref().map_or(r.hits_addend, |n| u32::try_from(n.value).unwrap_or(u32::MAX));
            checks.push((rule, key, period, cost.max(1)));
        }
        for (index, (rule, key, period, cost)) in checks.into_iter().enumerate() {
            let decision = self.security.check_rate_limit(&rule, &key, cost, None).await?;
            if !decision.allowed {
                over = true;
                retry_after = retry_after.max(decision.retry_after);
            }
            if index == 0 || !decision.allowed {
                headers = vec![
                    plain_header("x-ratelimit-limit", &decision.limit.to_string()),
                    plain_header("x-ratelimit-remaining", &decision.remaining.to_string()),
                    plain_header("x-ratelimit-reset", &decision.reset_after.as_secs().to_string()),
                ];
            }
            statuses.push(DescriptorStatus {
                code: if decision.allowed { RlsCode::Ok } else { RlsCode::OverLimit } as i32,
                current_limit: unit_of(period).map(|unit| RateLimit {
                    name: rule.clone(),
                    requests_per_unit: decision.limit,
                    unit: unit as i32,
                }),
                limit_remaining: decision.remaining,
                duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: decision.reset_after.as_secs() as i64,
                    nanos: decision.reset_after.subsec_nanos() as i32,
                }),
                quota: None,
            });
        }
        if over {
            headers.push(plain_header("retry-after", &retry_after.as_secs().max(1).to_string()));
        }
        Ok(Response::new(RateLimitResponse {
            overall_code: if over { RlsCode::OverLimit } else { RlsCode::Ok } as i32,
            statuses,
            response_headers_to_add: headers,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_comes_first_then_the_named_cookie() {
        assert_eq!(session_token(Some("Bearer abc"), Some("session_id=zzz"), "session_id").as_deref(), Some("abc"));
        assert_eq!(session_token(Some("bearer  abc "), None, "session_id").as_deref(), Some("abc"));
        assert_eq!(
            session_token(Some("Basic Zm9v"), Some("a=1; session_id=zzz"), "session_id").as_deref(),
            Some("zzz")
        );
        assert_eq!(session_token(None, Some("a=1;session_id=\"q\"; b=2"), "session_id").as_deref(), Some("q"));
        assert_eq!(session_token(None, Some("xsession_id=1; session_idx=2"), "session_id"), None);
        assert_eq!(session_token(None, Some("session_id="), "session_id"), None);
        assert_eq!(session_token(Some("Bearer "), None, "session_id"), None);
        assert_eq!(session_token(None, None, "session_id"), None);
    }

    #[test]
    fn the_client_is_picked_from_forwarded_for_as_envoy_counts_hops() {
        let source: Option<IpAddr> = Some("10.0.0.9".parse().unwrap());
        let xff = Some("203.0.113.7, 198.51.100.2, 10.0.0.9");
        assert_eq!(client_ip(source, xff, None), source, "no trusted hops: the source address");
        assert_eq!(client_ip(source, xff, Some(0)), Some("10.0.0.9".parse().unwrap()));
        assert_eq!(client_ip(source, xff, Some(1)), Some("198.51.100.2".parse().unwrap()));
        assert_eq!(client_ip(source, xff, Some(2)), Some("203.0.113.7".parse().unwrap()));
        assert_eq!(client_ip(source, xff, Some(3)), source, "shorter than the hops: the source address");
        assert_eq!(client_ip(source, Some("not-an-ip, 10.0.0.9"), Some(1)), source);
        assert_eq!(client_ip(source, None, Some(1)), source);
    }

    #[test]
    fn denials_are_http_answers_with_json_and_the_right_headers() {
        let response = invalid(InvalidReason::Revoked).into_response();
        assert_eq!(response.status.as_ref().unwrap().code, tonic::Code::Unauthenticated as i32);
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else { panic!("not denied") };
        assert_eq!(denied.status.unwrap().code, 401);
        let names: Vec<&str> = denied.headers.iter().map(|h| h.header.as_ref().unwrap().key.as_str()).collect();
        assert!(names.contains(&"www-authenticate") && names.contains(&"content-type"), "{names:?}");
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(body["error"], "revoked");

        let Some(HttpResponse::DeniedResponse(limited)) =
            Denial::rate_limited(Duration::from_secs(42)).into_response().http_response
        else {
            panic!("not denied")
        };
        assert_eq!(limited.status.unwrap().code, 429);
        let retry = limited.headers.iter().find(|h| h.header.as_ref().unwrap().key == "retry-after").unwrap();
        assert_eq!(retry.header.as_ref().unwrap().value, "42");
    }

    #[test]
    fn allowed_answers_carry_the_session_for_a_cache() {
        let settings = EnvoyConfig {
            cookie: "session_id".into(),
            trusted_hops: None,
            user_id_header: "x-user-id".into(),
            session_id_header: "x-session-id".into(),
            forward_access_token: false,
            rule_entry: "rule".into(),
            key_entry: "key".into(),
        };
        let allow = Decision::Allow {
            user_id: "u1".into(),
            session_id: "s1".into(),
            access_token: None,
            valid_until: 1_700_000_000_123,
        };
        let response = allow.into_response(&settings);
        assert_eq!(allowed_session(&response), Some(("s1".to_owned(), 1_700_000_000_123)));
        assert_eq!(allowed_session(&invalid(InvalidReason::Expired).into_response()), None);
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else { panic!("not ok") };
        assert!(ok.headers.iter().all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32));
    }
}
