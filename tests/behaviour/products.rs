//! The reference products, each served end to end by keygate behind Envoy from its
//! `examples/<product>/keygate.toml` and `examples/<product>/envoy.yaml` exactly: every statement
//! of the product's API-key documentation that keygate is responsible for, asserted through real
//! HTTP requests. The README's "Reference products" table maps statements to these tests.

use keygate::proto::*;
use serde_json::json;
use tonic::Code;

use crate::envoy_support::*;
use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        engagetrack_documentation_holds_through_envoy,
        eventicat_documentation_holds_through_envoy,
        trackagoat_documentation_holds_through_envoy,
        jetrack_documentation_holds_through_envoy,
        zerotrust_documentation_holds_through_envoy,
    ],
);

/// keygate started from `examples/<product>/keygate.toml`, Envoy from its `envoy.yaml`.
struct Product {
    app: TestApp,
    envoy: Envoy,
}

async fn product(name: &str, envoy_yaml: &str) -> Option<Product> {
    product_with(name, envoy_yaml, &[]).await
}

/// [`product`] with replacements in the Envoy config (a file path of the test's).
async fn product_with(name: &str, envoy_yaml: &str, replacements: &[(&str, &str)]) -> Option<Product> {
    let binary = envoy_binary()?;
    let config = format!("{}/examples/{name}/keygate.toml", env!("CARGO_MANIFEST_DIR"));
    let app = spawn_app_with(Backend::Sqlite, &["--config", &config]).await?;
    let upstream = start_echo_upstream().await;
    let envoy = Envoy::start_with(&binary, envoy_yaml, replacements, app.address, upstream).await;
    Some(Product { app, envoy })
}

impl Product {
    async fn call(&self, method: &str, target: &str, key: &str) -> HttpResponse {
        let bearer = format!("Bearer {key}");
        request(self.envoy.address, method, target, &[("authorization", &bearer)]).await.unwrap()
    }

    async fn key(&self, tenant: &str, scopes: &[&str]) -> (ApiKey, String) {
        create_key(&self.app, key_request(tenant, scopes)).await.unwrap()
    }
}

#[track_caller]
fn assert_answer(response: &HttpResponse, status: u16, body: serde_json::Value) {
    assert_eq!((response.status, response.json()), (status, body), "{response:?}");
}

