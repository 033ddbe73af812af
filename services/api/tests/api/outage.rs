//! Outages: while Postgres is down or storage is unreachable, the API answers 503 `unavailable`
//! with `Retry-After` (never 500), stores nothing half, and recovers by itself.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sidbooth_api::{ApiConfig, AppState};
use sidbooth_core::{
    testing::{PgCluster, TcpProxy, TestStorage},
    ArtifactStore, DatabaseArgs, StorageArgs,
};
use tokio::sync::oneshot;

use crate::support::{assert_problem, dog_photos, dog_spec, form};

/// An API on its own pool and storage client, served until the sender is dropped.
async fn serve(state: AppState) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sidbooth_api::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    (base, stop)
}

async fn assert_unavailable(response: reqwest::Response, what: &str) {
    let retry_after = response.headers().get("retry-after").cloned();
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert!(retry_after.is_some(), "{what}: Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_postgres_is_a_503_and_the_api_recovers() {
    let cluster = PgCluster::start();
    let pool = sidbooth_core::db::connect(&DatabaseArgs::new(cluster.url(), 4))
        .await
        .unwrap();
    sidbooth_core::db::migrate(&pool).await.unwrap();
    let storage = TestStorage::start().await;
    let key = sidbooth_core::tenants::create_key(&pool, "t")
        .await
        .unwrap();
    // Every request asks the database about its key.
    let config = ApiConfig {
        auth_cache_secs: 0,
        ..ApiConfig::default()
    };
    let state = AppState::new(pool.clone(), storage.store.clone(), config);
    let (base, _stop) = serve(state).await;
    let client = reqwest::Client::new();
    let job: serde_json::Value = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key.secret)
        .multipart(form(dog_spec().to_string(), dog_photos(1)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_url = format!("{base}/v1/jobs/{}", job["id"].as_str().unwrap());

    cluster.stop();
    let started = Instant::now();
    let get = client
        .get(&job_url)
        .bearer_auth(&key.secret)
        .send()
        .await
        .unwrap();
    assert_unavailable(get, "GET a job").await;
    let post = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key.secret)
        .multipart(form(dog_spec().to_string(), dog_photos(1)))
        .send()
        .await
        .unwrap();
    assert_unavailable(post, "POST a job").await;
    let list = client
        .get(format!("{base}/v1/jobs"))
        .bearer_auth(&key.secret)
        .send()
        .await
        .unwrap();
    assert_unavailable(list, "list jobs").await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered within the acquire timeouts: {:?}",
        started.elapsed()
    );

    cluster.start_again();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = client
            .get(&job_url)
            .bearer_auth(&key.secret)
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::OK {
            break;
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "the API did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jobs, 1, "the refused POST stored nothing");
}

#[tokio::test]
async fn unreachable_storage_is_a_503_and_nothing_half_stored() {
    let db = sidbooth_core::testing::TestDb::new().await;
    let storage = TestStorage::start().await;
    let proxy = TcpProxy::start(storage.server.addr()).await;
    let args = StorageArgs {
        s3_endpoint: Some(proxy.http_url()),
        ..storage.args.clone()
    };
    let store = ArtifactStore::with_static_credentials(
        &args,
        TestStorage::ACCESS_KEY,
        TestStorage::SECRET_KEY,
    );
    let key = sidbooth_core::tenants::create_key(&db.pool, "t")
        .await
        .unwrap();
    let state = AppState::new(db.pool.clone(), store, ApiConfig::default());
    let (base, _stop) = serve(state).await;
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&key.secret)
            .multipart(form(dog_spec().to_string(), dog_photos(2)))
            .send()
    };

    proxy.cut();
    assert_unavailable(post().await.unwrap(), "POST a job").await;
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    proxy.restore();
    assert_eq!(post().await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(storage.all_keys().await.len(), 2, "the two photos, once");
}
