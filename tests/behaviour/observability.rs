//! Prometheus metrics on their own port: scraped after real calls, the counters have moved.

use keygate::proto::*;

use crate::envoy_support::get;
use crate::support::*;

crate::trials!(
    every_backend: [],
    once: [
        a_server_does_not_measure_invalidation_lag_for_its_own_changes,
        metrics_count_decisions_cache_store_admin_calls_and_invalidation_lag,
    ],
);

/// The metrics of one scrape: every sample line as (name with labels, value).
struct Scrape(Vec<(String, f64)>);

impl Scrape {
    async fn of(app: &TestApp) -> Self {
        let response = get(app.metrics_address, "/metrics", &[]).await.expect("scrape /metrics");
        assert_eq!(response.status, 200);
        assert!(response.headers["content-type"].starts_with("text/plain"));
        let samples = response
            .body
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                line.rsplit_once(' ').and_then(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
            })
            .collect();
        Self(samples)
    }

    /// The sum of the samples named `name` whose labels include every one of `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(sample, _)| sample == name || sample.starts_with(&format!("{name}{{")))
            .filter(|(sample, _)| labels.iter().all(|(label, value)| sample.contains(&format!("{label}=\"{value}\""))))
            .map(|(_, value)| value)
            .sum()
    }
}

async fn metrics_count_decisions_cache_store_admin_calls_and_invalidation_lag() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let replica = spawn_replica(&app, &[]).await;
    let before = Scrape::of(&app).await;
    let replica_before = Scrape::of(&replica).await;

    put_tenant(&app, "acme").await;
    let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    for _ in 0..3 {
        assert!(check(&app, &secret, "events:read", "").await.allowed);
    }
    check(&app, &secret, "goals:read", "").await;
    check(&app, &crate::checks::well_formed_unknown_key(), "events:read", "").await;
    let refused = app.admin_with(None).get_tenant(GetTenantRequest { tenant_id: "acme".into() }).await;
    assert!(refused.is_err());
    assert!(check(&replica, &secret, "events:read", "").await.allowed);
    crate::keys::revoke(&app, "acme", &key.key_id).await.unwrap();
    let started = std::time::Instant::now();
    while check(&replica, &secret, "events:read", "").await.allowed {
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
    // Cached again, as revoked.
    assert_eq!(check(&app, &secret, "events:read", "").await.reason(), keygate::proto::DenyReason::KeyRevoked);

    let after = Scrape::of(&app).await;
    let moved = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    assert!(moved("keygate_decisions_total", &[("decision", "ALLOWED")]) >= 3.0);
    assert!(moved("keygate_decisions_total", &[("decision", "SCOPE_MISSING")]) >= 1.0);
    assert!(moved("keygate_decisions_total", &[("decision", "KEY_UNKNOWN")]) >= 1.0);
    assert!(moved("keygate_check_duration_seconds_count", &[]) >= 5.0);
    assert!(moved("keygate_cache_hits_total", &[("cache", "keys")]) >= 3.0);
    assert!(moved("keygate_cache_misses_total", &[("cache", "keys")]) >= 2.0);
    assert!(moved("keygate_unknown_keys_filtered_total", &[]) >= 1.0, "the unknown key was answered by the filter");
    assert!(after.value("keygate_cache_entries", &[("cache", "keys")]) >= 1.0);
    assert!(moved("keygate_store_queries_total", &[]) >= 3.0);
    assert!(moved("keygate_store_lookup_duration_seconds_count", &[]) >= 2.0);
    let admin = |method, code| [("service", "keygate.v1.KeyAdmin"), ("method", method), ("code", code)];
    assert!(moved("keygate_grpc_calls_total", &admin("CreateKey", "Ok")) >= 1.0);
    assert!(moved("keygate_grpc_calls_total", &admin("GetTenant", "Unauthenticated")) >= 1.0);
    assert!(moved("keygate_grpc_call_duration_seconds_count", &[("service", "keygate.v1.Authorize")]) >= 5.0);
    let replica_after = Scrape::of(&replica).await;
    let lag = replica_after.value("keygate_invalidation_lag_seconds_count", &[])
        - replica_before.value("keygate_invalidation_lag_seconds_count", &[]);
    assert!(lag >= 1.0, "the replica measured how late the revoke reached it");
    assert_eq!(get(app.metrics_address, "/other", &[]).await.unwrap().status, 404);
}

async fn a_server_does_not_measure_invalidation_lag_for_its_own_changes() {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let keygate = Binary::start(&[("KEYGATE_METRICS_LISTEN", metrics.as_str())], None).await;
    let metrics: std::net::SocketAddr = metrics.parse().unwrap();
    let mut admin = keygate.admin();
    for index in 0..5 {
        let request = PutTenantRequest { tenant_id: format!("t{index}"), ..Default::default() };
        admin.put_tenant(request).await.unwrap();
    }
    // Several polls of the change feed later, the changes were seen and skipped as its own.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let body = get(metrics, "/metrics", &[]).await.unwrap().body;
    let count: f64 = body
        .lines()
        .find_map(|line| line.strip_prefix("keygate_invalidation_lag_seconds_count "))
        .map_or(0.0, |value| value.trim().parse().unwrap());
    assert_eq!(count, 0.0, "a server's own changes are not lag:\n{body}");
}