async fn engagetrack_documentation_holds_through_envoy() {
    let Some(et) = product("engagetrack", include_str!("../../examples/engagetrack/envoy.yaml")).await else { return };
    put_tenant(&et.app, "org_1").await;
    put_tenant(&et.app, "org_2").await;
    let all = [
        "analytics:read",
        "sites:read",
        "goals:read",
        "goals:write",
        "funnels:read",
        "funnels:write",
        "annotations:read",
        "annotations:write",
        "visitors:read",
    ];
    // "API keys follow the format et_live_ followed by 32 hexadecimal characters".
    let (_, full) = et.key("org_1", &all).await;
    assert!(full.starts_with("et_live_") && full.len() == 40, "{full}");
    assert!(full[8..].bytes().all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase()), "{full}");
    // "The full API key is shown only once at creation."
    let mut admin = et.app.admin.clone();
    let listed = admin.list_keys(ListKeysRequest { tenant_id: "org_1".into(), ..Default::default() }).await;
    let listed = format!("{:?}", listed.unwrap().into_inner());
    assert!(!listed.contains(&full[12..]), "listing shows no more than the display prefix");
    // "Pass the key as a Bearer token in the Authorization header" of
    // /api/v1/organizations/{orgId}/sites.
    assert_eq!(et.call("GET", "/api/v1/organizations/org_1/sites", &full).await.status, 200);
    let header_only =
        request(et.envoy.address, "GET", "/api/v1/organizations/org_1/sites", &[("x-api-key", &full)]).await;
    assert_answer(&header_only.unwrap(), 401, json!({"error": "Invalid or expired API key"}));
    // Each scope grants its endpoints.
    for (method, path) in [
        ("GET", "stats"),
        ("GET", "charts"),
        ("GET", "pages"),
        ("GET", "sources"),
        ("GET", "devices"),
        ("GET", "locations"),
        ("GET", "revenue"),
        ("GET", "channels"),
        ("GET", "goals"),
        ("PATCH", "goals/g1"),
        ("GET", "funnels"),
        ("POST", "funnels"),
        ("DELETE", "funnels/f1"),
        ("GET", "annotations"),
        ("POST", "annotations"),
        ("GET", "visitors"),
    ] {
        let target = format!("/api/v1/organizations/org_1/{path}");
        assert_eq!(et.call(method, &target, &full).await.status, 200, "{method} {target}");
    }
    // "Write scopes do not imply read access."
    let (_, goals_write) = et.key("org_1", &["goals:write"]).await;
    assert_eq!(et.call("PATCH", "/api/v1/organizations/org_1/goals/g1", &goals_write).await.status, 200);
    let response = et.call("GET", "/api/v1/organizations/org_1/goals", &goals_write).await;
    assert_answer(&response, 403, json!({"error": "API key missing required scope: goals:read"}));
    // "403 Forbidden { "error": "API key missing required scope: analytics:read" }"
    let (_, sites_only) = et.key("org_1", &["sites:read"]).await;
    let response = et.call("GET", "/api/v1/organizations/org_1/stats", &sites_only).await;
    assert_answer(&response, 403, json!({"error": "API key missing required scope: analytics:read"}));
    // Only the documented scopes can be granted.
    assert_status(create_key(&et.app, key_request("org_1", &["billing:read"])).await, Code::InvalidArgument, None);
    // "API keys cannot access management endpoints (billing, team, integrations)".
    for path in ["billing", "team", "integrations/slack", "Billing"] {
        let response = et.call("GET", &format!("/api/v1/organizations/org_1/{path}"), &full).await;
        assert_answer(&response, 403, json!({"error": "API keys cannot access management endpoints"}));
    }
    // No key can hold more than the listed scopes: wildcards are refused.
    for wildcard in ["*", "goals:*"] {
        assert_status(create_key(&et.app, key_request("org_1", &[wildcard])).await, Code::InvalidArgument, None);
    }
    // Another organization's data: never, and the answer says nothing about that organization.
    let other = et.call("GET", "/api/v1/organizations/org_2/sites", &full).await;
    let nobody = et.call("GET", "/api/v1/organizations/org_404/sites", &full).await;
    assert_answer(&other, 403, json!({"error": "API key cannot access this organization"}));
    assert_eq!((other.status, &other.body), (nobody.status, &nobody.body));
    // "401 Unauthorized { "error": "Invalid or expired API key" }: The key does not exist, has
    // been revoked, or has expired."
    let unknown = format!("et_live_{}", "0".repeat(32));
    assert_answer(
        &et.call("GET", "/api/v1/organizations/org_1/sites", &unknown).await,
        401,
        json!({"error": "Invalid or expired API key"}),
    );
    let (revoked, revoked_secret) = et.key("org_1", &["sites:read"]).await;
    let revoke = RevokeKeyRequest { tenant_id: "org_1".into(), key_id: revoked.key_id.clone() };
    et.app.admin.clone().revoke_key(revoke).await.unwrap();
    assert_answer(
        &et.call("GET", "/api/v1/organizations/org_1/sites", &revoked_secret).await,
        401,
        json!({"error": "Invalid or expired API key"}),
    );
    // "Optionally set an expiration date ... Expired keys return 401 Unauthorized."
    let mut expiring = key_request("org_1", &["sites:read"]);
    expiring.expiry = Some(create_key_request::Expiry::ExpiresIn(prost_types::Duration { seconds: 3_600, nanos: 0 }));
    let (_, expiring) = create_key(&et.app, expiring).await.unwrap();
    assert_eq!(et.call("GET", "/api/v1/organizations/org_1/sites", &expiring).await.status, 200);
    // "Maximum 10 API keys per organization" (the expired one frees its place below).
    // Working now: full, goals_write, sites_only, expiring.
    for _ in 4..10 {
        et.key("org_1", &["sites:read"]).await;
    }
    assert_status(create_key(&et.app, key_request("org_1", &["sites:read"])).await, Code::ResourceExhausted, None);
    et.app.clock.advance(chrono::Duration::seconds(3_601));
    assert_answer(
        &et.call("GET", "/api/v1/organizations/org_1/sites", &expiring).await,
        401,
        json!({"error": "Invalid or expired API key"}),
    );
    et.key("org_1", &["sites:read"]).await;
    // "Rate limits apply per-key."
    let mut limited = key_request("org_2", &["sites:read"]);
    limited.rate_limit_per_minute = 2;
    let (_, limited) = create_key(&et.app, limited).await.unwrap();
    let (_, neighbour) = et.key("org_2", &["sites:read"]).await;
    for _ in 0..2 {
        assert_eq!(et.call("GET", "/api/v1/organizations/org_2/sites", &limited).await.status, 200);
    }
    let response = et.call("GET", "/api/v1/organizations/org_2/sites", &limited).await;
    assert_eq!(response.status, 429, "{response:?}");
    assert!(response.headers.contains_key("retry-after"));
    assert_eq!(et.call("GET", "/api/v1/organizations/org_2/sites", &neighbour).await.status, 200, "per key");
    // "API keys require a Startup plan or higher."
    let downgrade =
        PutTenantRequest { tenant_id: "org_2".into(), api_access_enabled: Some(false), ..Default::default() };
    put_tenant_with(&et.app, downgrade).await;
    assert_answer(
        &et.call("GET", "/api/v1/organizations/org_2/sites", &neighbour).await,
        402,
        json!({"error": "API key access requires a Startup plan or higher"}),
    );
    assert_status(create_key(&et.app, key_request("org_2", &["sites:read"])).await, Code::FailedPrecondition, None);
    // "Enter a descriptive name": names are required.
    let mut unnamed = key_request("org_1", &["sites:read"]);
    unnamed.name = String::new();
    assert_status(create_key(&et.app, unnamed).await, Code::InvalidArgument, Some("name"));
}

