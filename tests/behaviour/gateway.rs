//! keygate behind a real Envoy: the example config, real HTTP requests, an echo upstream.

use keygate::domain::clock::Clock;
use keygate::proto::*;

use crate::checks::well_formed_unknown_key;
use crate::envoy_support::*;
use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        a_good_key_reaches_the_upstream_with_tenant_headers_and_without_the_credential,
        every_deny_reason_has_its_status_body_and_headers,
        the_site_comes_from_the_path_a_header_the_query_or_the_route,
        a_route_of_one_tenant_denies_keys_of_every_other_tenant_alike,
        path_and_query_tricks_do_not_change_the_site_that_was_checked,
        no_credential_reaches_the_upstream_however_it_is_spelled,
        a_revoked_key_is_denied_on_the_very_next_request,
        rate_limits_reach_the_client_as_headers_and_429s_and_health_skips_keygate,
        with_keygate_stopped_envoy_fails_closed,
    ],
    current_thread: [no_key_or_header_value_reaches_a_log_line],
);

/// keygate with a tenant, two sites and an upstream, behind Envoy.
struct Stack {
    app: TestApp,
    envoy: Envoy,
}

async fn stack() -> Option<Stack> {
    let binary = envoy_binary()?;
    let app = spawn_app(Backend::Sqlite).await?;
    put_tenant(&app, "acme").await;
    put_tenant(&app, "globex").await;
    put_site(&app, "acme", "shop.example").await.unwrap();
    put_site(&app, "acme", "blog.example").await.unwrap();
    put_site(&app, "globex", "globex.example").await.unwrap();
    let upstream = start_echo_upstream().await;
    let envoy = Envoy::start(&binary, app.address, upstream).await;
    Some(Stack { app, envoy })
}

impl Stack {
    async fn key(&self, scopes: &[&str], site_ids: &[&str]) -> (ApiKey, String) {
        let mut request = key_request("acme", scopes);
        request.site_ids = site_ids.iter().map(|site| site.to_string()).collect();
        create_key(&self.app, request).await.unwrap()
    }

    async fn get(&self, target: &str, headers: &[(&str, &str)]) -> HttpResponse {
        get(self.envoy.address, target, headers).await.expect("HTTP request through envoy")
    }
}

#[track_caller]
fn assert_http_denied(response: &HttpResponse, status: u16, code: &str, message: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.headers.get("content-type").map(String::as_str), Some("application/json"));
    let body = response.json();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["error"], message, "{body}");
    assert_eq!(response.headers.contains_key("www-authenticate"), status == 401, "{response:?}");
}

async fn a_good_key_reaches_the_upstream_with_tenant_headers_and_without_the_credential() {
    let Some(stack) = stack().await else { return };
    let (key, secret) = stack.key(&["account:read", "stats:read"], &[]).await;
    let bearer = format!("Bearer {secret}");
    let forged =
        [("x-keygate-tenant-id", "globex"), ("x-keygate-scopes", "*"), ("x-keygate-site-id", "globex.example")];
    for (target, headers) in [
        ("/v1/account?x=1".to_owned(), vec![("authorization", bearer.as_str()), forged[0], forged[1], forged[2]]),
        ("/v1/account?x=1".to_owned(), vec![("x-api-key", secret.as_str())]),
        (format!("/v1/account?_apikey={secret}&x=1"), vec![]),
    ] {
        let response = stack.get(&target, &headers).await;
        assert_eq!(response.status, 200, "{target}: {response:?}");
        let upstream = response.upstream_headers();
        assert_eq!(
            upstream.get("x-keygate-tenant-id").map(String::as_str),
            Some("acme"),
            "forged headers are overwritten"
        );
        assert_eq!(upstream.get("x-keygate-key-id"), Some(&key.key_id));
        assert_eq!(upstream.get("x-keygate-scopes").map(String::as_str), Some("account:read,stats:read"));
        assert!(!upstream.contains_key("authorization") && !upstream.contains_key("x-api-key"), "{upstream:?}");
        assert!(!upstream.contains_key("x-keygate-site-id"), "a tenant-wide route names no site: {upstream:?}");
        assert_eq!(response.upstream_path(), "/v1/account?x=1", "the _apikey parameter is stripped");
        assert!(!response.body.contains(&secret[8..]), "the upstream never sees the key");
    }
}

