//! `envoy.service.auth.v3.Authorization`: Envoy's ext_authz, served next to keygate's own APIs.

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::instrument;

use crate::gateway::Gateway;

/// The ext_authz gRPC service.
pub struct EnvoyAuthorizationApi {
    gateway: Gateway,
}

impl EnvoyAuthorizationApi {
    pub fn new(gateway: Gateway) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyAuthorizationApi {
    #[instrument(name = "envoy.Authorization.Check", skip_all, fields(reason = Empty, tenant_id = Empty, key_id = Empty))]
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.gateway.check(request.get_ref()).await?))
    }
}
