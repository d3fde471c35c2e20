//! Last use, daily usage and the audit log: recorded without a write per Check.

use std::time::{Duration, Instant};

use keygate::proto::*;
use tonic::Code;

use crate::support::*;

crate::trials!(
    every_backend: [
        last_used_at_is_written_in_batches_and_shown_by_get_and_list_keys,
        key_usage_counts_checks_per_day_by_outcome,
        the_audit_log_records_every_change_with_its_actor_and_aggregates_denials,
        buffered_usage_is_written_when_a_server_stops,
    ],
    once: [],
);

const FLUSH_OFTEN: [&str; 2] = ["--usage-flush-interval-ms", "50"];

/// Retries `probe` until it returns `Some`, for up to five seconds.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(mut probe: impl FnMut() -> F) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "not written within five seconds");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn today(app: &TestApp) -> chrono::NaiveDate {
    use keygate::domain::clock::Clock;
    app.clock.now().date_naive()
}

fn usage_request(key_id: &str, start: chrono::NaiveDate, end: chrono::NaiveDate) -> GetKeyUsageRequest {
    GetKeyUsageRequest {
        tenant_id: "acme".into(),
        key_id: key_id.into(),
        start_date: start.format("%Y-%m-%d").to_string(),
        end_date: end.format("%Y-%m-%d").to_string(),
    }
}

async fn last_used_at_is_written_in_batches_and_shown_by_get_and_list_keys(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &FLUSH_OFTEN).await else { return };
    put_tenant(&app, "acme").await;
    let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    assert_eq!(key.last_used_at, None);
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    let used = eventually(|| async { get_key(&app, "acme", &key.key_id).await.last_used_at }).await;
    use keygate::domain::clock::Clock;
    assert_eq!(used.seconds, app.clock.now().timestamp());
    let listed = app.admin.clone().list_keys(ListKeysRequest { tenant_id: "acme".into(), ..Default::default() }).await;
    assert_eq!(listed.unwrap().into_inner().keys[0].last_used_at, Some(used));
    // A denied Check is not a use.
    app.clock.advance(chrono::Duration::minutes(5));
    check(&app, &secret, "goals:read", "").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get_key(&app, "acme", &key.key_id).await.last_used_at, Some(used));
}

async fn key_usage_counts_checks_per_day_by_outcome(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &FLUSH_OFTEN).await else { return };
    put_tenant(&app, "acme").await;
    put_tenant(&app, "globex").await;
    let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    let first_day = today(&app);
    for _ in 0..3 {
        assert!(check(&app, &secret, "events:read", "").await.allowed);
    }
    for _ in 0..2 {
        check(&app, &secret, "goals:read", "").await;
    }
    check(&app, &secret, "events:read", "no-such-site").await;
    app.clock.advance(chrono::Duration::days(1));
    assert!(check(&app, &secret, "events:read", "").await.allowed);
    let second_day = today(&app);
    let third_day = second_day.succ_opt().unwrap();

    let days = eventually(|| async {
        let response = app.admin.clone().get_key_usage(usage_request(&key.key_id, first_day, third_day)).await.unwrap();
        let days = response.into_inner().days;
        (days[0].allowed == 3 && days[0].denied == 3 && days[1].allowed == 1).then_some(days)
    })
    .await;
    let dates: Vec<_> = days.iter().map(|day| day.date.clone()).collect();
    assert_eq!(dates, [first_day, second_day, third_day].map(|date| date.format("%Y-%m-%d").to_string()));
    assert_eq!(days[0].denied_by_reason.get("DENY_REASON_SCOPE_MISSING"), Some(&2));
    assert_eq!(days[0].denied_by_reason.get("DENY_REASON_SITE_FORBIDDEN"), Some(&1));
    assert_eq!((days[1].denied, days[2].allowed, days[2].denied), (0, 0, 0));

    let mut admin = app.admin.clone();
    let mut foreign = usage_request(&key.key_id, first_day, first_day);
    foreign.tenant_id = "globex".into();
    assert_status(admin.get_key_usage(foreign).await, Code::NotFound, None);
    let mut bad = usage_request(&key.key_id, first_day, first_day);
    bad.start_date = "2026-13-01".into();
    assert_status(admin.get_key_usage(bad).await, Code::InvalidArgument, Some("start_date"));
    let backwards = usage_request(&key.key_id, second_day, first_day);
    assert_status(admin.get_key_usage(backwards).await, Code::InvalidArgument, Some("end_date"));
    // At most 366 days after the start, as documented: 367 days in all.
    let longest = usage_request(&key.key_id, first_day, first_day + chrono::Duration::days(366));
    assert_eq!(admin.get_key_usage(longest).await.unwrap().into_inner().days.len(), 367);
    let too_long = usage_request(&key.key_id, first_day, first_day + chrono::Duration::days(367));
    assert_status(admin.get_key_usage(too_long).await, Code::InvalidArgument, Some("end_date"));
}

async fn list_events(app: &TestApp, request: ListAuditEventsRequest) -> (Vec<AuditEvent>, String) {
    let response = app.admin.clone().list_audit_events(request).await.unwrap().into_inner();
    (response.events, response.next_page_token)
}

