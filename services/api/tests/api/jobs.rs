//! Listing, review (descriptions, approve), cancel, delete and artifacts.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sidbooth_core::{keys, NewArtifact};
use uuid::Uuid;

use crate::support::{assert_problem, TestApp};

#[tokio::test]
async fn list_is_newest_first_with_cursor_and_status_filter() {
    let app = TestApp::start().await;
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(app.create_job(1).await["id"].as_str().unwrap().to_owned());
    }
    let first: Value = app
        .get("/v1/jobs?limit=2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(created[2]), json!(created[1])]);
    assert_eq!(first["jobs"][0]["images"], json!(["00.jpg"]));
    let cursor = first["next_cursor"].as_str().expect("a next page");

    let second: Value = app
        .get(&format!("/v1/jobs?limit=2&cursor={cursor}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(second["jobs"][0]["id"], json!(created[0]));
    assert_eq!(second["next_cursor"], Value::Null);

    let response = app
        .request(Method::POST, &format!("/v1/jobs/{}/cancel", created[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let canceled: Value = app
        .get("/v1/jobs?status=canceled")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(canceled["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(canceled["jobs"][0]["id"], json!(created[1]));
    let queued: Value = app
        .get("/v1/jobs?status=queued")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 2);

    for bad in [
        "limit=0",
        "limit=101",
        "limit=x",
        "cursor=nope",
        "status=done",
        // Query strings that do not parse at all are problems too, not plain text.
        "limit=1&limit=2",
        "status=%ZZ",
    ] {
        let response = app.get(&format!("/v1/jobs?{bad}")).send().await.unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    }
}

#[tokio::test]
async fn descriptions_are_edited_only_in_review_and_validated() {
    let app = TestApp::start().await;
    let job = app.create_job(2).await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let path = format!("/v1/jobs/{id}/descriptions");
    let edit = |index: u32, text: &str| json!({"descriptions": [{"index": index, "text": text}]});

    // Queued: nothing to edit yet.
    let response = app
        .request(Method::PUT, &path)
        .json(&edit(0, "a photo of sks dog on a lawn."))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "conflict").await;
    let response = app
        .request(Method::POST, &format!("/v1/jobs/{id}/approve"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "conflict").await;

    app.to_awaiting_review(
        id,
        &[
            "a photo of sks dog sitting on a wooden bench in a park.",
            "a photo of sks dog lying on a blue rug beside a lamp.",
        ],
    )
    .await;
    let listed: Value = app.get(&path).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["status"], "awaiting_review");
    assert_eq!(listed["descriptions"].as_array().unwrap().len(), 2);
    assert_eq!(listed["descriptions"][1]["file_name"], "01.jpg");
    assert_eq!(listed["descriptions"][1]["edited"], false);

    let response = app
        .request(Method::PUT, &path)
        .json(&edit(1, "a dog on a rug."))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-description",
    )
    .await;
    assert_eq!(problem["errors"][0]["code"], "missing_prefix");
    assert_eq!(problem["errors"][0]["pointer"], "/descriptions/0/text");

    let response = app
        .request(Method::PUT, &path)
        .json(&edit(5, "a photo of sks dog on a rug."))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    let response = app
        .request(Method::PUT, &path)
        .json(&json!({"descriptions": [{"index": 0, "text": "x", "extra": 1}]}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;

    let unchanged: Value = app.get(&path).send().await.unwrap().json().await.unwrap();
    assert_eq!(unchanged, listed, "refused edits change nothing");

    let response = app
        .request(Method::PUT, &path)
        .json(&edit(
            1,
            "  A photo of sks dog lying on a green rug beside a lamp. ",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let edited: Value = response.json().await.unwrap();
    assert_eq!(
        edited["descriptions"][1]["text"],
        "a photo of sks dog lying on a green rug beside a lamp."
    );
    assert_eq!(edited["descriptions"][1]["edited"], true);
    assert_eq!(edited["descriptions"][0]["edited"], false);

    let response = app
        .request(Method::POST, &format!("/v1/jobs/{id}/approve"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let approved: Value = response.json().await.unwrap();
    assert_eq!(approved["status"], "queued");
    let response = app
        .request(Method::PUT, &path)
        .json(&edit(0, "a photo of sks dog on a bench."))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "conflict").await;
}

#[tokio::test]
async fn cancel_stops_a_queued_job_once() {
    let app = TestApp::start().await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    let response = app
        .request(Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["status"], "canceled");
    assert!(job["finished_at"].is_string());
    let response = app
        .request(Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "conflict").await;
    assert!(
        app.queue().claim().await.unwrap().is_none(),
        "a canceled job is not claimed"
    );
}

#[tokio::test]
async fn delete_removes_rows_and_objects() {
    let app = TestApp::start().await;
    let keep = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    let id = app.create_job(3).await["id"].as_str().unwrap().to_owned();
    assert_eq!(app.storage.all_keys().await.len(), 4);

    let response = app
        .request(Method::DELETE, &format!("/v1/jobs/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let left = app.storage.all_keys().await;
    assert_eq!(left.len(), 1);
    assert!(left[0].contains(&keep));
    let response = app.get(&format!("/v1/jobs/{id}")).send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
    let response = app
        .request(Method::DELETE, &format!("/v1/jobs/{id}"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
    assert_eq!(app.job_rows().await, 1);
}

#[tokio::test]
async fn artifacts_download_through_presigned_urls() {
    let app = TestApp::start().await;
    let id: Uuid = app.create_job(1).await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let empty: Value = app
        .get(&format!("/v1/jobs/{id}/artifacts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(empty["artifacts"], json!([]));

    let queue = app.queue();
    let claimed = queue.claim().await.unwrap().unwrap();
    let content = br#"[{"file_name":"00.jpg","text":"a photo of sks dog on grass."}]"#.to_vec();
    let key = keys::artifact(app.tenant, id, "descriptions.json");
    app.storage
        .store
        .put(&key, content.clone().into(), "application/json")
        .await
        .unwrap();
    let sha256 = hex::encode(Sha256::digest(&content));
    queue
        .record_artifact(
            &claimed.lease,
            &NewArtifact {
                name: "descriptions.json".into(),
                object_key: key,
                content_type: "application/json".into(),
                size: content.len() as i64,
                sha256: sha256.clone(),
            },
        )
        .await
        .unwrap();

    let listed: Value = app
        .get(&format!("/v1/jobs/{id}/artifacts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let artifact = &listed["artifacts"][0];
    assert_eq!(artifact["name"], "descriptions.json");
    assert_eq!(artifact["size"], content.len());
    assert_eq!(artifact["content_type"], "application/json");
    assert_eq!(artifact["sha256"], sha256);
    let expires: chrono::DateTime<chrono::Utc> =
        artifact["expires_at"].as_str().unwrap().parse().unwrap();
    assert!(expires > chrono::Utc::now());

    // The URL needs no API key.
    let url = artifact["url"].as_str().unwrap();
    let downloaded = reqwest::get(url).await.unwrap();
    assert_eq!(downloaded.status(), StatusCode::OK);
    assert_eq!(
        downloaded.bytes().await.unwrap().as_ref(),
        content.as_slice()
    );
}

#[tokio::test]
async fn presigned_urls_name_the_public_storage_endpoint_and_work_there() {
    use sidbooth_core::{
        testing::{TcpProxy, TestStorage},
        ArtifactStore, StorageArgs,
    };
    let storage = TestStorage::start().await;
    // Clients reach storage at another address than the service does.
    let public = TcpProxy::start(storage.server.addr()).await;
    let args = StorageArgs {
        s3_public_endpoint: Some(public.http_url()),
        ..storage.args.clone()
    };
    let store = ArtifactStore::with_static_credentials(
        &args,
        TestStorage::ACCESS_KEY,
        TestStorage::SECRET_KEY,
    );
    store
        .put("a/b.txt", b"hello".to_vec().into(), "text/plain")
        .await
        .unwrap();

    let url = store.presign_get("a/b.txt").await.unwrap();
    assert!(url.starts_with(&public.http_url()), "{url}");
    let downloaded = reqwest::get(&url).await.unwrap();
    assert_eq!(downloaded.status(), StatusCode::OK);
    assert_eq!(downloaded.bytes().await.unwrap().as_ref(), b"hello");

    let internal = storage.store.presign_get("a/b.txt").await.unwrap();
    assert!(
        internal.starts_with(&storage.server.endpoint()),
        "without a public endpoint the URL names the S3 endpoint: {internal}"
    );
}
