//! API keys next to user JWTs behind one Envoy (examples/zerotrust/envoy.yaml): a key-shaped bearer
//! goes to keygate and never to the JWT filter, a JWT to Envoy's jwt_authn and never to keygate.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::envoy_support::*;
use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [a_jwt_and_an_api_key_each_reach_only_their_own_check],
);

/// The shared secret of the test's JWKS (HS256, as an `oct` key).
const SIGNING_KEY: &[u8] = b"a test signing key of 32 bytes!!";

/// A JWT signed with `key`, for `claims`.
fn jwt(claims: &serde_json::Value, key: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "typ": "JWT", "kid": "test"}).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

async fn a_jwt_and_an_api_key_each_reach_only_their_own_check() {
    let Some(binary) = envoy_binary() else { return };
    let config = format!("{}/examples/zerotrust/keygate.toml", env!("CARGO_MANIFEST_DIR"));
    let app = spawn_app_with(Backend::Sqlite, &["--config", &config]).await.unwrap();
    put_tenant(&app, "acme").await;
    let (_, key) = create_key(&app, key_request("acme", &["api:read"])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let k = URL_SAFE_NO_PAD.encode(SIGNING_KEY);
    std::fs::write(&jwks, json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "test", "k": k}]}).to_string())
        .unwrap();
    let upstream = start_echo_upstream().await;
    let envoy = Envoy::start_with(
        &binary,
        include_str!("../../examples/zerotrust/envoy.yaml"),
        &[("/etc/envoy/jwks.json", jwks.to_str().unwrap())],
        app.address,
        upstream,
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let claims =
        json!({"iss": "https://auth.example.com", "aud": "api.example.com", "sub": "user-42", "exp": now + 600});
    let token = jwt(&claims, SIGNING_KEY);
    let bearer = |credential: &str| format!("Bearer {credential}");

    // A user JWT: verified by Envoy, the upstream gets its subject, keygate is not asked (a JWT
    // sent to keygate would be denied as a malformed key).
    let response = get(envoy.address, "/api/account", &[("authorization", &bearer(&token))]).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let headers = response.upstream_headers();
    assert_eq!(headers.get("x-user-id").map(String::as_str), Some("user-42"));
    assert!(!headers.contains_key("x-keygate-tenant-id"), "{headers:?}");
    let with_key_header = [("authorization", bearer(&token)), ("x-api-key", key.clone())];
    let with_key_header: Vec<(&str, &str)> =
        with_key_header.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let response = get(envoy.address, "/api/account", &with_key_header).await.unwrap();
    assert_eq!(response.status, 200);
    assert!(!response.body.contains(&key[9..]), "a key sent beside a JWT never reaches the API");

    // An API key: keygate decides, the JWT filter never saw it (it would refuse a non-JWT).
    let response = get(envoy.address, "/api/account", &[("authorization", &bearer(&key))]).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let headers = response.upstream_headers();
    assert_eq!(headers.get("x-keygate-tenant-id").map(String::as_str), Some("acme"));
    assert!(!headers.contains_key("x-user-id"));

    // Bad credentials of each kind are refused by their own check.
    let forged = jwt(&claims, b"another key, not the one in JWKS");
    let response = get(envoy.address, "/api/account", &[("authorization", &bearer(&forged))]).await.unwrap();
    assert_eq!(response.status, 401, "{response:?}");
    assert!(!response.body.contains("Invalid API key"), "Envoy's JWT answer, not keygate's: {}", response.body);
    let expired = jwt(
        &json!({"iss": "https://auth.example.com", "aud": "api.example.com", "sub": "u", "exp": now - 60}),
        SIGNING_KEY,
    );
    assert_eq!(get(envoy.address, "/api/account", &[("authorization", &bearer(&expired))]).await.unwrap().status, 401);
    let unknown_key = format!("zta_live_{}", "a".repeat(36));
    let response = get(envoy.address, "/api/account", &[("authorization", &bearer(&unknown_key))]).await.unwrap();
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(response.json(), json!({"error": "Invalid API key"}), "keygate's answer: {}", response.body);
    let response = get(envoy.address, "/api/account", &[]).await.unwrap();
    assert_eq!(response.status, 401, "no credential: the JWT route asks for one: {response:?}");
    // A forged user id never reaches the upstream, on either route.
    let response =
        get(envoy.address, "/api/account", &[("authorization", &bearer(&key)), ("x-user-id", "admin")]).await.unwrap();
    assert!(!response.upstream_headers().contains_key("x-user-id"), "{response:?}");
}
