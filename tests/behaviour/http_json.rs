//! keygate's HTTP/JSON API: KeyAdmin and Authorize.Check through a real Envoy whose gRPC-JSON
//! transcoder is configured by `examples/http-json/envoy.yaml` (ports and the descriptor path
//! moved) with the descriptor set that `keygate descriptor-set` writes, in front of the real
//! keygate binary, driven by real curl: what a user of the README's curl commands sees.

use std::process::Command;

use serde_json::{Value, json};

use crate::envoy_support::{Envoy, envoy_binary};
use crate::support::*;

crate::trials!(
    every_backend: [
        keys_are_managed_over_http_json_from_creation_to_revocation,
        the_path_decides_which_tenant_key_and_site_a_call_acts_on,
    ],
    once: [
        errors_come_back_with_their_http_status_and_a_json_status,
        envoy_refuses_what_no_route_maps_with_the_same_json_shape,
        check_over_http_json_passes_the_caller_token_through,
        with_keygate_stopped_the_client_gets_a_json_503,
        no_part_of_a_key_comes_back_in_an_error_or_travels_in_a_url,
    ],
);

/// What curl got back.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// `1.1` or `2`.
    version: String,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {self:?}"))
    }

    /// Asserts a google.rpc.Status answer: `status`, JSON, gRPC `code`; returns the body.
    #[track_caller]
    fn assert_error(&self, status: u16, code: u32) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.content_type, "application/json", "{self:?}");
        let body = self.json();
        assert_eq!(body["code"], code, "{body}");
        assert!(body["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
        assert!(body["details"].is_array(), "{body}");
        body
    }
}

/// curl, or a skip with the reason when there is none.
fn curl_available() -> bool {
    let found = Command::new("curl").arg("--version").output().is_ok_and(|output| output.status.success());
    if !found {
        crate::harness::skip("no curl on the PATH");
    }
    found
}

/// keygate (the real binary) behind Envoy with the example's transcoder config.
struct Stack {
    envoy: Envoy,
    keygate: Binary,
    _descriptor_dir: tempfile::TempDir,
    /// The database of `backend` when not keygate's own SQLite file; dropped after keygate.
    _database: Option<TestDatabase>,
}

async fn stack(env: &[(&str, &str)]) -> Option<Stack> {
    stack_on(Backend::Sqlite, env).await
}

/// The stack with keygate on a fresh database of `backend`.
async fn stack_on(backend: Backend, env: &[(&str, &str)]) -> Option<Stack> {
    let envoy_binary = envoy_binary()?;
    if !curl_available() {
        return None;
    }
    let database = match backend {
        Backend::Sqlite => None,
        _ => Some(TestDatabase::create(backend).await?),
    };
    let mut env = env.to_vec();
    if let Some(database) = &database {
        env.push(("KEYGATE_DATABASE_URL", database.url.as_str()));
    }
    let keygate = Binary::start(&env, None).await;
    // What the example's README does: `keygate descriptor-set --out keygate.pb`.
    let descriptor_dir = tempfile::tempdir().unwrap();
    let descriptor = descriptor_dir.path().join("keygate.pb");
    let output = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["descriptor-set", "--out", descriptor.to_str().unwrap()])
        .output()
        .expect("run keygate descriptor-set");
    assert!(output.status.success(), "keygate descriptor-set: {}", String::from_utf8_lossy(&output.stderr));
    let bytes = std::fs::read(&descriptor).unwrap();
    // Without its google.api.http options the transcoder maps no route at all (every request
    // would be a 404), so say that rather than leave it to the assertions below.
    assert!(
        contains(&bytes, b"/v1/tenants/{tenant_id}/keys/{key_id}:revoke") && contains(&bytes, b"/v1/check"),
        "the descriptor set of `keygate descriptor-set` lost the google.api.http options of keygate's RPCs"
    );
    // keygate is this config's only cluster: start_with's upstream address goes unused.
    let envoy = Envoy::start_with(
        &envoy_binary,
        include_str!("../../examples/http-json/envoy.yaml"),
        &[("/etc/envoy/keygate.pb", descriptor.to_str().unwrap())],
        keygate.address,
        keygate.address,
    )
    .await;
    Some(Stack { envoy, keygate, _descriptor_dir: descriptor_dir, _database: database })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

