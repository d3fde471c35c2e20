//! PutTenant, GetTenant, PutSite, DeleteSite, ListSites.

use keygate::proto::*;
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [
        a_new_tenant_gets_documented_defaults,
        put_tenant_changes_only_the_fields_it_sets,
        an_unknown_tenant_is_not_found,
        a_site_belongs_to_exactly_one_tenant,
        sites_are_listed_in_pages_and_can_be_deleted,
    ],
    once: [],
);

async fn a_new_tenant_gets_documented_defaults(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let tenant = put_tenant(&app, "acme").await;
    assert_eq!(tenant.tenant_id, "acme");
    assert_eq!(tenant.display_name, "acme");
    assert!(tenant.api_access_enabled);
    assert_eq!((tenant.max_keys, tenant.effective_max_keys), (0, 10));
    assert_eq!((tenant.rate_limit_per_minute, tenant.daily_request_quota), (0, 0));
    assert!(tenant.created_at.is_some());
}

async fn put_tenant_changes_only_the_fields_it_sets(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut admin = app.admin.clone();
    let first = PutTenantRequest {
        tenant_id: "acme".into(),
        display_name: Some("Acme Inc".into()),
        api_access_enabled: Some(false),
        max_keys: Some(3),
        rate_limit_per_minute: Some(120),
        daily_request_quota: Some(10_000),
        unlimited_keys: Some(false),
        shared_rate_limit: Some(500),
        shared_rate_limit_window: RateLimitWindow::Hour.into(),
    };
    admin.put_tenant(first).await.unwrap();
    let second = PutTenantRequest { tenant_id: "acme".into(), api_access_enabled: Some(true), ..Default::default() };
    let tenant = admin.put_tenant(second).await.unwrap().into_inner().tenant.unwrap();
    assert_eq!(tenant.display_name, "Acme Inc");
    assert!(tenant.api_access_enabled);
    assert_eq!((tenant.max_keys, tenant.effective_max_keys), (3, 3));
    assert_eq!((tenant.rate_limit_per_minute, tenant.daily_request_quota), (120, 10_000));
    assert_eq!((tenant.shared_rate_limit, tenant.shared_rate_limit_window()), (500, RateLimitWindow::Hour));
    assert!(!tenant.unlimited_keys);
    let fetched = admin.get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await.unwrap().into_inner();
    assert_eq!(fetched.tenant.unwrap(), tenant);
}

async fn an_unknown_tenant_is_not_found(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut admin = app.admin.clone();
    assert_status(admin.get_tenant(GetTenantRequest { tenant_id: "ghost".into() }).await, Code::NotFound, None);
    assert_status(create_key(&app, key_request("ghost", &["events:read"])).await, Code::NotFound, None);
    assert_status(put_site(&app, "ghost", "site-1").await, Code::NotFound, None);
    let list = ListKeysRequest { tenant_id: "ghost".into(), ..Default::default() };
    assert_status(admin.list_keys(list).await, Code::NotFound, None);
    // Tenant ids are case-sensitive on every backend.
    put_tenant(&app, "acme").await;
    assert_status(admin.get_tenant(GetTenantRequest { tenant_id: "ACME".into() }).await, Code::NotFound, None);
}

async fn a_site_belongs_to_exactly_one_tenant(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    put_tenant(&app, "globex").await;
    let site = put_site(&app, "acme", "shop.example").await.unwrap();
    assert_eq!((site.tenant_id.as_str(), site.display_name.as_str()), ("acme", "shop.example"));
    let renamed =
        PutSiteRequest { tenant_id: "acme".into(), site_id: "shop.example".into(), display_name: "Shop".into() };
    let renamed = app.admin.clone().put_site(renamed).await.unwrap().into_inner().site.unwrap();
    assert_eq!(renamed.display_name, "Shop");
    assert_eq!(renamed.created_at, site.created_at);
    assert_status(put_site(&app, "globex", "shop.example").await, Code::AlreadyExists, None);
    // The failed claim changed nothing.
    let sites = list_sites(&app, "acme", 10, "").await.0;
    assert_eq!(sites.iter().map(|s| s.display_name.as_str()).collect::<Vec<_>>(), ["Shop"]);

    // For good: once acme deletes it, nobody else can take it, and a key of another tenant is
    // never allowed on it; acme can create it again.
    let (_, globex_key) = create_key(&app, key_request("globex", &["events:read"])).await.unwrap();
    let delete = DeleteSiteRequest { tenant_id: "acme".into(), site_id: "shop.example".into() };
    app.admin.clone().delete_site(delete).await.unwrap();
    assert!(list_sites(&app, "acme", 10, "").await.0.is_empty(), "a deleted site is not listed");
    assert_status(put_site(&app, "globex", "shop.example").await, Code::AlreadyExists, None);
    assert!(list_sites(&app, "globex", 10, "").await.0.is_empty());
    assert_eq!(check(&app, &globex_key, "events:read", "shop.example").await.reason(), DenyReason::SiteForbidden);
    let mut restricted = key_request("globex", &["events:read"]);
    restricted.site_ids = vec!["shop.example".into()];
    assert_status(create_key(&app, restricted).await, Code::InvalidArgument, Some("site_ids[0]"));
    let again = put_site(&app, "acme", "shop.example").await.unwrap();
    assert_eq!(again.tenant_id, "acme");
    let (_, acme_key) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &acme_key, "events:read", "shop.example").await.allowed);
}

async fn sites_are_listed_in_pages_and_can_be_deleted(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    put_tenant(&app, "acme").await;
    for index in 0..5 {
        put_site(&app, "acme", &format!("site-{index}")).await.unwrap();
    }
    let (first, token) = list_sites(&app, "acme", 2, "").await;
    let (second, token) = list_sites(&app, "acme", 2, &token).await;
    let (third, token) = list_sites(&app, "acme", 2, &token).await;
    assert!(token.is_empty());
    let ids: Vec<_> = first.iter().chain(&second).chain(&third).map(|s| s.site_id.clone()).collect();
    assert_eq!(ids, ["site-0", "site-1", "site-2", "site-3", "site-4"]);

    let delete = DeleteSiteRequest { tenant_id: "acme".into(), site_id: "site-1".into() };
    app.admin.clone().delete_site(delete.clone()).await.unwrap();
    assert_status(app.admin.clone().delete_site(delete).await, Code::NotFound, None);
    assert_eq!(list_sites(&app, "acme", 0, "").await.0.len(), 4);
}

pub async fn list_sites(app: &TestApp, tenant_id: &str, page_size: i32, page_token: &str) -> (Vec<Site>, String) {
    let request = ListSitesRequest { tenant_id: tenant_id.into(), page_size, page_token: page_token.into() };
    let response = app.admin.clone().list_sites(request).await.unwrap().into_inner();
    (response.sites, response.next_page_token)
}