async fn every_deny_reason_has_its_status_body_and_headers() {
    let Some(stack) = stack().await else { return };
    let (_, reader) = stack.key(&["account:read"], &[]).await;
    let bearer = |secret: &str| format!("Bearer {secret}");

    let response = stack.get("/v1/account", &[]).await;
    assert_http_denied(&response, 401, "KEY_MISSING", "API key is required");
    let response = stack.get("/v1/account", &[("authorization", "Bearer")]).await;
    assert_http_denied(&response, 401, "KEY_MISSING", "API key is required");
    let response = stack.get("/v1/account", &[("authorization", "Bearer kg_live_nope")]).await;
    assert_http_denied(&response, 401, "KEY_INVALID", "Invalid API key");
    let response = stack.get("/v1/account", &[("authorization", &bearer(&well_formed_unknown_key()))]).await;
    assert_http_denied(&response, 401, "KEY_INVALID", "Invalid API key");
    let response = stack.get("/v1/stats?siteId=shop.example", &[("authorization", &bearer(&reader))]).await;
    assert_http_denied(&response, 403, "SCOPE_MISSING", "API key missing required scope: stats:read");
    let (_, stats) = stack.key(&["stats:read"], &["shop.example"]).await;
    let response = stack.get("/v1/stats?siteId=blog.example", &[("authorization", &bearer(&stats))]).await;
    assert_http_denied(&response, 403, "SITE_FORBIDDEN", "This API key cannot access blog.example");
    let response = stack.get("/v1/legacy", &[("authorization", &bearer(&reader))]).await;
    assert_http_denied(&response, 500, "ROUTE_MISCONFIGURED", "The API gateway route is misconfigured");
    assert_eq!(stack.get("/v1/unrouted", &[("authorization", &bearer(&reader))]).await.status, 404);

    let mut expiring = key_request("acme", &["account:read"]);
    expiring.expiry = Some(create_key_request::Expiry::ExpiresIn(prost_types::Duration { seconds: 60, nanos: 0 }));
    let (_, expiring) = create_key(&stack.app, expiring).await.unwrap();
    stack.app.clock.advance(chrono::Duration::seconds(61));
    let response = stack.get("/v1/account", &[("authorization", &bearer(&expiring))]).await;
    assert_http_denied(&response, 401, "KEY_EXPIRED", "API key has expired");

    let downgrade =
        PutTenantRequest { tenant_id: "acme".into(), api_access_enabled: Some(false), ..Default::default() };
    put_tenant_with(&stack.app, downgrade).await;
    let response = stack.get("/v1/account", &[("authorization", &bearer(&reader))]).await;
    assert_http_denied(&response, 402, "PLAN_REQUIRED", "API key access is not included in this plan");
}

