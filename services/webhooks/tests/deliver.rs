//! The dispatcher against a real Postgres database and a real HTTP receiver on loopback.

use std::time::Duration;

use sidbooth_core::{
    events,
    jobs::Created,
    tenants,
    testing::TestDb,
    webhooks::{event_types, DeliveryStatus, NewEndpoint, WebhookStore},
    JobStore,
};
use sidbooth_webhooks::{sign, testing::Receiver, Dispatcher, WebhookSettings};
use uuid::Uuid;

async fn receiver(fail_first: usize) -> (Receiver, String) {
    let r = Receiver::start(fail_first).await;
    let url = r.url.clone();
    (r, url)
}

fn settings() -> WebhookSettings {
    WebhookSettings {
        allow_private_targets: true,
        webhook_retry_base_secs: 0.05,
        webhook_retry_max_secs: 0.2,
        webhook_timeout_secs: 5.0,
        ..WebhookSettings::default()
    }
}

async fn new_job(db: &TestDb, tenant: Uuid) -> Uuid {
    let job = sidbooth_core::testing::new_job(tenant, &["dog-0.jpg", "dog-1.jpg"]);
    match JobStore::new(db.pool.clone()).create(job).await.unwrap() {
        Created::New(j) => j.id,
        Created::Existing(_) => panic!("a new job"),
    }
}

async fn endpoint(db: &TestDb, tenant: Uuid, url: &str) -> (Uuid, String) {
    let secret = sign::new_secret();
    let created = WebhookStore::new(db.pool.clone())
        .create(
            tenant,
            &NewEndpoint {
                url: url.to_owned(),
                events: event_types(),
                secret: secret.clone(),
            },
            20,
        )
        .await
        .unwrap();
    (created.id, secret)
}

/// Runs dispatch rounds until `done` holds or 10 s pass.
async fn dispatch_until(dispatcher: &Dispatcher, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        dispatcher.dispatch_due().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_status_change_is_delivered_signed_with_the_job() {
    let db = TestDb::new().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let (receiver, url) = receiver(0).await;
    let (_, secret) = endpoint(&db, tenant, &url).await;
    let job = new_job(&db, tenant).await;

    let dispatcher = Dispatcher::new(db.pool.clone(), settings()).unwrap();
    dispatch_until(&dispatcher, || !receiver.received().is_empty()).await;
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    let msg = &got[0];
    assert!(msg.id.starts_with("msg_"), "{}", msg.id);
    assert!((chrono::Utc::now().timestamp() - msg.timestamp).abs() < 60);
    assert!(msg.verifies(&secret));
    let body = msg.json();
    assert_eq!(body["type"], "job.queued");
    assert_eq!(body["data"]["id"], job.to_string());
    assert_eq!(body["data"]["status"], "queued");
    assert_eq!(
        body["data"]["images"],
        serde_json::json!(["dog-0.jpg", "dog-1.jpg"])
    );
    assert_eq!(body["data"]["links"]["self"], format!("/v1/jobs/{job}"));
    assert!(body["timestamp"].as_str().unwrap().contains('T'));
}

#[tokio::test]
async fn failures_are_retried_under_the_same_id_and_logged() {
    let db = TestDb::new().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let (receiver, url) = receiver(2).await;
    let (endpoint_id, secret) = endpoint(&db, tenant, &url).await;
    new_job(&db, tenant).await;

    let dispatcher = Dispatcher::new(db.pool.clone(), settings()).unwrap();
    dispatch_until(&dispatcher, || receiver.received().len() >= 3).await;
    let got = receiver.received();
    assert_eq!(got.len(), 3, "two failures and a success, nothing more");
    assert!(
        got.iter().all(|m| m.id == got[0].id),
        "one webhook-id for every try"
    );
    assert!(got.iter().all(|m| m.verifies(&secret)));

    let deliveries = WebhookStore::new(db.pool.clone())
        .deliveries(tenant, endpoint_id, 10)
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    let d = &deliveries[0];
    assert_eq!(d.status, DeliveryStatus::Delivered);
    assert_eq!(d.message_id, got[0].id);
    assert_eq!(d.attempts, 3);
    let statuses: Vec<_> = d.tries.iter().map(|t| t.response_status).collect();
    assert_eq!(statuses, [Some(500), Some(500), Some(204)]);
    assert!(d.tries[0].error.as_deref().unwrap().contains("500"));
    assert!(d.next_attempt_at.is_none());

    // Another round sends nothing more.
    assert_eq!(dispatcher.dispatch_due().await.unwrap(), 0);
}

#[tokio::test]
async fn a_message_past_its_retry_window_is_given_up() {
    let db = TestDb::new().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let (receiver, url) = receiver(usize::MAX).await;
    let (endpoint_id, _) = endpoint(&db, tenant, &url).await;
    new_job(&db, tenant).await;

    let dispatcher = Dispatcher::new(
        db.pool.clone(),
        WebhookSettings {
            webhook_retry_window_secs: 0.0,
            ..settings()
        },
    )
    .unwrap();
    assert_eq!(dispatcher.dispatch_due().await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dispatcher.dispatch_due().await.unwrap(), 0);
    assert_eq!(receiver.received().len(), 1);
    let deliveries = WebhookStore::new(db.pool.clone())
        .deliveries(tenant, endpoint_id, 10)
        .await
        .unwrap();
    assert_eq!(deliveries[0].status, DeliveryStatus::Failed);
    assert!(deliveries[0].finished_at.is_some());
}

#[tokio::test]
async fn a_change_that_rolls_back_sends_nothing() {
    let db = TestDb::new().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let job = new_job(&db, tenant).await;
    let (_, url) = receiver(0).await;
    endpoint(&db, tenant, &url).await;
    let record = JobStore::new(db.pool.clone())
        .get(tenant, job)
        .await
        .unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let _unsent = events::record_status(&mut *tx, &record).await.unwrap();
    let inside: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, 1, "the transaction sees its own message");
    tx.rollback().await.unwrap();
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, 0);
}