async fn the_audit_log_records_every_change_with_its_actor_and_aggregates_denials(backend: Backend) {
    let Some(app) = spawn_app_with(backend, &FLUSH_OFTEN).await else { return };
    // Start just after a minute boundary, so that every event below falls into one minute.
    {
        use chrono::DurationRound;
        use keygate::domain::clock::Clock;
        let now = app.clock.now();
        let next_minute = now.duration_trunc(chrono::Duration::minutes(1)).unwrap() + chrono::Duration::minutes(1);
        app.clock.advance(next_minute + chrono::Duration::seconds(1) - now);
    }
    let step = || app.clock.advance(chrono::Duration::seconds(1));
    put_tenant(&app, "globex").await;
    step();
    let plan = PutTenantRequest { tenant_id: "acme".into(), max_keys: Some(20), ..Default::default() };
    put_tenant_with(&app, plan).await;
    step();
    put_site(&app, "acme", "site-a").await.unwrap();
    step();
    let (key, secret) = create_key(&app, key_request("acme", &["events:read"])).await.unwrap();
    step();
    let update = UpdateKeyRequest {
        tenant_id: "acme".into(),
        key_id: key.key_id.clone(),
        name: "renamed".into(),
        update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
        ..Default::default()
    };
    app.admin.clone().update_key(update).await.unwrap();
    step();
    for _ in 0..5 {
        check(&app, &secret, "goals:read", "").await;
    }
    check(&app, &secret, "events:read", "site-b").await;
    step();
    let rotation = RotateKeyRequest { tenant_id: "acme".into(), key_id: key.key_id.clone(), grace_period: None };
    let rotated = app.admin.clone().rotate_key(rotation).await.unwrap().into_inner().key.unwrap();
    step();
    crate::keys::revoke(&app, "acme", &rotated.key_id).await.unwrap();
    step();
    app.admin
        .clone()
        .delete_site(DeleteSiteRequest { tenant_id: "acme".into(), site_id: "site-a".into() })
        .await
        .unwrap();

    let all = ListAuditEventsRequest { tenant_id: "acme".into(), ..Default::default() };
    let (events, _) = eventually(|| async {
        let listed = list_events(&app, all.clone()).await;
        (listed.0.iter().filter(|event| event.event_type() == AuditEventType::CheckDenied).count() == 2)
            .then_some(listed)
    })
    .await;
    let types: Vec<_> = events.iter().map(|event| event.event_type()).collect();
    use AuditEventType::*;
    assert_eq!(
        types,
        [TenantPut, SitePut, KeyCreated, KeyUpdated, CheckDenied, CheckDenied, KeyRotated, KeyRevoked, SiteDeleted],
        "oldest first: denials carry the time of the first denial they count"
    );
    for event in &events {
        let hex = event.event_id.strip_prefix("evt_").unwrap_or_default();
        assert!(hex.len() == 24 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "one id format: {}", event.event_id);
    }
    for event in events.iter().filter(|event| event.event_type() != CheckDenied) {
        assert_eq!((event.actor.as_str(), event.count), ("tests", 1), "{event:?}");
    }
    let denied: Vec<_> = events.iter().filter(|event| event.event_type() == CheckDenied).collect();
    let mut counts: Vec<_> = denied.iter().map(|event| (event.details["reason"].as_str(), event.count)).collect();
    counts.sort();
    assert_eq!(counts, [("SCOPE_MISSING", 5), ("SITE_FORBIDDEN", 1)]);
    assert!(denied.iter().all(|event| event.key_id == key.key_id && event.actor.is_empty()));
    assert_eq!(events[0].details.get("max_keys").map(String::as_str), Some("20"));
    assert_eq!(events[3].details.get("fields").map(String::as_str), Some("name"));
    assert_eq!(events[6].details.get("new_key_id"), Some(&rotated.key_id));
    assert!(!format!("{events:?}").contains(&secret[8..]), "no secret in the audit log");

    // Filters and pages.
    let of_key = ListAuditEventsRequest { key_id: key.key_id.clone(), ..all.clone() };
    assert_eq!(list_events(&app, of_key).await.0.len(), 5, "two denials, created, updated, rotated");
    let revocations = ListAuditEventsRequest { event_types: vec![KeyRevoked as i32], ..all.clone() };
    assert_eq!(list_events(&app, revocations).await.0.len(), 1);
    let since = events[7].occurred_at;
    let recent = ListAuditEventsRequest { start_time: since, ..all.clone() };
    assert_eq!(list_events(&app, recent).await.0.len(), 2);
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = ListAuditEventsRequest { page_size: 2, page_token: token, ..all.clone() };
        let (events, next) = list_events(&app, page).await;
        paged.extend(events);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(paged, events);
    // Tenants see only their own log.
    let globex = ListAuditEventsRequest { tenant_id: "globex".into(), ..Default::default() };
    assert!(list_events(&app, globex).await.0.iter().all(|event| event.tenant_id == "globex"));
    let unknown = ListAuditEventsRequest { tenant_id: "nobody".into(), ..Default::default() };
    assert_status(app.admin.clone().list_audit_events(unknown).await, Code::NotFound, None);
    let bad_type = ListAuditEventsRequest { event_types: vec![99], ..all };
    assert_status(app.admin.clone().list_audit_events(bad_type).await, Code::InvalidArgument, Some("event_types[0]"));
}

async fn buffered_usage_is_written_when_a_server_stops(backend: Backend) {
    let Some(owner) = spawn_app(backend).await else { return };
    let stopping = spawn_replica(&owner, &["--usage-flush-interval-ms", "600000"]).await;
    put_tenant(&owner, "acme").await;
    let (key, secret) = create_key(&owner, key_request("acme", &["events:read"])).await.unwrap();
    for _ in 0..4 {
        assert!(check(&stopping, &secret, "events:read", "").await.allowed);
    }
    let day = today(&owner);
    stopping.stop().await;
    let response = owner.admin.clone().get_key_usage(usage_request(&key.key_id, day, day)).await.unwrap();
    assert_eq!(response.into_inner().days[0].allowed, 4);
    assert!(get_key(&owner, "acme", &key.key_id).await.last_used_at.is_some());
}
