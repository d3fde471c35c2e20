//! Rate limits (per key, per minute, sliding; per tenant, shared by its keys, over a sliding
//! second, minute, hour or day) and daily quotas (per tenant), shared by replicas.

use std::time::Duration;

use keygate::proto::*;
use sqlx::Connection;

use crate::support::*;

crate::trials!(
    every_backend: [
        a_key_over_its_per_minute_limit_is_rate_limited_until_the_window_slides,
        a_tenant_over_its_daily_quota_is_denied_until_the_next_day,
        two_replicas_share_a_limit_within_the_documented_bound,
        limits_hold_across_a_restart,
        a_replica_that_starts_later_knows_the_shared_counts,
        a_rolling_restart_of_two_replicas_keeps_the_limit,
        check_names_the_window_and_subject_of_the_limit_it_reports,
        a_client_within_its_limit_is_never_denied_and_a_retry_on_time_is_admitted,
        a_tenants_shared_limit_counts_all_its_keys_in_each_window,
        a_tenant_with_unlimited_keys_is_never_refused_a_key,
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
    // The window slides: the five requests count for 60 seconds from the second they were made
    // in, not until a minute boundary. Half a minute later they all still count...
    use keygate::domain::clock::Clock;
    let made_at = app.clock.now().timestamp();
    app.clock.advance(chrono::Duration::seconds(30));
    let denied = check(&app, &own, "events:read", "").await;
    assert_eq!(denied.reason(), DenyReason::RateLimited);
    assert_eq!(denied.rate_limit.unwrap().reset_at.unwrap().seconds, made_at + 60, "they slide out 60 s on");
    // ... and from that second on, the whole limit is there again.
    let left = chrono::DateTime::from_timestamp(made_at + 60, 0).unwrap() - app.clock.now();
    app.clock.advance(left);
    for _ in 0..5 {
        assert!(check(&app, &own, "events:read", "").await.allowed);
    }
    assert_eq!(check(&app, &own, "events:read", "").await.reason(), DenyReason::RateLimited);
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

const SYNC_OFTEN: [&str; 2] = ["--usage-sync-interval-ms", "50"];

/// A tenant with a daily quota of `quota` and a key of it limited to `per_minute`; returns the
/// key's secret.
async fn limited_key(app: &TestApp, tenant: &str, per_minute: u32, quota: u32) -> String {
    let request = PutTenantRequest { tenant_id: tenant.into(), daily_request_quota: Some(quota), ..Default::default() };
    put_tenant_with(app, request).await;
    let mut request = key_request(tenant, &["events:read"]);
    request.rate_limit_per_minute = per_minute;
    create_key(app, request).await.unwrap().1
}

/// How many of `count` Checks of `secret` on `app` are allowed.
async fn allowed_of(app: &TestApp, secret: &str, count: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..count {
        allowed += usize::from(check(app, secret, "events:read", "").await.allowed);
    }
    allowed
}

/// Waits until the shared counters of the database hold `total` requests of `subject_prefix`.
async fn shared_total_reaches(app: &TestApp, subject_prefix: &str, total: i64) {
    let started = std::time::Instant::now();
    loop {
        let mut connection = sqlx::AnyConnection::connect(&app.database_url).await.unwrap();
        let sql =
            sqlx::AssertSqlSafe(format!("SELECT count FROM request_counts WHERE subject LIKE '{subject_prefix}%'"));
        let counts: i64 = sqlx::query_scalar::<_, i64>(sql).fetch_all(&mut connection).await.unwrap().iter().sum();
        let _ = connection.close().await;
        if counts >= total {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the database holds {counts} of {total} requests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn limits_hold_across_a_restart(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &SYNC_OFTEN).await else { return };
    let per_minute = limited_key(&app, "acme", 5, 0).await;
    let per_day = limited_key(&app, "globex", 0, 5).await;
    assert_eq!(allowed_of(&app, &per_minute, 5).await, 5);
    assert_eq!(allowed_of(&app, &per_day, 5).await, 5);
    let app = app.restart().await;
    // Same minute, same day: not one more.
    let response = check(&app, &per_minute, "events:read", "").await;
    assert_eq!(response.reason(), DenyReason::RateLimited, "{response:?}");
    let response = check(&app, &per_day, "events:read", "").await;
    assert_eq!(response.reason(), DenyReason::QuotaExceeded, "{response:?}");
}

async fn a_replica_that_starts_later_knows_the_shared_counts(backend: Backend) {
    let Some(first) = spawn_app_with(backend, &SYNC_OFTEN).await else { return };
    let per_minute = limited_key(&first, "acme", 5, 0).await;
    let per_day = limited_key(&first, "globex", 0, 5).await;
    assert_eq!(allowed_of(&first, &per_minute, 5).await, 5);
    assert_eq!(allowed_of(&first, &per_day, 5).await, 5);
    shared_total_reaches(&first, "key:", 5).await;
    shared_total_reaches(&first, "tenant:", 5).await;
    let second = spawn_replica(&first, &SYNC_OFTEN).await;
    assert_eq!(allowed_of(&second, &per_minute, 3).await, 0, "the new replica's first Checks are denied");
    assert_eq!(allowed_of(&second, &per_day, 3).await, 0);
}

async fn a_rolling_restart_of_two_replicas_keeps_the_limit(backend: Backend) {
    let Some(a) = spawn_app_with(backend, &SYNC_OFTEN).await else { return };
    let b = spawn_replica(&a, &SYNC_OFTEN).await;
    let secret = limited_key(&a, "acme", 6, 0).await;
    let mut allowed = allowed_of(&a, &secret, 3).await + allowed_of(&b, &secret, 3).await;
    assert_eq!(allowed, 6);
    shared_total_reaches(&a, "key:", 6).await;
    let a = a.restart().await;
    allowed += allowed_of(&a, &secret, 5).await + allowed_of(&b, &secret, 5).await;
    let b = b.restart().await;
    allowed += allowed_of(&a, &secret, 5).await + allowed_of(&b, &secret, 5).await;
    assert_eq!(allowed, 6, "a rolling restart admitted {} more than the limit", allowed - 6);
}

async fn check_names_the_window_and_subject_of_the_limit_it_reports(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let secret = limited_key(&app, "acme", 10, 3).await;
    let reported = |response: &CheckResponse| {
        let limit = response.rate_limit.expect("a limit applies");
        (limit.limit, limit.remaining, limit.window(), limit.subject())
    };
    // On an allow, the tighter of the two: the tenant's 3 a day before the key's 10 a minute.
    let response = check(&app, &secret, "events:read", "").await;
    assert_eq!(reported(&response), (3, 2, RateLimitWindow::Day, RateLimitSubject::Tenant));
    let per_minute = limited_key(&app, "globex", 2, 100).await;
    let response = check(&app, &per_minute, "events:read", "").await;
    assert_eq!(reported(&response), (2, 1, RateLimitWindow::Minute, RateLimitSubject::Key));
    check(&app, &per_minute, "events:read", "").await;
    // On a deny, the limit that denied.
    let response = check(&app, &per_minute, "events:read", "").await;
    assert_eq!(response.reason(), DenyReason::RateLimited);
    assert_eq!(reported(&response), (2, 0, RateLimitWindow::Minute, RateLimitSubject::Key));
}

async fn a_client_within_its_limit_is_never_denied_and_a_retry_on_time_is_admitted(backend: Backend) {
    use keygate::domain::clock::Clock;
    let Some(app) = spawn_app(backend).await else { return };
    // Start on a minute boundary, as the reports that found the fault did.
    let now = app.clock.now();
    let to_boundary = 60 - now.timestamp().rem_euclid(60);
    app.clock.advance(
        chrono::Duration::seconds(to_boundary) - chrono::Duration::nanoseconds(now.timestamp_subsec_nanos().into()),
    );
    for (index, limit) in [1u32, 2, 5, 1000].into_iter().enumerate() {
        let secret = limited_key(&app, &format!("tenant-{index}"), limit, 0).await;
        let mut allowed_per_minute = vec![0u32; 3];
        if limit <= 5 {
            // A client asking once a second gets exactly its limit each minute.
            for second in 0..180 {
                if check(&app, &secret, "events:read", "").await.allowed {
                    allowed_per_minute[second / 60] += 1;
                }
                app.clock.advance(chrono::Duration::seconds(1));
            }
            assert_eq!(allowed_per_minute, vec![limit; 3], "limit {limit}, one request a second");
        } else {
            // A full burst, then another a minute later: both whole.
            for minute in 0..2 {
                assert_eq!(allowed_of(&app, &secret, limit as usize).await, limit as usize, "minute {minute}");
                app.clock.advance(chrono::Duration::seconds(60));
            }
        }
        // Denied, then admitted at exactly the time the deny names.
        while check(&app, &secret, "events:read", "").await.allowed {}
        let denied = check(&app, &secret, "events:read", "").await;
        assert_eq!(denied.reason(), DenyReason::RateLimited);
        let reset_at = denied.rate_limit.unwrap().reset_at.unwrap();
        let reset_at = chrono::DateTime::from_timestamp(reset_at.seconds, reset_at.nanos as u32).unwrap();
        app.clock.advance(reset_at - app.clock.now() - chrono::Duration::microseconds(1));
        assert!(!check(&app, &secret, "events:read", "").await.allowed, "limit {limit}: a microsecond early");
        app.clock.advance(chrono::Duration::microseconds(1));
        assert!(check(&app, &secret, "events:read", "").await.allowed, "limit {limit}: on time at {reset_at}");
        // Next key starts well clear of this one's window.
        app.clock.advance(chrono::Duration::seconds(120));
    }
    // Limit 1, a request 61 s after the last one.
    let secret = limited_key(&app, "tenant-61", 1, 0).await;
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    app.clock.advance(chrono::Duration::seconds(61));
    assert!(check(&app, &secret, "events:read", "").await.allowed, "61 s later");
}

async fn a_tenants_shared_limit_counts_all_its_keys_in_each_window(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &SYNC_OFTEN).await else { return };
    for (window, seconds) in [
        (RateLimitWindow::Second, 1),
        (RateLimitWindow::Minute, 60),
        (RateLimitWindow::Hour, 3_600),
        (RateLimitWindow::Day, 86_400),
    ] {
        let tenant = format!("t{seconds}");
        let request = PutTenantRequest {
            tenant_id: tenant.clone(),
            shared_rate_limit: Some(3),
            shared_rate_limit_window: window.into(),
            ..Default::default()
        };
        put_tenant_with(&app, request).await;
        // Two keys, one of them with a looser limit of its own: the tenant's 3 bind both.
        let mut loose = key_request(&tenant, &["events:read"]);
        loose.rate_limit_per_minute = 100;
        let first = create_key(&app, loose).await.unwrap().1;
        let second = create_key(&app, key_request(&tenant, &["events:read"])).await.unwrap().1;
        let response = check(&app, &first, "events:read", "").await;
        let limit = response.rate_limit.expect("a limit applies");
        assert_eq!(
            (limit.limit, limit.remaining, limit.window(), limit.subject()),
            (3, 2, window, RateLimitSubject::Tenant),
            "{window:?}: the tightest limit is reported"
        );
        assert_eq!(allowed_of(&app, &second, 1).await + allowed_of(&app, &first, 1).await, 2, "{window:?}");
        let denied = check(&app, &second, "events:read", "").await;
        assert_eq!(denied.reason(), DenyReason::RateLimited, "{window:?}");
        let limit = denied.rate_limit.expect("the limit that denied");
        assert_eq!((limit.window(), limit.subject(), limit.remaining), (window, RateLimitSubject::Tenant, 0));
        // Admitted again once the window has slid past, at the time the deny announced.
        let reset = limit.reset_at.unwrap();
        let now = keygate::domain::clock::Clock::now(&*app.clock);
        let wait = chrono::DateTime::from_timestamp(reset.seconds, reset.nanos as u32).unwrap() - now;
        assert!(wait <= chrono::Duration::seconds(seconds) && wait > chrono::Duration::zero(), "{window:?}: {wait}");
        app.clock.advance(wait);
        assert!(check(&app, &first, "events:read", "").await.allowed, "{window:?}: admitted at the announced time");
    }
}

async fn a_tenant_with_unlimited_keys_is_never_refused_a_key(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let unlimited = PutTenantRequest {
        tenant_id: "enterprise".into(),
        max_keys: Some(1),
        unlimited_keys: Some(true),
        ..Default::default()
    };
    let tenant = put_tenant_with(&app, unlimited).await;
    assert_eq!((tenant.unlimited_keys, tenant.effective_max_keys), (true, u32::MAX));
    for _ in 0..12 {
        create_key(&app, key_request("enterprise", &["events:read"])).await.unwrap();
    }
    let mut rotate = RotateKeyRequest { tenant_id: "enterprise".into(), ..Default::default() };
    let mut admin = app.admin.clone();
    let keys = admin.list_keys(ListKeysRequest { tenant_id: "enterprise".into(), ..Default::default() }).await;
    rotate.key_id = keys.unwrap().into_inner().keys[0].key_id.clone();
    rotate.grace_period = Some(prost_types::Duration { seconds: 3_600, nanos: 0 });
    app.admin.clone().rotate_key(rotate).await.expect("a rotation with grace needs no room");
    // Back to a limit: the 13 working keys stay, no new one until under 1.
    let limited =
        PutTenantRequest { tenant_id: "enterprise".into(), unlimited_keys: Some(false), ..Default::default() };
    let tenant = put_tenant_with(&app, limited).await;
    assert_eq!((tenant.unlimited_keys, tenant.effective_max_keys), (false, 1));
    let refused = create_key(&app, key_request("enterprise", &["events:read"])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
}
