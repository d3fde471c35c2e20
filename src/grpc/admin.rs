//! `keygate.v1.KeyAdmin`: thin handlers that decode, call [`KeyService`] and encode.

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::auth::caller;
use super::{Untrusted, convert};
use crate::domain::clock::Clock;
use crate::domain::model::KeyPatch;
use crate::proto::key_admin_server::KeyAdmin;
use crate::proto::*;
use crate::service::{CreateKey, KeyService, ListKeys};

/// The KeyAdmin gRPC service.
pub struct KeyAdminApi {
    keys: KeyService,
    clock: std::sync::Arc<dyn Clock>,
}

impl KeyAdminApi {
    pub fn new(keys: KeyService, clock: std::sync::Arc<dyn Clock>) -> Self {
        Self { keys, clock }
    }

    fn key(&self, key: &crate::domain::model::KeyRecord) -> ApiKey {
        convert::api_key(key, self.clock.now())
    }
}

#[tonic::async_trait]
impl KeyAdmin for KeyAdminApi {
    #[instrument(name = "KeyAdmin.PutTenant", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn put_tenant(&self, request: Request<PutTenantRequest>) -> Result<Response<PutTenantResponse>, Status> {
        let actor = caller(&request).to_owned();
        let (tenant_id, changes) = convert::put_tenant(request.into_inner())?;
        let tenant = self.keys.put_tenant(actor, tenant_id, changes).await?;
        let tenant = convert::tenant(&tenant, self.keys.effective_max_keys(&tenant));
        Ok(Response::new(PutTenantResponse { tenant: Some(tenant) }))
    }

    #[instrument(name = "KeyAdmin.GetTenant", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn get_tenant(&self, request: Request<GetTenantRequest>) -> Result<Response<GetTenantResponse>, Status> {
        let request = request.into_inner();
        convert::ids(&[("tenant_id", &request.tenant_id)])?;
        let tenant = self.keys.get_tenant(&request.tenant_id).await?;
        let tenant = convert::tenant(&tenant, self.keys.effective_max_keys(&tenant));
        Ok(Response::new(GetTenantResponse { tenant: Some(tenant) }))
    }

    #[instrument(name = "KeyAdmin.PutSite", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn put_site(&self, request: Request<PutSiteRequest>) -> Result<Response<PutSiteResponse>, Status> {
        let actor = caller(&request).to_owned();
        let request = request.into_inner();
        convert::put_site(&request)?;
        let site = self.keys.put_site(actor, request.tenant_id, request.site_id, request.display_name).await?;
        Ok(Response::new(PutSiteResponse { site: Some(convert::site(&site)) }))
    }

    #[instrument(name = "KeyAdmin.DeleteSite", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn delete_site(&self, request: Request<DeleteSiteRequest>) -> Result<Response<DeleteSiteResponse>, Status> {
        let actor = caller(&request).to_owned();
        let request = request.into_inner();
        convert::ids(&[("tenant_id", &request.tenant_id), ("site_id", &request.site_id)])?;
        self.keys.delete_site(actor, request.tenant_id, request.site_id).await?;
        Ok(Response::new(DeleteSiteResponse {}))
    }

    #[instrument(name = "KeyAdmin.ListSites", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn list_sites(&self, request: Request<ListSitesRequest>) -> Result<Response<ListSitesResponse>, Status> {
        let request = request.into_inner();
        let page_size = convert::list(&request.tenant_id, request.page_size)?;
        let page = self.keys.list_sites(&request.tenant_id, page_size, &request.page_token).await?;
        let sites = page.items.iter().map(convert::site).collect();
        Ok(Response::new(ListSitesResponse { sites, next_page_token: page.next_page_token }))
    }

    #[instrument(name = "KeyAdmin.CreateKey", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn create_key(&self, request: Request<CreateKeyRequest>) -> Result<Response<CreateKeyResponse>, Status> {
        let actor = caller(&request).to_owned();
        let request = CreateKey::try_from(request.into_inner())?;
        let (key, secret) = self.keys.create_key(&actor, request).await?;
        Ok(Response::new(CreateKeyResponse { key: Some(self.key(&key)), secret: secret.expose() }))
    }

    #[instrument(name = "KeyAdmin.GetKey", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<GetKeyResponse>, Status> {
        let request = request.into_inner();
        convert::ids(&[("tenant_id", &request.tenant_id), ("key_id", &request.key_id)])?;
        let key = self.keys.get_key(&request.tenant_id, &request.key_id).await?;
        Ok(Response::new(GetKeyResponse { key: Some(self.key(&key)) }))
    }

    #[instrument(name = "KeyAdmin.ListKeys", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn list_keys(&self, request: Request<ListKeysRequest>) -> Result<Response<ListKeysResponse>, Status> {
        let request = ListKeys::try_from(request.into_inner())?;
        let page = self.keys.list_keys(&request).await?;
        let keys = page.items.iter().map(|key| self.key(key)).collect();
        Ok(Response::new(ListKeysResponse { keys, next_page_token: page.next_page_token }))
    }

    #[instrument(name = "KeyAdmin.UpdateKey", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn update_key(&self, request: Request<UpdateKeyRequest>) -> Result<Response<UpdateKeyResponse>, Status> {
        let actor = caller(&request).to_owned();
        let request = request.into_inner();
        let (tenant_id, key_id) = (request.tenant_id.clone(), request.key_id.clone());
        let patch = KeyPatch::try_from(request)?;
        let key = self.keys.update_key(actor, tenant_id, key_id, patch).await?;
        Ok(Response::new(UpdateKeyResponse { key: Some(self.key(&key)) }))
    }

    #[instrument(name = "KeyAdmin.RevokeKey", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn revoke_key(&self, request: Request<RevokeKeyRequest>) -> Result<Response<RevokeKeyResponse>, Status> {
        let actor = caller(&request).to_owned();
        let request = request.into_inner();
        convert::ids(&[("tenant_id", &request.tenant_id), ("key_id", &request.key_id)])?;
        let key = self.keys.revoke_key(actor, request.tenant_id, request.key_id).await?;
        Ok(Response::new(RevokeKeyResponse { key: Some(self.key(&key)) }))
    }

    #[instrument(name = "KeyAdmin.RotateKey", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn rotate_key(&self, request: Request<RotateKeyRequest>) -> Result<Response<RotateKeyResponse>, Status> {
        let actor = caller(&request).to_owned();
        let request = request.into_inner();
        let grace = convert::rotate_key(&request)?;
        let rotation = self.keys.rotate_key(actor, request.tenant_id, request.key_id, grace).await?;
        Ok(Response::new(RotateKeyResponse {
            key: Some(self.key(&rotation.key)),
            secret: rotation.secret.expose(),
            previous_key: Some(self.key(&rotation.previous_key)),
        }))
    }

    #[instrument(name = "KeyAdmin.ImportKeys", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn import_keys(&self, request: Request<ImportKeysRequest>) -> Result<Response<ImportKeysResponse>, Status> {
        let actor = caller(&request).to_owned();
        let request = convert::import_keys(request.into_inner())?;
        let results = self.keys.import_keys(&actor, request).await?;
        let results = results
            .into_iter()
            .map(|result| ImportKeyResult {
                result: Some(match result {
                    Ok(key) => import_key_result::Result::Key(self.key(&key)),
                    Err(error) => import_key_result::Result::Error(convert::import_error(error)),
                }),
            })
            .collect();
        Ok(Response::new(ImportKeysResponse { results }))
    }

    #[instrument(name = "KeyAdmin.GetKeyUsage", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn get_key_usage(
        &self,
        request: Request<GetKeyUsageRequest>,
    ) -> Result<Response<GetKeyUsageResponse>, Status> {
        let request = request.into_inner();
        let (first, last) = convert::usage_range(&request)?;
        let days = self.keys.get_key_usage(&request.tenant_id, &request.key_id, first, last).await?;
        Ok(Response::new(GetKeyUsageResponse { days: days.iter().map(convert::daily_usage).collect() }))
    }

    #[instrument(name = "KeyAdmin.ListAuditEvents", skip_all, fields(caller = caller(&request), tenant_id = ?Untrusted(&request.get_ref().tenant_id)))]
    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let request = request.into_inner();
        let (filter, page_size) = convert::audit_filter(&request)?;
        let page = self.keys.list_audit_events(&request.tenant_id, &filter, page_size, &request.page_token).await?;
        let events = page.items.iter().map(convert::audit_event).collect();
        Ok(Response::new(ListAuditEventsResponse { events, next_page_token: page.next_page_token }))
    }
}
