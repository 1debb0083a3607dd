//! The crate's one error type.
//!
//! Domain and storage code return [`Error`]; the gRPC layer turns it into a `tonic::Status` in
//! exactly one place (`grpc::status`). Variants are semantic (what went wrong for the caller),
//! not technical (which library failed), so the mapping to status codes is a plain match.

#![warn(missing_docs)]

use std::time::Duration;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, as the caller should understand it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing, too long or malformed. `field` names it as in the proto.
    #[error("invalid `{field}`: {message}")]
    InvalidArgument {
        /// The proto field path, for example `device_fingerprint.user_agent`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The caller did not present a valid API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role does not allow this call.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but the state of the system refuses it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A cursor or position is outside what is retained.
    #[error("{0}")]
    OutOfRange(String),
    /// The revocation log was reset or went backwards (a new log id, a lower head): every
    /// cursor of it is void. `OUT_OF_RANGE` with the reason `REVOCATION_LOG_RESET`.
    #[error("{0}")]
    LogReset(String),
    /// A concurrent change won; the caller should retry from fresh state.
    #[error("{0}")]
    Aborted(String),
    /// A rate-limit rule denied the request.
    #[error("rate limit `{rule}` exceeded; retry in {}s", retry_after.as_secs().max(1))]
    RateLimited {
        /// The rule that denied.
        rule: String,
        /// How long until the request would be allowed.
        retry_after: Duration,
    },
    /// A rate-limit rule holds as many keys as the backend may keep (`security.max_limiter_keys`)
    /// and this key is not one of them: refused until held state expires.
    #[error(
        "rate limit `{rule}` is tracking as many keys as security.max_limiter_keys allows and this key is not one of them; retry in {}s (operators: raise security.max_limiter_keys if this is ordinary traffic)",
        retry_after.as_secs().max(1)
    )]
    LimiterFull {
        /// The rule whose keys are full.
        rule: String,
        /// A hint of when held state may have expired.
        retry_after: Duration,
    },
    /// The server is overloaded and shed the request.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (storage, the OAuth2 provider) cannot be reached; retrying later may work.
    #[error("{message}")]
    Unavailable {
        /// What is unavailable.
        message: String,
        /// A hint for when to retry, if known.
        retry_after: Option<Duration>,
    },
    /// The RPC exists in the contract but its behaviour has not been built yet.
    #[error("{0}")]
    Unimplemented(String),
    /// A bug or an unexpected failure. The message (and its source's) is logged, never sent to
    /// the client.
    #[error("internal error: {message}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    Internal {
        /// What failed, in our words.
        message: String,
        /// The underlying error, if there is one (a decoder's, a task's, a library's).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), message: message.into() }
    }

    /// An [`Error::Unavailable`] with no retry hint.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable { message: message.into(), retry_after: None }
    }

    /// An [`Error::Internal`] from any displayable cause, with no source.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Error::Internal { message: cause.to_string(), source: None }
    }

    /// An [`Error::Internal`] that says what failed (`message`) and keeps why (`source`).
    pub fn internal_from(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Internal { message: message.into(), source: Some(Box::new(source)) }
    }

    /// A short machine-readable reason, used as the `ErrorInfo.reason` of the status.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::Unauthenticated(_) => "UNAUTHENTICATED",
            Error::PermissionDenied(_) => "PERMISSION_DENIED",
            Error::NotFound(_) => "NOT_FOUND",
            Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Error::OutOfRange(_) => "OUT_OF_RANGE",
            Error::LogReset(_) => "REVOCATION_LOG_RESET",
            Error::Aborted(_) => "ABORTED",
            Error::RateLimited { .. } => "RATE_LIMITED",
            Error::LimiterFull { .. } => "RATE_LIMIT_KEYS_FULL",
            Error::ResourceExhausted(_) => "OVERLOADED",
            Error::Unavailable { .. } => "UNAVAILABLE",
            Error::Unimplemented(_) => "UNIMPLEMENTED",
            Error::Internal { .. } => "INTERNAL",
        }
    }
}

/// A configuration problem, already phrased for a person: it names the setting. It lives here,
/// below every other module, because the storage backends report a bad `redis.url` with it
/// while they sit below `config` in the layer order (ARCHITECTURE.md).
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_keep_their_source() {
        let decode = serde_json::from_slice::<u32>(b"{").unwrap_err();
        let error = Error::internal_from("stored session is unreadable", decode);
        let source = std::error::Error::source(&error).expect("the decoder's error is the source");
        assert!(source.is::<serde_json::Error>());
        assert!(error.to_string().starts_with("internal error: stored session is unreadable: invalid type"), "{error}");
        assert!(std::error::Error::source(&Error::internal("no cause")).is_none());
    }
}