impl Stack {
    /// `curl -X method` to `path` through Envoy, with `Authorization: Bearer token` when given,
    /// `body` as JSON when given, and any `extra` curl flags.
    fn curl(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>, extra: &[&str]) -> Reply {
        let mut command = Command::new("curl");
        command.args(["--silent", "--show-error", "--max-time", "20", "--request", method]);
        command.args(["--write-out", "\n%{http_code} %{http_version} %{content_type}"]);
        if let Some(token) = token {
            command.arg("--header").arg(format!("Authorization: Bearer {token}"));
        }
        if let Some(body) = body {
            command.args(["--header", "Content-Type: application/json", "--data-binary", &body.to_string()]);
        }
        command.args(extra).arg(format!("http://{}{path}", self.envoy.address));
        let output = command.output().expect("run curl");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "curl {method} {path}: {}{stdout}", String::from_utf8_lossy(&output.stderr));
        let (body, trailer) = stdout.rsplit_once('\n').expect("curl wrote its --write-out line");
        let mut trailer = trailer.splitn(3, ' ');
        let status = trailer.next().and_then(|status| status.parse().ok()).expect("an HTTP status");
        let version = trailer.next().unwrap_or_default().to_owned();
        let content_type = trailer.next().unwrap_or_default().to_owned();
        Reply { status, version, content_type, body: body.to_owned() }
    }

    /// A KeyAdmin call with the admin token that must succeed; returns its JSON.
    #[track_caller]
    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let reply = self.curl(method, path, Some(ADMIN_TOKEN), body.as_ref(), &[]);
        assert_eq!(reply.status, 200, "{method} {path}: {reply:?}");
        assert_eq!(reply.content_type, "application/json", "{reply:?}");
        reply.json()
    }

    /// POST /v1/check for `secret` and `scope`, with no caller token.
    #[track_caller]
    fn check(&self, secret: &str, scope: &str) -> Value {
        let reply = self.curl("POST", "/v1/check", None, Some(&json!({ "key": secret, "scope": scope })), &[]);
        assert_eq!(reply.status, 200, "a deny is an answer, not an error: {reply:?}");
        reply.json()
    }
}

fn key_ids(listing: &Value) -> Vec<&str> {
    listing["keys"].as_array().expect("keys").iter().map(|key| key["key_id"].as_str().unwrap()).collect()
}