async fn eventicat_documentation_holds_through_envoy() {
    let Some(ec) = product("eventicat", include_str!("../../examples/eventicat/envoy.yaml")).await else { return };
    // "API requests are rate-limited per user account": the account's shared limit.
    let account = PutTenantRequest {
        tenant_id: "account_1".into(),
        shared_rate_limit: Some(4),
        shared_rate_limit_window: RateLimitWindow::Minute.into(),
        ..Default::default()
    };
    put_tenant_with(&ec.app, account).await;
    put_tenant(&ec.app, "account_2").await;
    put_site(&ec.app, "account_1", "agg_1").await.unwrap();
    put_site(&ec.app, "account_2", "agg_2").await.unwrap();
    let (_, key) = ec.key("account_1", &["events:write"]).await;

    // "Method 1: URL Parameter": GET /api/event?_id=...&_apikey=...&name=user_signup; the API
    // never sees the key, and the rest of the query arrives as sent.
    let url = format!("/api/event?_id=agg_1&_apikey={key}&name=user_signup");
    let response = request(ec.envoy.address, "GET", &url, &[]).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.upstream_path(), "/api/event?_id=agg_1&name=user_signup");
    // "Method 2: Bearer Token (Recommended)": POST /api/event?_id=...
    let response = ec.call("POST", "/api/event?_id=agg_1", &key).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(!response.body.contains(&key[8..]), "the API never sees the key");

    // "401 Unauthorized: Your API key is invalid or missing."
    let invalid = json!({"error": "Invalid API key"});
    assert_answer(&request(ec.envoy.address, "GET", "/api/event?_id=agg_1", &[]).await.unwrap(), 401, invalid.clone());
    let unknown = crate::checks::well_formed_unknown_key();
    assert_answer(&ec.call("POST", "/api/event?_id=agg_1", &unknown).await, 401, invalid.clone());
    let typo = format!("/api/event?_id=agg_1&_apikey={}x", &key[..key.len() - 1]);
    assert_answer(&request(ec.envoy.address, "GET", &typo, &[]).await.unwrap(), 401, invalid.clone());

    // "404 Not Found: The aggregator ID is invalid or doesn't belong to your account."; "every
    // request must include _id".
    let not_found = json!({"error": "Invalid aggregator"});
    for target in ["/api/event?_id=agg_2", "/api/event?_id=agg_404", "/api/event", "/api/event?_id="] {
        assert_answer(&ec.call("POST", target, &key).await, 404, not_found.clone());
    }

    // "Regenerate compromised keys immediately": the old key stops at once.
    let (old, old_secret) = ec.key("account_2", &["events:write"]).await;
    assert_eq!(ec.call("POST", "/api/event?_id=agg_2", &old_secret).await.status, 200);
    let rotate = RotateKeyRequest { tenant_id: "account_2".into(), key_id: old.key_id.clone(), ..Default::default() };
    let rotated = ec.app.admin.clone().rotate_key(rotate).await.unwrap().into_inner();
    assert_answer(&ec.call("POST", "/api/event?_id=agg_2", &old_secret).await, 401, invalid.clone());
    assert_eq!(ec.call("POST", "/api/event?_id=agg_2", &rotated.secret).await.status, 200, "the new key works at once");

    // "429 Too Many Requests ... { "error", "limit", "remaining", "resetTime" }" and the
    // X-RateLimit-* headers, for the account's keys together.
    let (_, second) = ec.key("account_1", &["events:write"]).await;
    // Two requests above, two more with the account's other key: the limit of 4 is used up.
    assert_eq!(ec.call("POST", "/api/event?_id=agg_1", &second).await.status, 200);
    let last = ec.call("POST", "/api/event?_id=agg_1", &second).await;
    assert_eq!(last.status, 200);
    assert_eq!(last.headers.get("x-ratelimit-limit").map(String::as_str), Some("4"));
    assert_eq!(last.headers.get("x-ratelimit-remaining").map(String::as_str), Some("0"));
    let limited = ec.call("POST", "/api/event?_id=agg_1", &key).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    let body = limited.json();
    let reset: i64 = limited.headers["x-ratelimit-reset"].parse().unwrap();
    assert_eq!(body, json!({"error": "Rate limit exceeded", "limit": 4, "remaining": 0, "resetTime": reset}));
    assert_eq!(limited.headers.get("x-ratelimit-limit").map(String::as_str), Some("4"));
    assert_eq!(limited.headers.get("x-ratelimit-remaining").map(String::as_str), Some("0"));
    assert!(limited.headers.contains_key("retry-after"));
}

