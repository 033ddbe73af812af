//! A job's storage as its stages see it: the inputs (photos, uploaded masks, descriptions),
//! its artifacts, and resumable work state.
//!
//! Artifacts are written under `keys::artifact` with the lease epoch in the object key, so a
//! worker that lost its lease never overwrites or deletes what the worker that took over wrote;
//! the artifact row (fenced by the lease) says which object is current. Storing an artifact
//! looks up the object it replaces and deletes that one afterwards.

use std::collections::HashMap;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use sidbooth_core::{
    keys, Artifact, ArtifactStore, CoreError, Description, JobImage, JobStore, Lease, NewArtifact,
    Queue,
};
use tokio::sync::Mutex;

use crate::error::StageError;

/// Uploads one artifact and records it, fenced by the lease. When the record is refused (the
/// lease was lost) the object is deleted again; when it replaces an earlier object of the same
/// name (`previous_key`), that one is deleted.
pub async fn store_artifact(
    queue: &Queue,
    store: &ArtifactStore,
    lease: &Lease,
    previous_key: Option<&str>,
    name: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(), StageError> {
    let object_key = keys::artifact(
        lease.tenant_id,
        lease.job_id,
        &format!("e{}/{name}", lease.epoch),
    );
    let artifact = NewArtifact {
        name: name.to_owned(),
        object_key: object_key.clone(),
        content_type: content_type.to_owned(),
        size: body.len() as i64,
        sha256: hex::encode(Sha256::digest(&body)),
    };
    store
        .put(&object_key, Bytes::from(body), content_type)
        .await?;
    if let Err(e) = queue.record_artifact(lease, &artifact).await {
        if let Err(delete) = store.delete(&object_key).await {
            tracing::warn!(%object_key, error = %delete, "could not delete an unrecorded artifact");
        }
        return Err(e.into());
    }
    if let Some(previous) = previous_key.filter(|k| *k != object_key) {
        if let Err(e) = store.delete(previous).await {
            tracing::warn!(object_key = %previous, error = %e, "could not delete a replaced artifact");
        }
    }
    Ok(())
}

/// One stage run's view of its job's storage.
pub struct JobIo<'a> {
    queue: &'a Queue,
    jobs: &'a JobStore,
    store: &'a ArtifactStore,
    lease: &'a Lease,
    /// Artifact name -> object key, read once per stage run: only the lease holder writes a
    /// job's artifacts while it runs, so the map stays true as this run updates it.
    artifacts: Mutex<Option<HashMap<String, String>>>,
}

impl<'a> JobIo<'a> {
    pub fn new(
        queue: &'a Queue,
        jobs: &'a JobStore,
        store: &'a ArtifactStore,
        lease: &'a Lease,
    ) -> Self {
        Self {
            queue,
            jobs,
            store,
            lease,
            artifacts: Mutex::new(None),
        }
    }

    pub async fn images(&self) -> Result<Vec<JobImage>, StageError> {
        Ok(self.jobs.images(self.lease.job_id).await?)
    }

    pub async fn descriptions(&self) -> Result<Vec<Description>, StageError> {
        Ok(self.jobs.descriptions(self.lease.job_id).await?)
    }

    /// An input photo. A missing object cannot come back by retrying.
    pub async fn photo(&self, image: &JobImage) -> Result<Bytes, StageError> {
        read_input(self.store, &image.object_key, || {
            format!(
                "photo {} ({}) is missing from storage",
                image.idx, image.file_name
            )
        })
        .await
    }

    /// The decoded photo, as RGB.
    pub async fn photo_rgb(&self, image: &JobImage) -> Result<image::RgbImage, StageError> {
        let bytes = self.photo(image).await?;
        let name = image.file_name.clone();
        tokio::task::spawn_blocking(move || {
            image::load_from_memory(&bytes)
                .map(|i| i.to_rgb8())
                .map_err(|e| StageError::permanent("input_unreadable", format!("{name}: {e}")))
        })
        .await
        .map_err(|e| StageError::transient("worker_panic", e.to_string()))?
    }

    /// The mask the user uploaded with a photo, if any.
    pub async fn uploaded_mask(&self, image: &JobImage) -> Result<Option<Bytes>, StageError> {
        let Some(key) = &image.mask_object_key else {
            return Ok(None);
        };
        read_input(self.store, key, || {
            format!("the mask of photo {} is missing from storage", image.idx)
        })
        .await
        .map(Some)
    }

    /// Every artifact of the job, fresh from the database.
    pub async fn artifact_rows(&self) -> Result<Vec<Artifact>, StageError> {
        Ok(self.jobs.artifacts(self.lease.job_id).await?)
    }

    async fn artifact_key(&self, name: &str) -> Result<Option<String>, StageError> {
        let mut cache = self.artifacts.lock().await;
        if cache.is_none() {
            let rows = self.jobs.artifacts(self.lease.job_id).await?;
            *cache = Some(rows.into_iter().map(|a| (a.name, a.object_key)).collect());
        }
        Ok(cache.as_ref().and_then(|m| m.get(name).cloned()))
    }

    pub async fn has_artifact(&self, name: &str) -> Result<bool, StageError> {
        Ok(self.artifact_key(name).await?.is_some())
    }

    /// An artifact's content; `None` when the job has no artifact of that name.
    pub async fn artifact(&self, name: &str) -> Result<Option<Bytes>, StageError> {
        let Some(key) = self.artifact_key(name).await? else {
            return Ok(None);
        };
        match self.store.get(&key).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(CoreError::NotFound) => Err(StageError::permanent(
                "artifact_missing",
                format!("the artifact {name} is recorded but missing from storage"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores (or replaces) an artifact of the job.
    pub async fn store(
        &self,
        name: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(), StageError> {
        let previous = self.artifact_key(name).await?;
        store_artifact(
            self.queue,
            self.store,
            self.lease,
            previous.as_deref(),
            name,
            content_type,
            body,
        )
        .await?;
        let key = keys::artifact(
            self.lease.tenant_id,
            self.lease.job_id,
            &format!("e{}/{name}", self.lease.epoch),
        );
        if let Some(map) = self.artifacts.lock().await.as_mut() {
            map.insert(name.to_owned(), key);
        }
        Ok(())
    }

    fn work_key(&self, name: &str) -> String {
        keys::work(self.lease.tenant_id, self.lease.job_id, name)
    }

    /// Resumable state a stage saved under `work/{name}`; `None` when there is none.
    pub async fn work(&self, name: &str) -> Result<Option<Bytes>, StageError> {
        match self.store.get(&self.work_key(name)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(CoreError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Saves resumable state under `work/{name}` (not an artifact: users never see it).
    pub async fn put_work(&self, name: &str, body: Bytes) -> Result<(), StageError> {
        Ok(self
            .store
            .put(&self.work_key(name), body, "application/octet-stream")
            .await?)
    }

    /// Names under `work/{prefix}`, without the job's key prefix.
    pub async fn list_work(&self, prefix: &str) -> Result<Vec<String>, StageError> {
        let root = self.work_key("");
        Ok(self
            .store
            .list(&self.work_key(prefix))
            .await?
            .into_iter()
            .filter_map(|k| k.strip_prefix(&root).map(str::to_owned))
            .collect())
    }
}

async fn read_input(
    store: &ArtifactStore,
    key: &str,
    missing: impl FnOnce() -> String,
) -> Result<Bytes, StageError> {
    match store.get(key).await {
        Ok(bytes) => Ok(bytes),
        Err(CoreError::NotFound) => Err(StageError::permanent("input_missing", missing())),
        Err(e) => Err(e.into()),
    }
}
