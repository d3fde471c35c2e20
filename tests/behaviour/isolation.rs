//! Tenant isolation: no call with tenant A reads or touches B's keys or sites, both ways.

use keygate::proto::*;
use prost_types::FieldMask;
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [
        tenants_cannot_see_or_touch_each_others_keys_and_sites,
    ],
    once: [],
);

async fn tenants_cannot_see_or_touch_each_others_keys_and_sites(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    for (tenant, site) in [("acme", "acme-site"), ("globex", "globex-site")] {
        put_tenant(&app, tenant).await;
        put_site(&app, tenant, site).await.unwrap();
    }
    let (acme_key, acme_secret) = create_key(&app, key_request("acme", &["*"])).await.unwrap();
    let (globex_key, globex_secret) = create_key(&app, key_request("globex", &["*"])).await.unwrap();

    for (me, other_key, other_site, my_secret) in
        [("acme", &globex_key, "globex-site", &acme_secret), ("globex", &acme_key, "acme-site", &globex_secret)]
    {
        let mut admin = app.admin.clone();
        let key_id = other_key.key_id.clone();
        let get = GetKeyRequest { tenant_id: me.into(), key_id: key_id.clone() };
        assert_status(admin.get_key(get).await, Code::NotFound, None);
        let revoke = RevokeKeyRequest { tenant_id: me.into(), key_id: key_id.clone() };
        assert_status(admin.revoke_key(revoke).await, Code::NotFound, None);
        let rotate = RotateKeyRequest { tenant_id: me.into(), key_id: key_id.clone(), grace_period: None };
        assert_status(admin.rotate_key(rotate).await, Code::NotFound, None);
        let update = UpdateKeyRequest {
            tenant_id: me.into(),
            key_id: key_id.clone(),
            name: "pwned".into(),
            update_mask: Some(FieldMask { paths: vec!["name".into()] }),
            ..Default::default()
        };
        assert_status(admin.update_key(update).await, Code::NotFound, None);
        let delete = DeleteSiteRequest { tenant_id: me.into(), site_id: other_site.into() };
        assert_status(admin.delete_site(delete).await, Code::NotFound, None);
        assert_status(put_site(&app, me, other_site).await, Code::AlreadyExists, None);
        let mut restricted = key_request(me, &["*"]);
        restricted.site_ids = vec![other_site.into()];
        assert_status(create_key(&app, restricted).await, Code::InvalidArgument, Some("site_ids[0]"));
        let list = ListKeysRequest { tenant_id: me.into(), include_revoked: true, ..Default::default() };
        let listed = admin.list_keys(list).await.unwrap().into_inner().keys;
        assert!(listed.iter().all(|key| key.tenant_id == me && key.key_id != key_id));
        let sites = ListSitesRequest { tenant_id: me.into(), ..Default::default() };
        let sites = admin.list_sites(sites).await.unwrap().into_inner().sites;
        assert!(sites.iter().all(|site| site.site_id != other_site));
        let response = check(&app, my_secret, "events:read", other_site).await;
        assert_eq!(response.reason(), DenyReason::SiteForbidden);
    }
    // Nothing above changed the other tenant's key.
    for (tenant, secret, site) in [("acme", &acme_secret, "acme-site"), ("globex", &globex_secret, "globex-site")] {
        let response = check(&app, secret, "events:read", site).await;
        assert!(response.allowed, "{tenant}: {response:?}");
        assert_eq!(response.key_name, "test key");
    }
}