async fn a_route_of_one_tenant_denies_keys_of_every_other_tenant_alike() {
    let Some(stack) = stack().await else { return };
    let (_, acme) = stack.key(&["account:read"], &[]).await;
    let auth = format!("Bearer {acme}");
    let auth = [("authorization", auth.as_str())];
    let allowed = stack.get("/v1/organizations/acme/sites", &auth).await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(allowed.upstream_headers().get("x-keygate-tenant-id").map(String::as_str), Some("acme"));
    // Another tenant that exists, one that does not, another spelling, none: the same answer.
    let mut answers = Vec::new();
    for target in [
        "/v1/organizations/globex/sites",
        "/v1/organizations/nobody-here/sites",
        "/v1/organizations/ACME/sites",
        "/v1/organizations//sites",
        "/v1/organizations/acme/../globex/sites",
    ] {
        let denied = stack.get(target, &auth).await;
        assert_http_denied(&denied, 403, "TENANT_MISMATCH", "This API key cannot access this tenant");
        answers.push((denied.status, denied.body));
    }
    assert!(answers.iter().all(|answer| answer == &answers[0]), "{answers:?}");
    // A broken key on such a route is KEY_INVALID whatever tenant the route names.
    let broken = [("authorization", "Bearer kg_live_nope")];
    for target in ["/v1/organizations/globex/sites", "/v1/organizations/a%21b/sites"] {
        assert_http_denied(&stack.get(target, &broken).await, 401, "KEY_INVALID", "Invalid API key");
    }
    // No key on such a route is still KEY_MISSING.
    assert_http_denied(
        &stack.get("/v1/organizations/acme/sites", &[]).await,
        401,
        "KEY_MISSING",
        "API key is required",
    );

    // Authorize.Check: the same reason and message, with the tenant in the request.
    let mut request = CheckRequest { key: acme.clone(), scope: "account:read".into(), ..Default::default() };
    request.tenant_id = "globex".into();
    let direct = stack.app.authorize.clone().check(request.clone()).await.unwrap().into_inner();
    assert_eq!((direct.reason(), direct.http_status), (DenyReason::TenantMismatch, 403));
    assert_eq!(direct.message, "This API key cannot access this tenant");
    request.tenant_id = "acme".into();
    assert!(stack.app.authorize.clone().check(request.clone()).await.unwrap().into_inner().allowed);
    request.tenant_id = "bad tenant".into();
    let status = stack.app.authorize.clone().check(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

async fn the_site_comes_from_the_path_a_header_the_query_or_the_route() {
    let Some(stack) = stack().await else { return };
    let (_, shop_only) = stack.key(&["stats:read", "events:write"], &["shop.example"]).await;
    let auth = format!("Bearer {shop_only}");
    let auth = [("authorization", auth.as_str())];
    let with_site = |site: &'static str| [auth[0], ("x-site-id", site)];
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: [Case; 10] = [
        ("/v1/sites/shop.example/stats", auth.to_vec(), 200),
        ("/v1/sites/shop%2Eexample/stats", auth.to_vec(), 200),
        ("/v1/sites/blog.example/stats", auth.to_vec(), 403),
        ("/v1/sites/globex.example/stats", auth.to_vec(), 403),
        ("/v1/events", with_site("shop.example").to_vec(), 200),
        ("/v1/events", with_site("blog.example").to_vec(), 403),
        ("/v1/events", auth.to_vec(), 403),
        ("/v1/stats?siteId=shop%2Eexample", auth.to_vec(), 200),
        ("/v1/stats?siteId=blog.example", auth.to_vec(), 403),
        ("/v1/shop/overview", auth.to_vec(), 200),
    ];
    for (target, headers, status) in cases {
        let response = stack.get(target, &headers).await;
        assert_eq!(response.status, status, "{target} {headers:?}: {response:?}");
    }
    let response = stack.get("/v1/events", &auth).await;
    assert_http_denied(&response, 403, "SITE_FORBIDDEN", "This request does not name a valid site");
    let response = stack.get("/v1/events", &[]).await;
    assert_http_denied(&response, 401, "KEY_MISSING", "API key is required");
    let response = stack.get("/v1/events", &with_site("shop.example")).await;
    assert_eq!(
        response.upstream_headers()["x-keygate-site-id"],
        "shop.example",
        "the approved site reaches the upstream"
    );
}

async fn path_and_query_tricks_do_not_change_the_site_that_was_checked() {
    let Some(stack) = stack().await else { return };
    let (_, shop_only) = stack.key(&["stats:read", "account:read"], &["shop.example"]).await;
    let auth = format!("Bearer {shop_only}");
    let auth = [("authorization", auth.as_str())];
    for (target, status) in [
        ("/v1/sites/shop.example/../blog.example/stats", 403),
        ("/v1/sites/shop.example/%2e%2e/blog.example/stats", 403),
        ("/v1/sites//blog.example/stats", 403),
        ("/v1/stats?siteId=shop.example&siteId=blog.example", 403),
        ("/v1/stats?site%49d=blog.example&siteId=shop.example", 403),
        ("/v1/account/../../admin", 404),
        ("/v1/accountXYZ", 404),
    ] {
        let response = stack.get(target, &auth).await;
        assert_eq!(response.status, status, "{target}: {response:?}");
    }
    let escaped = stack.get("/v1/sites/shop.example%2F..%2Fblog.example/stats", &auth).await;
    assert_ne!(escaped.status, 200, "{escaped:?}");
}

async fn no_credential_reaches_the_upstream_however_it_is_spelled() {
    let Some(stack) = stack().await else { return };
    let (_, secret) = stack.key(&["account:read"], &[]).await;
    let api_key = [("x-api-key", secret.as_str())];
    for target in [
        format!("/v1/account?%5Fapikey={secret}"),
        format!("/v1/account?_api%6Bey={secret}"),
        format!("/v1/account?_apikey={secret}%zz"),
        format!("/v1/account?_apikey={secret}&_apikey={secret}"),
    ] {
        let response = stack.get(&target, &api_key).await;
        assert_eq!(response.status, 200, "{target}: {response:?}");
        assert!(!response.body.contains(&secret[8..]), "{target}: the key reached the upstream: {}", response.body);
    }
    let mixed = format!("Basic dXNlcjpwdw==,Bearer {secret}");
    let response = stack.get("/v1/account", &[("authorization", mixed.as_str()), api_key[0]]).await;
    assert_http_denied(&response, 401, "KEY_INVALID", "Invalid API key");
    // Every spelling a web framework would read as the credential is stripped next to a valid
    // key, and never read as the key itself.
    let bearer = format!("Bearer {secret}");
    for spelling in ["_APIKEY", "_ApiKey", "_apikey[]", "_apikey%5B%5D", ".apikey", "-apikey", "%5FAPIKEY"] {
        let target = format!("/v1/account?a=1&{spelling}={secret}&b=2");
        let response = stack.get(&target, &[("authorization", &bearer)]).await;
        assert_eq!(response.status, 200, "{spelling}: {response:?}");
        assert_eq!(response.upstream_path(), "/v1/account?a=1&b=2", "{spelling}");
        assert!(!response.body.contains(&secret[8..]), "{spelling}: the key reached the upstream");
        let response = stack.get(&target, &[]).await;
        assert_http_denied(&response, 401, "KEY_INVALID", "Invalid API key");
    }
    // Behind a `;`, which some frameworks split on, a credential cannot be stripped byte for
    // byte: denied, even next to a valid key, and the upstream sees nothing.
    for target in [format!("/v1/account?a=1;_apikey={secret}"), format!("/v1/account?x=1&_apikey;={secret}")] {
        let response = stack.get(&target, &[("authorization", &bearer)]).await;
        assert_http_denied(&response, 401, "KEY_INVALID", "Invalid API key");
    }
    // A site named twice, once behind a `;` or under a second header spelling, is no site.
    let (_, shop_only) = stack.key(&["stats:read", "events:write"], &["shop.example"]).await;
    let shop_bearer = format!("Bearer {shop_only}");
    let response =
        stack.get("/v1/stats?siteId=shop.example&x=1;siteId=blog.example", &[("authorization", &shop_bearer)]).await;
    assert_eq!(response.status, 403, "{response:?}");
    // A second spelling of the site header never reaches the API: Envoy drops headers with
    // underscores (headers_with_underscores_action), so the site checked is the one served.
    let two = [("authorization", shop_bearer.as_str()), ("x-site-id", "shop.example"), ("x_site_id", "blog.example")];
    let response = stack.get("/v1/events", &two).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(!response.upstream_headers().contains_key("x_site_id"), "{response:?}");
    // The rest of the query arrives as it was sent, byte for byte.
    for (sent, forwarded) in [
        (format!("/v1/account?b=2&siteId=s&a=1&_apikey={secret}"), "/v1/account?b=2&siteId=s&a=1"),
        (format!("/v1/account?&flag&_apikey={secret}&&x=1&q=a%20b+c%2F"), "/v1/account?&flag&&x=1&q=a%20b+c%2F"),
        (format!("/v1/account?_apikey={secret}"), "/v1/account"),
    ] {
        let response = stack.get(&sent, &[]).await;
        assert_eq!(response.status, 200, "{sent}: {response:?}");
        assert_eq!(response.upstream_path(), forwarded);
    }
    for header in ["x_api_key", "X_Api_Key"] {
        let response = stack.get("/v1/account", &[("authorization", &bearer), (header, secret.as_str())]).await;
        assert_eq!(response.status, 200, "{header}: {response:?}");
        assert!(!response.body.contains(&secret[8..]), "{header}: the key reached the upstream");
    }
    // Routes without keygate still never pass forged identity headers on.
    let response = stack.get("/health", &[("x-keygate-tenant-id", "globex"), ("x-keygate-key-id", "key_forged")]).await;
    assert_eq!(response.status, 200);
    let upstream = response.upstream_headers();
    assert!(
        !upstream.contains_key("x-keygate-tenant-id") && !upstream.contains_key("x-keygate-key-id"),
        "{upstream:?}"
    );
}

async fn a_revoked_key_is_denied_on_the_very_next_request() {
    let Some(stack) = stack().await else { return };
    let (key, secret) = stack.key(&["account:read"], &[]).await;
    let auth = format!("Bearer {secret}");
    assert_eq!(stack.get("/v1/account", &[("authorization", &auth)]).await.status, 200);
    crate::keys::revoke(&stack.app, "acme", &key.key_id).await.unwrap();
    let revoked = stack.get("/v1/account", &[("authorization", &auth)]).await;
    assert_http_denied(&revoked, 401, "KEY_INVALID", "Invalid API key");
    // Revoked, unknown and mistyped keys get one public answer: nothing tells which keys exist.
    let unknown =
        stack.get("/v1/account", &[("authorization", &format!("Bearer {}", well_formed_unknown_key()))]).await;
    let mistyped =
        stack.get("/v1/account", &[("authorization", &format!("Bearer {}x", &secret[..secret.len() - 1]))]).await;
    for other in [&unknown, &mistyped] {
        assert_eq!((other.status, &other.body), (revoked.status, &revoked.body));
        let mut headers = other.headers.clone();
        let mut expected = revoked.headers.clone();
        for varying in ["date", "x-envoy-upstream-service-time"] {
            headers.remove(varying);
            expected.remove(varying);
        }
        assert_eq!(headers, expected);
    }
    // keygate itself still knows which it was.
    let check = try_check(&stack.app, &secret, "account:read", "").await.unwrap();
    assert_eq!(check.reason(), DenyReason::KeyRevoked);
}

async fn rate_limits_reach_the_client_as_headers_and_429s_and_health_skips_keygate() {
    let Some(stack) = stack().await else { return };
    let mut request = key_request("acme", &["account:read"]);
    request.rate_limit_per_minute = 42;
    let (_, secret) = create_key(&stack.app, request).await.unwrap();
    let response = stack.get("/v1/account", &[("x-api-key", &secret)]).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.headers.get("x-ratelimit-limit").map(String::as_str), Some("42"));
    assert!(response.headers.contains_key("x-ratelimit-remaining"));
    let reset: i64 = response.headers["x-ratelimit-reset"].parse().unwrap();
    assert!(reset > chrono::Utc::now().timestamp() - 5, "reset is a Unix time");
    assert_eq!(stack.get("/health", &[]).await.status, 200, "no key needed");

    let mut request = key_request("acme", &["account:read"]);
    request.rate_limit_per_minute = 1;
    let (_, once) = create_key(&stack.app, request).await.unwrap();
    assert_eq!(stack.get("/v1/account", &[("x-api-key", &once)]).await.status, 200);
    let response = stack.get("/v1/account", &[("x-api-key", &once)]).await;
    assert_http_denied(&response, 429, "RATE_LIMITED", "Rate limit exceeded");
    assert_eq!(response.headers.get("x-ratelimit-limit").map(String::as_str), Some("1"));
    assert_eq!(response.headers.get("x-ratelimit-remaining").map(String::as_str), Some("0"));
    // Retry-After counts whole seconds up to the time the request slides out of the window, and
    // a retry after exactly that long is admitted.
    let retry_after: i64 = response.headers["retry-after"].parse().unwrap();
    let reset: i64 = response.headers["x-ratelimit-reset"].parse().unwrap();
    let now = stack.app.clock.now();
    let exact = (reset * 1_000_000 - now.timestamp_micros()) as f64 / 1e6;
    assert_eq!(retry_after, exact.ceil() as i64, "{exact} s rounded up");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    stack.app.clock.advance(chrono::Duration::seconds(retry_after - 1));
    assert_eq!(stack.get("/v1/account", &[("x-api-key", &once)]).await.status, 429, "a second early");
    stack.app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(stack.get("/v1/account", &[("x-api-key", &once)]).await.status, 200, "on time");

    let quota = PutTenantRequest { tenant_id: "globex".into(), daily_request_quota: Some(1), ..Default::default() };
    put_tenant_with(&stack.app, quota).await;
    let (_, globex) = create_key(&stack.app, key_request("globex", &["account:read"])).await.unwrap();
    assert_eq!(stack.get("/v1/account", &[("x-api-key", &globex)]).await.status, 200);
    let response = stack.get("/v1/account", &[("x-api-key", &globex)]).await;
    assert_http_denied(&response, 429, "QUOTA_EXCEEDED", "Daily request quota exceeded");
    let retry_after: i64 = response.headers["retry-after"].parse().unwrap();
    stack.app.clock.advance(chrono::Duration::seconds(retry_after));
    assert_eq!(stack.get("/v1/account", &[("x-api-key", &globex)]).await.status, 200, "the next UTC day");
}

async fn with_keygate_stopped_envoy_fails_closed() {
    let Some(stack) = stack().await else { return };
    let (_, secret) = stack.key(&["account:read"], &[]).await;
    let auth = format!("Bearer {secret}");
    assert_eq!(stack.get("/v1/account", &[("authorization", &auth)]).await.status, 200);
    let Stack { app, envoy } = stack;
    app.stop().await;
    let response = get(envoy.address, "/v1/account", &[("authorization", &auth)]).await.unwrap();
    assert_eq!(response.status, 503, "{response:?}");
    assert!(!response.body.contains("x-keygate"), "never reaches the upstream");
    // The same JSON shape as every other deny, from the example's local reply mapping.
    assert_eq!(response.headers.get("content-type").map(String::as_str), Some("application/json"));
    let body = response.json();
    assert_eq!(body["code"], "AUTHORIZATION_UNAVAILABLE", "{body}");
    assert_eq!(body["error"], "Authorization service unavailable", "{body}");
    // Envoy's other local replies keep their own answers.
    assert_eq!(get(envoy.address, "/v1/unrouted", &[]).await.unwrap().status, 404);
}

/// Collects everything keygate logs on this thread (tests run on a current-thread runtime, so
/// the server's tasks log here too).
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn no_key_or_header_value_reaches_a_log_line() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let Some(stack) = stack().await else { return };
    let (key, secret) = stack.key(&["account:read"], &["shop.example"]).await;
    let bearer = format!("Bearer {secret}");
    let requests: Vec<(String, Vec<(&str, &str)>)> = vec![
        ("/v1/account".into(), vec![("authorization", bearer.as_str())]),
        (format!("/v1/legacy/{secret}"), vec![("x-api-key", secret.as_str())]),
        (format!("/v1/stats?siteId=blog.example&_apikey={secret}"), vec![]),
        ("/v1/events".into(), vec![("authorization", bearer.as_str()), ("x-site-id", "secret-site-header-value")]),
        ("/v1/account".into(), vec![("authorization", "Bearer kg_live_not-a-key-but-secret-anyway")]),
    ];
    for (target, headers) in &requests {
        stack.get(target, headers).await;
    }
    crate::keys::revoke(&stack.app, "acme", &key.key_id).await.unwrap();
    stack.get("/v1/account", &[("authorization", bearer.as_str())]).await;
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logs.contains("check denied"), "the logs were captured: {logs}");
    for secret_text in
        [&secret[8..], "secret-site-header-value", "not-a-key-but-secret-anyway", super::support::ADMIN_TOKEN]
    {
        assert!(!logs.contains(secret_text), "{secret_text} was logged:\n{logs}");
    }
}
