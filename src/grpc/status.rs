//! The one place where application errors become gRPC statuses. Internal details go to the
//! log, never to the client.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};
use tracing::error;

use crate::service::ServiceError;

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::InvalidArgument(violations) => {
                let summary = violations
                    .iter()
                    .map(|violation| format!("{}: {}", violation.field, violation.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = violations
                    .into_iter()
                    .map(|violation| FieldViolation::new(violation.field, violation.description))
                    .collect::<Vec<_>>();
                Status::with_error_details(Code::InvalidArgument, summary, ErrorDetails::with_bad_request(details))
            }
            ServiceError::NotFound(message) => Status::not_found(message),
            ServiceError::AlreadyExists(message) => Status::already_exists(message),
            ServiceError::FailedPrecondition(message) => Status::failed_precondition(message),
            ServiceError::ResourceExhausted(message) => Status::resource_exhausted(message),
            ServiceError::Unavailable(source) => {
                error!(error = %source, "store unavailable");
                Status::unavailable("the key store is unavailable; retry later")
            }
            ServiceError::Internal(detail) => {
                error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
