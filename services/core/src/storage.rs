//! The artifact store: any S3-compatible server through aws-sdk-s3.

use std::time::Duration;

use aws_sdk_s3::{
    config::{BehaviorVersion, Credentials, Region},
    presigning::PresigningConfig,
    primitives::ByteStream,
    types::{Delete, ObjectIdentifier},
    Client,
};
use bytes::Bytes;

use crate::{
    config::StorageArgs,
    error::{CoreError, Result},
};

#[derive(Clone, Debug)]
pub struct ArtifactStore {
    client: Client,
    /// Signs download URLs for the public endpoint (the same client when there is none).
    presigner: Client,
    bucket: String,
    presign_ttl: Duration,
}

fn storage_err(e: impl std::fmt::Display) -> CoreError {
    CoreError::Storage(e.to_string())
}

/// Renders an SDK error with its source chain; the SDK's own Display is often just "service error".
pub(crate) fn sdk_err<E: std::error::Error>(e: E) -> CoreError {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    CoreError::Storage(msg)
}

impl ArtifactStore {
    /// Connects with credentials from the standard AWS chain (environment, profile, IMDS).
    pub async fn connect(args: &StorageArgs) -> Result<Self> {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(args.s3_region.clone()))
            .load()
            .await;
        let builder =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(args.s3_path_style);
        Ok(Self::from_config(builder, args))
    }

    /// Connects with explicit static credentials (embedded servers and tests).
    pub fn with_static_credentials(args: &StorageArgs, access_key: &str, secret_key: &str) -> Self {
        let creds = Credentials::new(access_key, secret_key, None, None, "sidbooth-static");
        let builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(args.s3_region.clone()))
            .credentials_provider(creds)
            .force_path_style(args.s3_path_style);
        Self::from_config(builder, args)
    }

    /// A client for the S3 endpoint, and for presigning one for the public endpoint: a
    /// presigned URL's signature covers its host, so it is made for the address clients use.
    fn from_config(builder: aws_sdk_s3::config::Builder, args: &StorageArgs) -> Self {
        let endpoint_client = |endpoint: Option<&String>| {
            let mut builder = builder.clone();
            if let Some(endpoint) = endpoint {
                builder = builder.endpoint_url(endpoint);
            }
            Client::from_conf(builder.build())
        };
        let client = endpoint_client(args.s3_endpoint.as_ref());
        let presigner = match &args.s3_public_endpoint {
            Some(public) => endpoint_client(Some(public)),
            None => client.clone(),
        };
        Self {
            client,
            presigner,
            bucket: args.s3_bucket.clone(),
            presign_ttl: Duration::from_secs(args.presign_ttl_secs),
        }
    }

    /// How long a presigned URL stays valid.
    pub fn presign_ttl(&self) -> Duration {
        self.presign_ttl
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Creates the bucket unless it exists (local and embedded set-ups).
    pub async fn ensure_bucket(&self) -> Result<()> {
        if self.ping().await.is_ok() {
            return Ok(());
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }

    /// Readiness: the bucket answers.
    pub async fn ping(&self) -> Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }

    #[tracing::instrument(skip(self, body), fields(bytes = body.len()))]
    pub async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    CoreError::NotFound
                } else {
                    sdk_err(e)
                }
            })?;
        let body = out.body.collect().await.map_err(storage_err)?;
        Ok(body.into_bytes())
    }

    /// Streams the object at `key` into the file `path` (memory: one chunk, whatever its size);
    /// returns its size. The file is written beside `path` and renamed, so it is never half
    /// there.
    pub async fn get_to_file(&self, key: &str, path: &std::path::Path) -> Result<u64> {
        use tokio::io::AsyncWriteExt;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    CoreError::NotFound
                } else {
                    sdk_err(e)
                }
            })?;
        let partial = path.with_extension("partial");
        let file_err = |e: std::io::Error| CoreError::Storage(format!("{}: {e}", path.display()));
        let mut file = tokio::fs::File::create(&partial).await.map_err(file_err)?;
        let mut body = out.body;
        let mut size = 0u64;
        while let Some(chunk) = body.try_next().await.map_err(storage_err)? {
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(file_err)?;
        }
        file.flush().await.map_err(file_err)?;
        drop(file);
        tokio::fs::rename(&partial, path).await.map_err(file_err)?;
        Ok(size)
    }

    /// Keys under a prefix.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(sdk_err)?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(keys)
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }

    /// Deletes every object under a prefix; returns how many were deleted.
    #[tracing::instrument(skip(self))]
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let keys = self.list(prefix).await?;
        for chunk in keys.chunks(1000) {
            let objects = chunk
                .iter()
                .map(|k| {
                    ObjectIdentifier::builder()
                        .key(k)
                        .build()
                        .map_err(storage_err)
                })
                .collect::<Result<Vec<_>>>()?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(storage_err)?;
            self.client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(sdk_err)?;
        }
        Ok(keys.len())
    }

    /// A time-limited GET URL for an object that anyone holding it can download.
    pub async fn presign_get(&self, key: &str) -> Result<String> {
        let config = PresigningConfig::expires_in(self.presign_ttl).map_err(storage_err)?;
        let req = self
            .presigner
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(sdk_err)?;
        Ok(req.uri().to_string())
    }
}
