//! How an upstream call failed: the classification the retry policy, the refresh flow and the
//! metrics read, and its mapping from HTTP and OAuth2 error responses.

use super::*;

/// Why an upstream call failed, classified for the retry policy and the metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// Worth retrying: a network error, a timeout, a 5xx or a 429.
    Transient {
        /// Bounded cause: `timeout`, `network`, `server_error` or `rate_limited`.
        cause: &'static str,
        /// What happened, without secrets.
        message: String,
        /// The provider's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// The request provably was not processed: the connection failed before it was sent, or
        /// the provider answered 429 or 503 with `Retry-After`. Otherwise (a timeout after
        /// sending, another 5xx, a connection lost mid-request) the provider may have acted on it.
        unprocessed: bool,
    },
    /// The provider refused the refresh token (`invalid_grant`): the grant is gone.
    InvalidGrant,
    /// Another OAuth2 error (a 4xx): retrying will not help. The error code only.
    Rejected(String),
    /// The provider answered something that is not what the protocol says.
    Malformed(String),
    /// The provider is not configured for this operation (no endpoint, no client id).
    NotConfigured(String),
}

impl UpstreamError {
    /// Whether the retry policy may try again.
    pub fn is_transient(&self) -> bool {
        matches!(self, UpstreamError::Transient { .. })
    }

    /// A bounded label for metrics and records.
    pub fn cause(&self) -> &'static str {
        match self {
            UpstreamError::Transient { cause, .. } => cause,
            UpstreamError::InvalidGrant => "invalid_grant",
            UpstreamError::Rejected(_) => "rejected",
            UpstreamError::Malformed(_) => "malformed",
            UpstreamError::NotConfigured(_) => "not_configured",
        }
    }

    /// Whether the provider provably did not process the request, so that sending it again
    /// cannot redeem anything twice (see [`UpstreamError::Transient`]).
    pub fn unprocessed(&self) -> bool {
        matches!(self, UpstreamError::Transient { unprocessed: true, .. })
    }

    /// The `Retry-After` hint, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Transient { message, .. } => write!(f, "provider unavailable: {message}"),
            UpstreamError::InvalidGrant => write!(f, "the provider refused the refresh token (invalid_grant)"),
            UpstreamError::Rejected(code) => write!(f, "the provider refused the request ({code})"),
            UpstreamError::Malformed(what) => write!(f, "the provider's answer is malformed: {what}"),
            UpstreamError::NotConfigured(what) => write!(f, "provider not configured: {what}"),
        }
    }
}

/// The error of our HTTP function, as `oauth2` hands it back in `RequestTokenError::Request`.
#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    #[error("request timed out")]
    Timeout,
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Network(String),
    #[error("HTTP status {status}")]
    Status { status: u16, retry_after: Option<Duration> },
}

impl From<HttpError> for UpstreamError {
    fn from(error: HttpError) -> UpstreamError {
        match error {
            HttpError::Timeout => UpstreamError::Transient {
                cause: "timeout",
                message: "request timed out".into(),
                retry_after: None,
                unprocessed: false,
            },
            HttpError::Connect(message) => {
                UpstreamError::Transient { cause: "network", message, retry_after: None, unprocessed: true }
            }
            HttpError::Network(message) => {
                UpstreamError::Transient { cause: "network", message, retry_after: None, unprocessed: false }
            }
            HttpError::Status { status, retry_after } => UpstreamError::Transient {
                cause: if status == 429 { "rate_limited" } else { "server_error" },
                message: format!("HTTP status {status}"),
                retry_after,
                unprocessed: matches!(status, 429 | 503) && retry_after.is_some(),
            },
        }
    }
}

/// An OAuth2 error code as we repeat it: a short lower-case word, or "unknown". Anything else the
/// provider sent (descriptions, echoed input) is dropped.
pub(super) fn sanitised_code(code: &str) -> String {
    let ok = !code.is_empty() && code.len() <= 48 && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if ok { code.to_owned() } else { "unknown".to_owned() }
}

pub(super) fn classify(error: RequestTokenError<HttpError, impl oauth2::ErrorResponse + HasCode>) -> UpstreamError {
    match error {
        RequestTokenError::Request(http) => http.into(),
        RequestTokenError::ServerResponse(response) => match response.code() {
            "invalid_grant" => UpstreamError::InvalidGrant,
            code => UpstreamError::Rejected(sanitised_code(code)),
        },
        // Never include the body: it may hold a token.
        RequestTokenError::Parse(error, _) => UpstreamError::Malformed(format!("unparsable JSON at {}", error.path())),
        RequestTokenError::Other(_) => UpstreamError::Malformed("unexpected response".into()),
    }
}

/// The error code of a parsed OAuth2 error response.
pub(super) trait HasCode {
    fn code(&self) -> &str;
}

impl HasCode for BasicErrorResponse {
    fn code(&self) -> &str {
        match self.error() {
            BasicErrorResponseType::InvalidGrant => "invalid_grant",
            other => other.as_ref(),
        }
    }
}