/// Every byte of a SQLite database (its file and write-ahead log).
fn database_bytes(url: &str) -> Vec<u8> {
    let path = url.trim_start_matches("sqlite://").split('?').next().unwrap().to_owned();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
    bytes
}

async fn trackagoat_documentation_holds_through_envoy() {
    let Some(tg) = product("trackagoat", include_str!("../../examples/trackagoat/envoy.yaml")).await else { return };
    // A plan tier: 3 active keys, 5 requests a day for the org, 2 a minute per key.
    let plan = PutTenantRequest {
        tenant_id: "org_a".into(),
        max_keys: Some(3),
        daily_request_quota: Some(5),
        rate_limit_per_minute: Some(2),
        ..Default::default()
    };
    put_tenant_with(&tg.app, plan).await;
    put_tenant(&tg.app, "org_b").await;
    // "the full key (tga_<64 hex chars>)".
    let (key, secret) = tg.key("org_a", &["v1:read"]).await;
    assert!(secret.starts_with("tga_") && secret.len() == 68, "{secret}");
    assert!(secret[4..].bytes().all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase()));
    // "Hashed at rest — trackagoat stores only a SHA-256 hash of your key, never the plaintext".
    let stored = database_bytes(&tg.app.database_url);
    let hash = crate::import::sha256_hex(&secret);
    let contains = |needle: &[u8]| stored.windows(needle.len()).any(|window| window == needle);
    assert!(contains(hash.as_bytes()), "the SHA-256 of the key is stored");
    assert!(!contains(&secret.as_bytes()[12..]), "the key itself is not");
    // "Include the key as a Bearer token"; "Org-scoped — a key can only access data in the org":
    // the API is told the key's org, whatever the client claims.
    let forged = format!("Bearer {secret}");
    let headers = [("authorization", forged.as_str()), ("x-keygate-tenant-id", "org_b")];
    let response = request(tg.envoy.address, "GET", "/api/v1/projects", &headers).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.upstream_headers().get("x-keygate-tenant-id").map(String::as_str), Some("org_a"));
    // "programmatic read access", and no wildcard lets a key write.
    assert_eq!(tg.call("POST", "/api/v1/projects", &secret).await.status, 403);
    for wildcard in ["*", "v1:*"] {
        assert_status(create_key(&tg.app, key_request("org_b", &[wildcard])).await, Code::InvalidArgument, None);
    }
    // "a per-key rate limit: a sliding-window limit on requests per minute" (2; one used above,
    // and the refused POST is not counted).
    assert_eq!(tg.call("GET", "/api/v1/creators", &secret).await.status, 200);
    let limited = tg.call("GET", "/api/v1/creators", &secret).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.json()["code"], "RATE_LIMITED");
    // "... separate from the daily org-level max_api_requests_per_day quota": other keys go on
    // until the org's 5 are used (2 above).
    let (_, second) = tg.key("org_a", &["v1:read"]).await;
    let (_, third) = tg.key("org_a", &["v1:read"]).await;
    for key in [&second, &second, &third] {
        assert_eq!(tg.call("GET", "/api/v1/videos", key).await.status, 200);
    }
    let quota = tg.call("GET", "/api/v1/videos", &third).await;
    assert_eq!((quota.status, quota.json()["code"].as_str()), (429, Some("QUOTA_EXCEEDED")), "{quota:?}");
    // "max_api_keys_per_org (the maximum number of active keys) ... delete unused keys first".
    assert_status(create_key(&tg.app, key_request("org_a", &["v1:read"])).await, Code::ResourceExhausted, None);
    // "Revocation is immediate — any requests using the revoked key will receive a 401".
    let (other_org_key, other_secret) = tg.key("org_b", &["v1:read"]).await;
    assert_eq!(tg.call("GET", "/api/v1/projects", &other_secret).await.status, 200);
    let revoke = RevokeKeyRequest { tenant_id: "org_b".into(), key_id: other_org_key.key_id.clone() };
    tg.app.admin.clone().revoke_key(revoke).await.unwrap();
    assert_eq!(tg.call("GET", "/api/v1/projects", &other_secret).await.status, 401);
    let revoke = RevokeKeyRequest { tenant_id: "org_a".into(), key_id: key.key_id.clone() };
    tg.app.admin.clone().revoke_key(revoke).await.unwrap();
    create_key(&tg.app, key_request("org_a", &["v1:read"])).await.expect("room again after a delete");
}