#[tokio::test]
async fn only_subscribed_events_of_the_own_tenant_are_enqueued() {
    let db = TestDb::new().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let other = tenants::create_key(&db.pool, "u").await.unwrap().tenant_id;
    let store = WebhookStore::new(db.pool.clone());
    store
        .create(
            tenant,
            &NewEndpoint {
                url: "http://127.0.0.1:9/only-failures".into(),
                events: vec!["job.failed".into()],
                secret: sign::new_secret(),
            },
            20,
        )
        .await
        .unwrap();
    let (other_endpoint, _) = endpoint(&db, other, "http://127.0.0.1:9/other").await;
    new_job(&db, tenant).await;
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(messages, 0, "job.queued matches no endpoint of the tenant");
    assert!(store
        .deliveries(other, other_endpoint, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn private_targets_are_refused_at_delivery_unless_allowed() {
    let db = TestDb::new().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let (receiver, url) = receiver(0).await;
    let by_name = url.replace("127.0.0.1", "localhost");
    let (literal, _) = endpoint(&db, tenant, &url).await;
    let (named, _) = endpoint(&db, tenant, &by_name).await;
    new_job(&db, tenant).await;

    let strict = Dispatcher::new(
        db.pool.clone(),
        WebhookSettings {
            allow_private_targets: false,
            ..settings()
        },
    )
    .unwrap();
    assert_eq!(strict.dispatch_due().await.unwrap(), 2);
    assert!(receiver.received().is_empty(), "nothing reached loopback");
    let store = WebhookStore::new(db.pool.clone());
    for endpoint in [literal, named] {
        let d = &store.deliveries(tenant, endpoint, 1).await.unwrap()[0];
        assert_eq!(d.status, DeliveryStatus::Pending);
        let error = d.tries[0].error.clone().unwrap_or_default();
        assert!(error.contains("public addresses"), "{error}");
        assert_eq!(d.tries[0].response_status, None);
    }
}