async fn keys_are_managed_over_http_json_from_creation_to_revocation(backend: Backend) {
    let Some(stack) = stack_on(backend, &[]).await else { return };
    // Every body but CreateKey's, to check that the secret is never shown again.
    let mut later_bodies = Vec::new();

    let tenant = stack.admin("PUT", "/v1/tenants/acme", Some(json!({ "display_name": "Acme Inc" })));
    assert_eq!(tenant["tenant"]["tenant_id"], "acme", "{tenant}");
    assert_eq!(tenant["tenant"]["display_name"], "Acme Inc", "{tenant}");
    // always_print_primitive_fields: zero values are there, under their proto names.
    assert_eq!(tenant["tenant"]["max_keys"], 0, "{tenant}");
    assert_eq!(tenant["tenant"]["api_access_enabled"], true, "{tenant}");
    let fetched = stack.admin("GET", "/v1/tenants/acme", None);
    assert_eq!(fetched["tenant"]["display_name"], "Acme Inc", "{fetched}");

    let created = stack.curl(
        "POST",
        "/v1/tenants/acme/keys",
        Some(ADMIN_TOKEN),
        Some(&json!({
            "name": "reporting",
            "scopes": ["events:read"],
            "metadata": { "team": "data" },
            "expires_in": "86400s",
        })),
        &[],
    );
    assert_eq!(created.status, 200, "{created:?}");
    let created = created.json();
    let secret = created["secret"].as_str().expect("CreateKey answers the secret").to_owned();
    assert!(secret.starts_with("kg_live_"), "{created}");
    let key = &created["key"];
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    assert!(key_id.starts_with("key_"), "{created}");
    assert_eq!(key["tenant_id"], "acme");
    assert_eq!(key["state"], "KEY_STATE_ACTIVE");
    assert_eq!(key["environment"], "KEY_ENVIRONMENT_LIVE");
    assert_eq!(key["scopes"], json!(["events:read"]));
    assert_eq!(key["metadata"], json!({ "team": "data" }));
    assert!(secret.starts_with(key["display_prefix"].as_str().unwrap()), "{created}");
    assert!(key["expires_at"].as_str().is_some_and(|at| at.ends_with('Z')), "RFC 3339: {created}");
    assert!(key.get("secret").is_none(), "{created}");

    // GetKey, here over HTTP/2 without TLS (h2c) on the same port.
    let got = stack.curl(
        "GET",
        &format!("/v1/tenants/acme/keys/{key_id}"),
        Some(ADMIN_TOKEN),
        None,
        &["--http2-prior-knowledge"],
    );
    assert_eq!((got.status, got.version.as_str()), (200, "2"), "{got:?}");
    later_bodies.push(got.body.clone());
    let got = got.json();
    assert_eq!(got["key"]["key_id"], key_id.as_str(), "{got}");
    assert_eq!(got["key"]["name"], "reporting", "{got}");
    assert!(got.get("secret").is_none(), "{got}");

    let other = stack.admin(
        "POST",
        "/v1/tenants/acme/keys",
        Some(json!({ "name": "ingest", "scopes": ["events:write"], "environment": "KEY_ENVIRONMENT_TEST" })),
    );
    let other_id = other["key"]["key_id"].as_str().unwrap().to_owned();
    assert!(other["secret"].as_str().unwrap().starts_with("kg_test_"), "{other}");

    // UpdateKey: PATCH with update_mask changes the named fields only.
    let updated = stack.curl(
        "PATCH",
        &format!("/v1/tenants/acme/keys/{key_id}"),
        Some(ADMIN_TOKEN),
        Some(&json!({
            "name": "reporting (read/write)",
            "scopes": ["events:read", "events:write"],
            "rate_limit_per_minute": 99,
            "update_mask": "name,scopes",
        })),
        &[],
    );
    assert_eq!(updated.status, 200, "{updated:?}");
    later_bodies.push(updated.body.clone());
    let updated = updated.json();
    assert_eq!(updated["key"]["name"], "reporting (read/write)", "{updated}");
    assert_eq!(updated["key"]["scopes"], json!(["events:read", "events:write"]), "{updated}");
    assert_eq!(updated["key"]["rate_limit_per_minute"], 0, "not in update_mask: {updated}");
    assert_eq!(updated["key"]["metadata"], json!({ "team": "data" }), "{updated}");

    // Check over POST /v1/check: allowed, with the key's context.
    let allowed = stack.check(&secret, "events:write");
    assert_eq!(allowed["allowed"], true, "{allowed}");
    assert_eq!(allowed["reason"], "DENY_REASON_UNSPECIFIED", "{allowed}");
    assert_eq!(allowed["http_status"], 200, "{allowed}");
    assert_eq!(allowed["tenant_id"], "acme", "{allowed}");
    assert_eq!(allowed["key_id"], key_id.as_str(), "{allowed}");
    assert_eq!(allowed["metadata"], json!({ "team": "data" }), "{allowed}");
    later_bodies.push(allowed.to_string());

    // RevokeKey, the AIP-136 custom method, with and without a body.
    let revoked = stack.curl("POST", &format!("/v1/tenants/acme/keys/{key_id}:revoke"), Some(ADMIN_TOKEN), None, &[]);
    assert_eq!(revoked.status, 200, "{revoked:?}");
    later_bodies.push(revoked.body.clone());
    let revoked = revoked.json();
    assert_eq!(revoked["key"]["state"], "KEY_STATE_REVOKED", "{revoked}");
    assert!(revoked["key"]["revoked_at"].is_string(), "{revoked}");
    let again = stack.admin("POST", &format!("/v1/tenants/acme/keys/{key_id}:revoke"), Some(json!({})));
    assert_eq!(again["key"]["revoked_at"], revoked["key"]["revoked_at"], "revoking twice is a no-op");

    let denied = stack.check(&secret, "events:read");
    assert_eq!(denied["allowed"], false, "{denied}");
    assert_eq!(denied["reason"], "DENY_REASON_KEY_REVOKED", "{denied}");
    assert_eq!(denied["http_status"], 401, "{denied}");
    assert_eq!(denied["message"], "Invalid API key", "{denied}");
    later_bodies.push(denied.to_string());

    // ListKeys with query parameters: revoked keys only with include_revoked, pages by page_size.
    let active = stack.admin("GET", "/v1/tenants/acme/keys", None);
    assert_eq!(key_ids(&active), [other_id.as_str()], "{active}");
    assert_eq!(active["next_page_token"], "", "{active}");
    let everything = stack.admin("GET", "/v1/tenants/acme/keys?include_revoked=true", None);
    let mut all = key_ids(&everything);
    all.sort_unstable();
    let mut expected = [key_id.as_str(), other_id.as_str()];
    expected.sort_unstable();
    assert_eq!(all, expected, "{everything}");
    let first = stack.admin("GET", "/v1/tenants/acme/keys?include_revoked=true&page_size=1", None);
    assert_eq!(key_ids(&first).len(), 1, "{first}");
    let token = first["next_page_token"].as_str().unwrap();
    assert!(!token.is_empty(), "{first}");
    let second =
        stack.admin("GET", &format!("/v1/tenants/acme/keys?include_revoked=true&page_size=1&page_token={token}"), None);
    let mut paged = [key_ids(&first)[0], key_ids(&second)[0]];
    paged.sort_unstable();
    assert_eq!(paged, expected, "{first} {second}");
    assert_eq!(second["next_page_token"], "", "{second}");
    later_bodies.extend([active, everything, first, second].iter().map(Value::to_string));

    // The audit log shows who did it.
    let audit = stack.admin("GET", &format!("/v1/tenants/acme/auditEvents?key_id={key_id}"), None);
    let types: Vec<&str> =
        audit["events"].as_array().unwrap().iter().map(|event| event["event_type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["AUDIT_EVENT_TYPE_KEY_CREATED", "AUDIT_EVENT_TYPE_KEY_UPDATED", "AUDIT_EVENT_TYPE_KEY_REVOKED"],
        "{audit}"
    );
    assert_eq!(audit["events"][0]["actor"], "tests", "{audit}");
    later_bodies.push(audit.to_string());

    for body in &later_bodies {
        assert!(!body.contains(&secret), "the secret is shown once, by CreateKey only: {body}");
        assert!(!body.contains(&secret[secret.len() - 16..]), "{body}");
    }
}

async fn errors_come_back_with_their_http_status_and_a_json_status() {
    let Some(stack) = stack(&[]).await else { return };
    stack.admin("PUT", "/v1/tenants/acme", Some(json!({})));
    stack.admin("PUT", "/v1/tenants/globex", Some(json!({})));

    // No admin token, a wrong one, another scheme: 401 UNAUTHENTICATED, and nothing changes.
    let no_token =
        stack.curl("POST", "/v1/tenants/acme/keys", None, Some(&json!({ "name": "x", "scopes": ["a:b"] })), &[]);
    let body = no_token.assert_error(401, 16);
    assert!(body["message"].as_str().unwrap().contains("authorization: Bearer"), "{body}");
    let wrong = stack.curl("GET", "/v1/tenants/acme", Some("not-the-admin-token"), None, &[]);
    wrong.assert_error(401, 16);
    let basic = stack.curl("GET", "/v1/tenants/acme", None, None, &["--user", "tests:secret"]);
    basic.assert_error(401, 16);
    assert_eq!(key_ids(&stack.admin("GET", "/v1/tenants/acme/keys?include_revoked=true", None)).len(), 0);

    // An unknown key, or a tenant that does not exist: 404 NOT_FOUND.
    let missing = stack.curl("GET", "/v1/tenants/acme/keys/key_000000000000000000000000", Some(ADMIN_TOKEN), None, &[]);
    let body = missing.assert_error(404, 5);
    assert!(body["message"].as_str().unwrap().contains("key_000000000000000000000000"), "{body}");
    stack
        .curl("POST", "/v1/tenants/acme/keys/key_000000000000000000000000:revoke", Some(ADMIN_TOKEN), None, &[])
        .assert_error(404, 5);
    stack.curl("GET", "/v1/tenants/initech", Some(ADMIN_TOKEN), None, &[]).assert_error(404, 5);
    // Another tenant's key is NOT_FOUND too, exactly as if it did not exist.
    let created = stack.admin("POST", "/v1/tenants/acme/keys", Some(json!({ "name": "k", "scopes": ["events:read"] })));
    let key_id = created["key"]["key_id"].as_str().unwrap();
    stack.curl("GET", &format!("/v1/tenants/globex/keys/{key_id}"), Some(ADMIN_TOKEN), None, &[]).assert_error(404, 5);

    // Invalid input: 400 INVALID_ARGUMENT with a google.rpc.BadRequest naming the field.
    let invalid = stack.curl(
        "POST",
        "/v1/tenants/acme/keys",
        Some(ADMIN_TOKEN),
        Some(&json!({ "name": "reporting", "scopes": ["Events Read"] })),
        &[],
    );
    let body = invalid.assert_error(400, 3);
    let details = body["details"].as_array().unwrap();
    let bad_request = details
        .iter()
        .find(|detail| detail["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .unwrap_or_else(|| panic!("no BadRequest in {body}"));
    let violation = &bad_request["field_violations"][0];
    assert_eq!(violation["field"], "scopes[0]", "{body}");
    assert!(violation["description"].as_str().is_some_and(|text| !text.is_empty()), "{body}");
    // UpdateKey without update_mask names it.
    let no_mask = stack.curl(
        "PATCH",
        &format!("/v1/tenants/acme/keys/{key_id}"),
        Some(ADMIN_TOKEN),
        Some(&json!({ "name": "renamed" })),
        &[],
    );
    let body = no_mask.assert_error(400, 3);
    assert!(body.to_string().contains("update_mask"), "{body}");

    // A site another tenant owns: 409 ALREADY_EXISTS.
    stack.admin("PUT", "/v1/tenants/acme/sites/shop.example", Some(json!({ "display_name": "Shop" })));
    let taken = stack.curl("PUT", "/v1/tenants/globex/sites/shop.example", Some(ADMIN_TOKEN), Some(&json!({})), &[]);
    let body = taken.assert_error(409, 6);
    assert!(!body.to_string().contains("acme"), "the owner is not named: {body}");
    let sites = stack.admin("GET", "/v1/tenants/acme/sites", None);
    assert_eq!(sites["sites"][0]["display_name"], "Shop", "{sites}");
    assert_eq!(stack.admin("DELETE", "/v1/tenants/acme/sites/shop.example", None), json!({}));
}

async fn envoy_refuses_what_no_route_maps_with_the_same_json_shape() {
    let Some(stack) = stack(&[]).await else { return };
    stack.admin("PUT", "/v1/tenants/acme", Some(json!({})));

    // A misspelt query parameter is an error, not silently ignored.
    let reply = stack.curl("GET", "/v1/tenants/acme/keys?page_sise=1", Some(ADMIN_TOKEN), None, &[]);
    let body = reply.assert_error(400, 3);
    assert!(body["message"].as_str().unwrap().contains("page_sise"), "{body}");
    // No route for the path, the method or the custom verb: 404.
    for (method, path) in [
        ("GET", "/v1/nothing"),
        ("DELETE", "/v1/tenants/acme"),
        ("POST", "/v1/tenants/acme/keys/key_000000000000000000000000:frobnicate"),
        ("GET", "/grpc.health.v1.Health/Check"),
    ] {
        let body = stack.curl(method, path, Some(ADMIN_TOKEN), None, &[]).assert_error(404, 5);
        assert!(body["message"].as_str().unwrap().contains("Could not resolve"), "{method} {path}: {body}");
    }
    // A body that is not JSON.
    let reply = stack.curl(
        "POST",
        "/v1/tenants/acme/keys",
        Some(ADMIN_TOKEN),
        None,
        &["--header", "Content-Type: application/json", "--data-binary", "{\"name\": "],
    );
    reply.assert_error(400, 3);
    // A misspelt field of a body is ignored by the transcoder (proto3 JSON parsing), so what is
    // required and missing is what the answer names.
    let misspelt = json!({ "nmae": "reporting", "scopes": ["events:read"] });
    let body =
        stack.curl("POST", "/v1/tenants/acme/keys", Some(ADMIN_TOKEN), Some(&misspelt), &[]).assert_error(400, 3);
    assert_eq!(body["details"][0]["field_violations"][0]["field"], "name", "{body}");
    // A body that names another tenant than the path: refused, not the body's tenant.
    let reply = stack.curl("PUT", "/v1/tenants/acme", Some(ADMIN_TOKEN), Some(&json!({ "tenant_id": "initech" })), &[]);
    reply.assert_error(400, 3);
    stack.curl("GET", "/v1/tenants/initech", Some(ADMIN_TOKEN), None, &[]).assert_error(404, 5);
}

async fn check_over_http_json_passes_the_caller_token_through() {
    let caller = "caller-token-0123456789abcdef0123";
    let callers = format!("api={caller}");
    let Some(stack) = stack(&[("KEYGATE_AUTHORIZE_TOKENS", callers.as_str())]).await else { return };
    stack.admin("PUT", "/v1/tenants/acme", Some(json!({})));
    let created = stack.admin("POST", "/v1/tenants/acme/keys", Some(json!({ "name": "k", "scopes": ["events:read"] })));
    let secret = created["secret"].as_str().unwrap();
    let request = json!({ "key": secret, "scope": "events:read" });

    stack.curl("POST", "/v1/check", None, Some(&request), &[]).assert_error(401, 16);
    stack.curl("POST", "/v1/check", Some(ADMIN_TOKEN), Some(&request), &[]).assert_error(401, 16);
    let reply = stack.curl("POST", "/v1/check", Some(caller), Some(&request), &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["allowed"], true, "{reply:?}");
    let reply =
        stack.curl("POST", "/v1/check", Some(caller), Some(&json!({ "key": secret, "scope": "events:write" })), &[]);
    let denied = reply.json();
    assert_eq!(
        (denied["allowed"].clone(), denied["reason"].clone()),
        (json!(false), json!("DENY_REASON_SCOPE_MISSING"))
    );
    assert_eq!(denied["http_status"], 403, "{denied}");
    // A Check without a scope is an invalid request, not a deny.
    let reply = stack.curl("POST", "/v1/check", Some(caller), Some(&json!({ "key": secret })), &[]);
    reply.assert_error(400, 3);
}

async fn with_keygate_stopped_the_client_gets_a_json_503() {
    let Some(mut stack) = stack(&[]).await else { return };
    stack.admin("PUT", "/v1/tenants/acme", Some(json!({})));
    stack.keygate.process.0.kill().unwrap();
    stack.keygate.process.0.wait().unwrap();
    let body = stack.curl("GET", "/v1/tenants/acme", Some(ADMIN_TOKEN), None, &[]).assert_error(503, 14);
    assert!(body["message"].as_str().unwrap().contains("upstream"), "{body}");
    stack
        .curl("POST", "/v1/check", None, Some(&json!({ "key": "kg_live_x", "scope": "a:b" })), &[])
        .assert_error(503, 14);
}

async fn the_path_decides_which_tenant_key_and_site_a_call_acts_on(backend: Backend) {
    let Some(stack) = stack_on(backend, &[]).await else { return };
    stack.admin("PUT", "/v1/tenants/acme", Some(json!({})));
    stack.admin("PUT", "/v1/tenants/globex", Some(json!({})));
    stack.admin("PUT", "/v1/tenants/acme/sites/shop.example", Some(json!({})));
    stack.admin("PUT", "/v1/tenants/globex/sites/g.example", Some(json!({})));
    let ours = stack.admin("POST", "/v1/tenants/acme/keys", Some(json!({ "name": "ours", "scopes": ["a:b"] })));
    let theirs = stack.admin("POST", "/v1/tenants/globex/keys", Some(json!({ "name": "theirs", "scopes": ["a:b"] })));
    let (ours, theirs) = (ours["key"]["key_id"].as_str().unwrap(), theirs["key"]["key_id"].as_str().unwrap());
    // A query parameter naming another tenant, key or site, in any spelling the transcoder
    // reads, is refused rather than allowed to win over the path.
    for (method, path) in [
        ("POST", format!("/v1/tenants/acme/keys/{ours}:revoke?tenant_id=globex&key_id={theirs}")),
        ("POST", format!("/v1/tenants/acme/keys/{ours}:revoke?keyId={theirs}")),
        ("GET", format!("/v1/tenants/acme/keys/{ours}?key%5Fid={theirs}")),
        ("DELETE", "/v1/tenants/acme/sites/shop.example?tenant_id=globex&site_id=g.example".to_owned()),
        ("DELETE", "/v1/tenants/acme/sites/shop.example?siteId=g.example".to_owned()),
        ("PUT", "/v1/tenants/acme?tenantId=globex".to_owned()),
        ("POST", "/v1/tenants/acme/keys?tenant%5Fid=globex".to_owned()),
        ("GET", "/v1/tenants/acme/keys?page_size=5&TENANT_ID=globex".to_owned()),
    ] {
        let body = (method != "GET" && method != "DELETE").then(|| json!({ "name": "x", "scopes": ["a:b"] }));
        stack.curl(method, &path, Some(ADMIN_TOKEN), body.as_ref(), &[]).assert_error(400, 3);
    }
    let globex = stack.admin("GET", "/v1/tenants/globex/keys?include_revoked=true", None);
    assert_eq!(key_ids(&globex), [theirs], "globex has its one key, unrevoked, and no new one");
    assert_eq!(globex["keys"][0]["state"], "KEY_STATE_ACTIVE");
    let sites = stack.admin("GET", "/v1/tenants/globex/sites", None);
    assert_eq!(sites["sites"].as_array().unwrap().len(), 1, "{sites}");
    // Filters that are not path ids still work as query parameters.
    let filtered = stack.admin("GET", "/v1/tenants/acme/keys?site_id=shop.example", None);
    assert!(key_ids(&filtered).is_empty(), "{filtered}");
    let events = stack.admin("GET", &format!("/v1/tenants/acme/auditEvents?key_id={ours}"), None);
    assert!(!events["events"].as_array().unwrap().is_empty(), "{events}");
}

async fn no_part_of_a_key_comes_back_in_an_error_or_travels_in_a_url() {
    let Some(stack) = stack(&[]).await else { return };
    stack.admin("PUT", "/v1/tenants/acme", Some(json!({})));
    let created = stack.admin("POST", "/v1/tenants/acme/keys", Some(json!({ "name": "k", "scopes": ["a:b"] })));
    let secret = created["secret"].as_str().unwrap().to_owned();
    let tail = &secret[secret.len() - 16..];
    // In the URL: refused, whatever else the request holds.
    let in_url = stack.curl("POST", &format!("/v1/check?key={secret}&scope=a:b"), None, Some(&json!({})), &[]);
    let body = in_url.assert_error(400, 3);
    assert!(!in_url.body.contains(tail), "{body}");
    let conflicting =
        stack.curl("POST", "/v1/check?scope=x:y", None, Some(&json!({ "key": secret, "scope": "a:b" })), &[]);
    conflicting.assert_error(400, 3);
    assert!(!conflicting.body.contains(tail), "{conflicting:?}");
    // A body the transcoder cannot read: its error says what was expected, and quotes nothing.
    for broken in [format!(r#"{{"key": "{secret}", "scope": "a:b""#), format!(r#"{{"key": "{secret}" "scope": 1}}"#)] {
        for path in ["/v1/check", "/v1/tenants/acme/keys:import"] {
            let mut command = Command::new("curl");
            command.args(["--silent", "--request", "POST", "--header", "Content-Type: application/json"]);
            command.args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")]);
            command.args(["--data-binary", &broken, &format!("http://{}{path}", stack.envoy.address)]);
            let output = command.output().unwrap();
            let body = String::from_utf8_lossy(&output.stdout);
            assert!(body.contains("\"code\":3") && !body.contains(tail), "{path}: {body}");
        }
    }
}