async fn jetrack_documentation_holds_through_envoy() {
    let Some(jt) = product("jetrack", include_str!("../../examples/jetrack/envoy.yaml")).await else { return };
    let account = PutTenantRequest { tenant_id: "acct_1".into(), rate_limit_per_minute: Some(5), ..Default::default() };
    put_tenant_with(&jt.app, account).await;
    put_tenant(&jt.app, "acct_2").await;
    put_site(&jt.app, "acct_1", "web_1").await.unwrap();
    put_site(&jt.app, "acct_2", "web_2").await.unwrap();
    let envelope = |status: u16, message: &str| json!({"success": false, "data": null, "meta": {"status": status, "message": message}});
    // "Optionally enter a name for your key".
    let mut unnamed = key_request("acct_1", &["api:read"]);
    unnamed.name = String::new();
    let (key, secret) = create_key(&jt.app, unnamed).await.unwrap();
    // "Prefix: bj_live_ (8 characters) - Key body: 64 hexadecimal characters - Total length: 72".
    assert!(secret.starts_with("bj_live_") && secret.len() == 72, "{secret}");
    assert!(secret[8..].bytes().all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase()));
    // "Key prefix - The first 12 characters (e.g., bj_live_a1b2)"; "Name - ... (if any)".
    assert_eq!((key.display_prefix.as_str(), key.name.as_str()), (&secret[..12], ""));
    // "Method 1: X-API-Key Header (Recommended)" and "Method 2: Authorization Bearer Header".
    let by_header = request(jt.envoy.address, "GET", "/api/v1/account", &[("x-api-key", &secret)]).await.unwrap();
    assert_eq!(by_header.status, 200, "{by_header:?}");
    assert!(!by_header.upstream_headers().contains_key("x-api-key"), "the API never sees the key");
    assert_eq!(jt.call("GET", "/api/v1/websites", &secret).await.status, 200);
    let stats = "/api/v1/websites/web_1/stats/main?from=2025-01-01&to=2025-01-31";
    let response = request(jt.envoy.address, "GET", stats, &[("x-api-key", &secret)]).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.upstream_path(), stats);
    // "403 Forbidden: ... Website belongs to another account".
    let other = request(jt.envoy.address, "GET", "/api/v1/websites/web_2/stats/main", &[("x-api-key", &secret)]).await;
    assert_answer(&other.unwrap(), 403, envelope(403, "Website belongs to another account"));
    // The website itself, and other spellings of the path, are checked too.
    for target in ["/api/v1/websites/web_2", "/api/v1/Websites/web_2/stats/main", "/api/v1/WEBSITES/web_2"] {
        let response = request(jt.envoy.address, "GET", target, &[("x-api-key", &secret)]).await.unwrap();
        assert_answer(&response, 403, envelope(403, "Website belongs to another account"));
    }
    // "401 Unauthorized: Missing API key header; Invalid or revoked API key; Typo in the key";
    // "Check that the full key is included (72 characters)".
    assert_answer(
        &request(jt.envoy.address, "GET", "/api/v1/account", &[]).await.unwrap(),
        401,
        envelope(401, "Missing API key"),
    );
    // One character changed (never to itself: a key ending in `0` stays a typo).
    let typo = format!("{}{}", &secret[..71], if secret.ends_with('0') { '1' } else { '0' });
    for wrong in [typo.as_str(), &secret[..70]] {
        let response = request(jt.envoy.address, "GET", "/api/v1/account", &[("x-api-key", wrong)]).await.unwrap();
        assert_answer(&response, 401, envelope(401, "Invalid or revoked API key"));
    }
    // "Last used - When the key was last used for authentication" (written every
    // KEYGATE_USAGE_FLUSH_INTERVAL_MS; this test waits for it).
    let mut last_used = None;
    for _ in 0..150 {
        last_used = get_key(&jt.app, "acct_1", &key.key_id).await.last_used_at;
        if last_used.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(last_used.is_some(), "last used is recorded");
    // "Regenerating immediately invalidates your old key" (one key per account: regenerate is a
    // rotation without grace).
    assert_status(create_key(&jt.app, key_request("acct_1", &["api:read"])).await, Code::ResourceExhausted, None);
    let regenerate = RotateKeyRequest { tenant_id: "acct_1".into(), key_id: key.key_id.clone(), ..Default::default() };
    let regenerated = jt.app.admin.clone().rotate_key(regenerate).await.unwrap().into_inner();
    let old = request(jt.envoy.address, "GET", "/api/v1/account", &[("x-api-key", &secret)]).await.unwrap();
    assert_answer(&old, 401, envelope(401, "Invalid or revoked API key"));
    let new = request(jt.envoy.address, "GET", "/api/v1/account", &[("x-api-key", &regenerated.secret)]).await;
    assert_eq!(new.unwrap().status, 200);
    // "Rate Limiting (429): Too many requests in a short period" (the account's 5 a minute).
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(jt.call("GET", "/api/v1/account", &regenerated.secret).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "one request of the new key was made above");
    let limited = jt.call("GET", "/api/v1/account", &regenerated.secret).await;
    assert_answer(&limited, 429, envelope(429, "Too many requests in a short period"));
    // "Revoke API Key ... This is irreversible."
    let revoke = RevokeKeyRequest { tenant_id: "acct_1".into(), key_id: regenerated.key.unwrap().key_id };
    jt.app.admin.clone().revoke_key(revoke).await.unwrap();
    let revoked = request(jt.envoy.address, "GET", "/api/v1/account", &[("x-api-key", &regenerated.secret)]).await;
    assert_answer(&revoked.unwrap(), 401, envelope(401, "Invalid or revoked API key"));
}

