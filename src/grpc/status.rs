//! The one place where the crate's [`Error`] becomes a `tonic::Status`.
//!
//! Every status carries a google.rpc `ErrorInfo` (a stable reason and the domain), invalid
//! arguments a `BadRequest` naming the field, and rate limits and outages a `RetryInfo` when a
//! retry helps. Internal causes are logged here and replaced by "internal error" on the wire.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// The `ErrorInfo.domain` of every status this service returns.
pub const ERROR_DOMAIN: &str = "session-authority";

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let mut details = ErrorDetails::new();
        details.set_error_info(error.reason(), ERROR_DOMAIN, std::collections::HashMap::new());
        let code = match &error {
            Error::InvalidArgument { field, message } => {
                details.add_bad_request_violation(field.clone(), message.clone());
                Code::InvalidArgument
            }
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) | Error::LogReset(_) => Code::OutOfRange,
            Error::Aborted(_) => Code::Aborted,
            Error::RateLimited { retry_after, .. } | Error::LimiterFull { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
                Code::ResourceExhausted
            }
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable { retry_after, .. } => {
                if let Some(delay) = retry_after {
                    details.set_retry_info(Some(*delay));
                }
                Code::Unavailable
            }
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Internal { .. } => {
                tracing::error!(cause = %error, "internal error");
                return Status::with_error_details(Code::Internal, "internal error", details);
            }
        };
        Status::with_error_details(code, error.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limits_carry_retry_info() {
        let status: Status =
            Error::RateLimited { rule: "session_create".into(), retry_after: Duration::from_secs(30) }.into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(details.retry_info().unwrap().retry_delay, Some(Duration::from_secs(30)));
        assert_eq!(details.error_info().unwrap().reason, "RATE_LIMITED");

        let status: Status =
            Error::LimiterFull { rule: "validate_failure".into(), retry_after: Duration::from_secs(60) }.into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("security.max_limiter_keys"), "{}", status.message());
        let details = status.get_error_details();
        assert_eq!(details.retry_info().unwrap().retry_delay, Some(Duration::from_secs(60)));
        assert_eq!(details.error_info().unwrap().reason, "RATE_LIMIT_KEYS_FULL");
    }

    #[test]
    fn invalid_arguments_name_the_field() {
        let status: Status = Error::invalid("user_id", "required").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("user_id"));
        let violations = status.get_error_details().bad_request().unwrap().field_violations.clone();
        assert_eq!(violations[0].field, "user_id");
    }

    #[test]
    fn a_reset_log_is_out_of_range_with_its_reason() {
        let status: Status = Error::LogReset("re-snapshot with ListRevocations".into()).into();
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(status.get_error_details().error_info().unwrap().reason, "REVOCATION_LOG_RESET");
    }

    #[test]
    fn internal_causes_stay_private() {
        let status: Status = Error::internal("redb: table corrupted at page 7").into();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
