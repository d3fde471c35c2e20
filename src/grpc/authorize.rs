//! `keygate.v1.Authorize`: the decision API for backends.

use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::instrument;

use super::convert;
use crate::domain::key::MAX_KEY_BYTES;
use crate::domain::validation::Violations;
use crate::proto::authorize_server::Authorize;
use crate::proto::{CheckRequest, CheckResponse};
use crate::service::{self, Authorizer, ServiceError};

/// The Authorize gRPC service.
pub struct AuthorizeApi {
    authorizer: Authorizer,
    /// The same statuses and messages as Envoy's denies.
    answers: std::sync::Arc<crate::answers::Answers>,
}

impl AuthorizeApi {
    pub fn new(authorizer: Authorizer, answers: std::sync::Arc<crate::answers::Answers>) -> Self {
        Self { authorizer, answers }
    }
}

impl TryFrom<CheckRequest> for service::CheckRequest {
    type Error = ServiceError;

    fn try_from(request: CheckRequest) -> Result<Self, ServiceError> {
        let mut violations = Violations::default();
        if request.key.len() > MAX_KEY_BYTES {
            violations.add("key", format!("must be at most {MAX_KEY_BYTES} bytes"));
        }
        let scope = violations.required_scope("scope", &request.scope);
        if !request.site_id.is_empty() {
            violations.id("site_id", &request.site_id);
        }
        if !request.tenant_id.is_empty() {
            violations.id("tenant_id", &request.tenant_id);
        }
        let site_id = Some(request.site_id).filter(|site| !site.is_empty());
        let tenant_id = Some(request.tenant_id).filter(|tenant| !tenant.is_empty());
        match (violations.finish(()), scope) {
            (Ok(()), Some(scope)) => Ok(Self { key: request.key, scope, site_id, tenant_id }),
            (Err(violations), _) => Err(violations.into()),
            (Ok(()), None) => Err(ServiceError::invalid("scope", "is required")),
        }
    }
}

#[tonic::async_trait]
impl Authorize for AuthorizeApi {
    #[instrument(name = "Authorize.Check", skip_all, fields(scope = Empty, reason = Empty, tenant_id = Empty, key_id = Empty))]
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let request = service::CheckRequest::try_from(request.into_inner())?;
        let span = tracing::Span::current();
        span.record("scope", request.scope.as_str());
        let outcome = self.authorizer.check(&request).await?;
        super::record_decision(&outcome);
        let site_id = request.site_id.as_deref().unwrap_or_default();
        Ok(Response::new(convert::check_response(&self.answers, &outcome, request.scope.as_str(), site_id)))
    }
}
