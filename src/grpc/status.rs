//! The one place where application errors become gRPC statuses. Internal details go to the
//! log, never to the client; what the client sent is echoed only in bounded pieces.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};
use tracing::error;

use crate::service::ServiceError;
use crate::telemetry::Throttle;

/// Most field violations one status lists; the rest are summed up in one more.
const MAX_VIOLATIONS: usize = 20;
/// The longest field path and description of a violation, in characters.
const MAX_FIELD_CHARS: usize = 96;
const MAX_DESCRIPTION_CHARS: usize = 200;

/// `text` in at most `max` characters (at least 1): cut, with an ellipsis as the last, when it
/// is longer.
pub(crate) fn bounded(text: &str, max: usize) -> String {
    if text.chars().nth(max).is_none() {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        // Log lines carry no span: the call they belong to is named here.
        let call = super::middleware::current_call();
        match error {
            ServiceError::InvalidArgument(violations) => {
                let total = violations.len();
                let mut shown: Vec<FieldViolation> = violations
                    .into_iter()
                    .take(MAX_VIOLATIONS)
                    .map(|violation| {
                        FieldViolation::new(
                            bounded(&violation.field, MAX_FIELD_CHARS),
                            bounded(&violation.description, MAX_DESCRIPTION_CHARS),
                        )
                    })
                    .collect();
                if total > MAX_VIOLATIONS {
                    shown.push(FieldViolation::new("", format!("and {} more violations", total - MAX_VIOLATIONS)));
                }
                let summary = shown
                    .iter()
                    .map(|violation| format!("{}: {}", violation.field, violation.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let summary = bounded(&summary, crate::grpc::MAX_MESSAGE_CHARS);
                Status::with_error_details(Code::InvalidArgument, summary, ErrorDetails::with_bad_request(shown))
            }
            ServiceError::NotFound(message) => Status::not_found(bounded(&message, MAX_DESCRIPTION_CHARS)),
            ServiceError::AlreadyExists(message) => Status::already_exists(bounded(&message, MAX_DESCRIPTION_CHARS)),
            ServiceError::FailedPrecondition(message) => {
                Status::failed_precondition(bounded(&message, MAX_DESCRIPTION_CHARS))
            }
            ServiceError::ResourceExhausted(message) => {
                Status::resource_exhausted(bounded(&message, MAX_DESCRIPTION_CHARS))
            }
            ServiceError::Unavailable(source) => {
                // An outage fails every call: one line per interval says so, with the count.
                static UNAVAILABLE: Throttle = Throttle::every(Duration::from_secs(10));
                if let Some(suppressed) = UNAVAILABLE.allow() {
                    error!(service = call.service, method = call.method, error = %source, suppressed, "store unavailable");
                }
                Status::unavailable("the key store is unavailable; retry later")
            }
            ServiceError::DataLoss(detail) => {
                static DATA_LOSS: Throttle = Throttle::every(Duration::from_secs(1));
                if let Some(suppressed) = DATA_LOSS.allow() {
                    error!(service = call.service, method = call.method, error = %detail, suppressed, "stored data is unreadable");
                }
                Status::data_loss("stored data is unreadable; the operator must check the database")
            }
            ServiceError::Internal(detail) => {
                static INTERNAL: Throttle = Throttle::every(Duration::from_secs(1));
                if let Some(suppressed) = INTERNAL.allow() {
                    error!(service = call.service, method = call.method, error = %detail, suppressed, "internal error");
                }
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::validation::FieldViolation as Violation;

    #[test]
    fn statuses_never_echo_more_than_a_bounded_piece_of_the_request() {
        let huge = "x".repeat(3_000_000);
        let violations = (0..100)
            .map(|index| Violation { field: format!("metadata[{huge}{index}]"), description: huge.clone() })
            .collect();
        let status = Status::from(ServiceError::InvalidArgument(violations));
        assert!(status.message().chars().count() <= crate::grpc::MAX_MESSAGE_CHARS);
        let details = status.get_error_details();
        let listed = &details.bad_request().unwrap().field_violations;
        assert_eq!(listed.len(), MAX_VIOLATIONS + 1);
        assert!(listed.iter().all(|violation| violation.field.chars().count() <= MAX_FIELD_CHARS));
        assert!(Status::from(ServiceError::NotFound(huge)).message().len() < 1000);
    }
}
