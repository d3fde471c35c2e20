//! Rate limits (per key, per minute, sliding) and daily quotas (per tenant), shared by replicas.

use std::time::Duration;

use keygate::proto::*;

use crate::support::*;

crate::trials!(
    every_backend: [
        a_key_over_its_per_minute_limit_is_rate_limited_until_the_window_slides,
        a_tenant_over_its_daily_quota_is_denied_until_the_next_day,
        two_replicas_share_a_limit_within_the_documented_bound,
    ],
    once: [],
);

async fn a_key_over_its_per_minute_limit_is_rate_limited_until_the_window_slides(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let tenant = PutTenantRequest { tenant_id: "acme".into(), rate_limit_per_minute: Some(3), ..Default::default() };
    put_tenant_with(&app, tenant).await;
    let mut own = key_request("acme", &["events:read"]);
    own.rate_limit_per_minute = 5;
    let (_, own) = create_key(&app, own).await.unwrap();
    let (_, inherited) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();

    for expected_remaining in (0..5).rev() {
        let response = check(&app, &own, "events:read", "").await;
        assert!(response.allowed, "{response:?}");
        assert_eq!(
            response.rate_limit.as_ref().map(|limit| (limit.limit, limit.remaining)),
            Some((5, expected_remaining))
        );
    }
    let response = check(&app, &own, "events:read", "").await;
    assert_denied(&response, DenyReason::RateLimited, 429, "Rate limit exceeded");
    let limit = response.rate_limit.unwrap();
    assert_eq!((limit.limit, limit.remaining), (5, 0));
    assert!(limit.reset_at.is_some());
    // Another key of the tenant has its own window, with the tenant's default limit.
    for _ in 0..3 {
        assert!(check(&app, &inherited, "events:read", "").await.allowed);
    }
    assert_eq!(check(&app, &inherited, "events:read", "").await.reason(), DenyReason::RateLimited);
    // The window slides: 30 s into the next minute, half of the 5 still weigh in (2.5), so two
    // more fit under 5 and a third does not; a fixed window would admit five.
    use chrono::{DurationRound, Timelike};
    use keygate::domain::clock::Clock;
    let now = app.clock.now();
    let minute = now.duration_trunc(chrono::Duration::minutes(1)).unwrap();
    app.clock.advance(minute + chrono::Duration::seconds(90) - now);
    assert_eq!(app.clock.now().second(), 30);
    assert!(check(&app, &own, "events:read", "").await.allowed);
    assert!(check(&app, &own, "events:read", "").await.allowed);
    let denied = check(&app, &own, "events:read", "").await;
    assert_eq!(denied.reason(), DenyReason::RateLimited);
    // 2 this minute + 5 (1 - e) + 1 <= 5 from e = 0.6, 36 s into the minute: 6 s from now.
    assert_eq!(
        denied.rate_limit.unwrap().reset_at.unwrap().seconds,
        (minute + chrono::Duration::seconds(96)).timestamp()
    );
    app.clock.advance(chrono::Duration::minutes(2));
    assert!(check(&app, &own, "events:read", "").await.allowed);
}

async fn a_tenant_over_its_daily_quota_is_denied_until_the_next_day(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let tenant = PutTenantRequest { tenant_id: "acme".into(), daily_request_quota: Some(3), ..Default::default() };
    put_tenant_with(&app, tenant).await;
    let (_, first) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let (_, second) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert!(check(&app, &first, "events:read", "").await.allowed);
    assert!(check(&app, &second, "events:read", "").await.allowed);
    let last = check(&app, &first, "events:read", "").await;
    assert!(last.allowed);
    assert_eq!(last.rate_limit.as_ref().map(|quota| (quota.limit, quota.remaining)), Some((3, 0)));
    let response = check(&app, &second, "events:read", "").await;
    assert_denied(&response, DenyReason::QuotaExceeded, 429, "Daily request quota exceeded");
    let quota = response.rate_limit.unwrap();
    assert_eq!((quota.limit, quota.remaining), (3, 0));
    assert_eq!(quota.reset_at.unwrap().seconds % 86_400, 0, "resets at midnight UTC");
    app.clock.advance(chrono::Duration::days(1));
    assert!(check(&app, &second, "events:read", "").await.allowed);
}

async fn two_replicas_share_a_limit_within_the_documented_bound(backend: Backend) {
    let sync = ["--usage-sync-interval-ms", "100"];
    let Some(a) = spawn_app_with(backend, &sync).await else { return };
    let b = spawn_replica(&a, &sync).await;
    put_tenant(&a, "acme").await;
    let mut request = key_request("acme", &["events:read"]);
    request.rate_limit_per_minute = 30;
    let (_, secret) = create_key(&a, request).await.unwrap();
    // 80 requests, alternating replicas, one every 10 ms: each replica gets 5 per sync interval.
    let mut allowed = 0;
    for index in 0..80 {
        let replica = if index % 2 == 0 { &a } else { &b };
        if check(replica, &secret, "events:read", "").await.allowed {
            allowed += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("{backend:?}: two replicas admitted {allowed} requests under a limit of 30");
    // Never fewer than the limit; at most what the other replica admits before the counts of
    // the last sync interval are shared (5 a sync interval here, counted twice for the sync
    // that is under way).
    assert!((30..=40).contains(&allowed), "{allowed} admitted");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for replica in [&a, &b] {
        assert_eq!(check(replica, &secret, "events:read", "").await.reason(), DenyReason::RateLimited);
    }
}