async fn zerotrust_documentation_holds_through_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        r#"{"keys": [{"kty": "oct", "alg": "HS256", "kid": "k", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#,
    )
    .unwrap();
    let envoy_yaml = include_str!("../../examples/zerotrust/envoy.yaml");
    let Some(zt) = product_with("zerotrust", envoy_yaml, &[("/etc/envoy/jwks.json", jwks.to_str().unwrap())]).await
    else {
        return;
    };
    // Plans: "Free 2", "Enterprise Unlimited".
    let free = PutTenantRequest { tenant_id: "free".into(), max_keys: Some(2), ..Default::default() };
    put_tenant_with(&zt.app, free).await;
    let enterprise = PutTenantRequest { tenant_id: "ent".into(), unlimited_keys: Some(true), ..Default::default() };
    put_tenant_with(&zt.app, enterprise).await;
    put_site(&zt.app, "ent", "site_abc123").await.unwrap();
    put_site(&zt.app, "ent", "site_xyz789").await.unwrap();
    let stats = |site: &str| format!("/api/stats?siteId={site}");

    // "zta_live_abc123def456ghi789jkl012mno345pqr678".
    let (read_key, read) = zt.key("ent", &["api:read"]).await;
    assert!(read.starts_with("zta_live_") && read.len() == 45, "{read}");
    assert!(read[9..].bytes().all(|byte| byte.is_ascii_digit() || byte.is_ascii_lowercase()), "{read}");
    // Scopes: "read: Read analytics data"; "write: Everything in read + send tracking data";
    // "admin: Everything in write + manage sites".
    let (_, write) = zt.key("ent", &["api:write"]).await;
    let (_, admin) = zt.key("ent", &["api:admin"]).await;
    let insufficient = json!({"error": "Insufficient permissions. This key has read-only access."});
    assert_eq!(zt.call("GET", &stats("site_abc123"), &read).await.status, 200);
    assert_answer(&zt.call("POST", "/api/track?siteId=site_abc123", &read).await, 403, insufficient.clone());
    assert_eq!(zt.call("POST", "/api/track?siteId=site_abc123", &write).await.status, 200);
    assert_eq!(zt.call("GET", &stats("site_abc123"), &write).await.status, 200, "write includes read");
    assert_eq!(zt.call("GET", "/api/sites", &write).await.status, 403, "write cannot manage sites");
    assert_eq!(zt.call("POST", "/api/sites", &admin).await.status, 200);
    // Read "Cannot: Create/modify resources, Manage team members"; write "Create goals and
    // funnels" but "Cannot: Manage sites, Invite team members, Manage API keys".
    for (method, target) in [("POST", "/api/goals?siteId=site_abc123"), ("PUT", "/api/Funnels/1?siteId=site_abc123")] {
        assert_answer(&zt.call(method, target, &read).await, 403, insufficient.clone());
        assert_eq!(zt.call(method, target, &write).await.status, 200, "{method} {target}");
    }
    for (method, target) in [("POST", "/api/team/invite"), ("DELETE", "/api/api-keys?id=key_1"), ("POST", "/API/Sites")]
    {
        assert_eq!(zt.call(method, target, &write).await.status, 403, "{method} {target}");
        assert_eq!(zt.call(method, target, &admin).await.status, 200, "{method} {target}");
    }
    assert_eq!(zt.call("POST", "/api/track?siteId=site_abc123", &admin).await.status, 200, "admin includes write");
    // "Site-Specific Keys ... Attempts to access other sites will fail with 403 Forbidden":
    // "{ "error": "This API key cannot access site_xyz789" }".
    let mut pinned = key_request("ent", &["api:read"]);
    pinned.site_ids = vec!["site_abc123".into()];
    let (_, pinned) = create_key(&zt.app, pinned).await.unwrap();
    assert_eq!(zt.call("GET", &stats("site_abc123"), &pinned).await.status, 200);
    assert_answer(
        &zt.call("GET", &stats("site_xyz789"), &pinned).await,
        403,
        json!({"error": "This API key cannot access site_xyz789"}),
    );
    // Every endpoint that reads a site's data checks the site, however the path is spelled; a
    // site-specific key reads goals and funnels of its site too ("View goals and funnels").
    assert_eq!(zt.call("GET", "/api/goals?siteId=site_abc123", &pinned).await.status, 200);
    for target in ["/api/Stats?siteId=site_xyz789", "/api/goals?siteId=site_xyz789", "/API/funnels?siteId=site_xyz789"]
    {
        let response = zt.call("GET", target, &pinned).await;
        assert_answer(&response, 403, json!({"error": "This API key cannot access site_xyz789"}));
    }
    // A key goes to keygate however its scheme is spelled; next to a JWT it is refused whole.
    for spelled in [format!("bearer {pinned}"), format!("BEARER  {pinned}"), format!("Bearer\t{pinned}")] {
        let response = request(zt.envoy.address, "GET", "/api/account", &[("authorization", &spelled)]).await.unwrap();
        assert_eq!(
            response.status, 403,
            "a site-specific key on a tenant-wide endpoint, decided by keygate: {response:?}"
        );
        assert_eq!(
            response.json()["error"],
            "This API key is restricted to specific sites and cannot access tenant-wide resources"
        );
    }
    let two = [("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"), ("authorization", &format!("Bearer {pinned}"))];
    let response = request(zt.envoy.address, "GET", "/api/account", &two).await.unwrap();
    assert_answer(&response, 401, json!({"error": "Invalid API key"}));
    // A forged user id, in any spelling, never reaches the API.
    let forged = [("authorization", format!("Bearer {write}")), ("x_user_id", "admin".to_owned())];
    let forged: Vec<(&str, &str)> = forged.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let response = request(zt.envoy.address, "GET", "/api/account", &forged).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert!(!response.upstream_headers().contains_key("x_user_id"), "{response:?}");
    // "401 Unauthorized { "error": "Invalid API key" }".
    let unknown = format!("zta_live_{}", "0".repeat(36));
    assert_answer(&zt.call("GET", &stats("site_abc123"), &unknown).await, 401, json!({"error": "Invalid API key"}));
    // "Expiring Keys ... "expiresIn": 30 ... The key will expire after 30 days";
    // "{ "error": "API key has expired" }"; keys without expiresIn are "Long-lived".
    let mut trial = key_request("ent", &["api:read"]);
    trial.expiry =
        Some(create_key_request::Expiry::ExpiresIn(prost_types::Duration { seconds: 30 * 86_400, nanos: 0 }));
    let (_, trial) = create_key(&zt.app, trial).await.unwrap();
    assert_eq!(zt.call("GET", &stats("site_abc123"), &trial).await.status, 200);
    zt.app.clock.advance(chrono::Duration::days(30) + chrono::Duration::seconds(1));
    assert_answer(&zt.call("GET", &stats("site_abc123"), &trial).await, 401, json!({"error": "API key has expired"}));
    zt.app.clock.advance(chrono::Duration::days(400));
    assert_eq!(zt.call("GET", &stats("site_abc123"), &read).await.status, 200, "no expiration unless set");
    // "Delete API Key ... All requests using this key will immediately fail with 401".
    let revoke = RevokeKeyRequest { tenant_id: "ent".into(), key_id: read_key.key_id.clone() };
    zt.app.admin.clone().revoke_key(revoke).await.unwrap();
    assert_answer(&zt.call("GET", &stats("site_abc123"), &read).await, 401, json!({"error": "Invalid API key"}));
    // "The full API key is only shown once during creation. After that, only a masked version".
    let mut admin_client = zt.app.admin.clone();
    let listed = admin_client.list_keys(ListKeysRequest { tenant_id: "ent".into(), ..Default::default() }).await;
    let listed = format!("{:?}", listed.unwrap().into_inner());
    assert!(!listed.contains(&write[12..]) && listed.contains(&write[..12]), "masked: {listed}");
    // "API Key Limits: Free 2 ... Enterprise Unlimited".
    for _ in 0..2 {
        zt.key("free", &["api:read"]).await;
    }
    assert_status(create_key(&zt.app, key_request("free", &["api:read"])).await, Code::ResourceExhausted, None);
    for _ in 0..60 {
        zt.key("ent", &["api:read"]).await;
    }
    // "Activity Log ... API key created, API key revoked, Failed authentication attempts".
    let mut seen = std::collections::HashSet::new();
    for _ in 0..150 {
        let request = ListAuditEventsRequest { tenant_id: "ent".into(), page_size: 1000, ..Default::default() };
        let events = admin_client.list_audit_events(request).await.unwrap().into_inner().events;
        seen = events.iter().map(|event| event.event_type()).collect();
        if seen.contains(&AuditEventType::CheckDenied) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for wanted in [AuditEventType::KeyCreated, AuditEventType::KeyRevoked, AuditEventType::CheckDenied] {
        assert!(seen.contains(&wanted), "{wanted:?} in {seen:?}");
    }
}
