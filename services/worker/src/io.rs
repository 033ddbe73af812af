//! A job's storage as its stages see it: the inputs (photos, uploaded masks, descriptions),
//! its artifacts, and resumable work state.
//!
//! Artifacts are written under `keys::artifact` (large files under `keys::blob`) with the lease
//! epoch in the object key, so a
//! worker that lost its lease never overwrites or deletes what the worker that took over wrote;
//! the artifact row (fenced by the lease) says which object is current. Storing an artifact
//! looks up the object it replaces and deletes that one afterwards.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use sidbooth_core::{
    keys, mask_artifact_name, multipart::UploadReport, Artifact, ArtifactStore, CoreError,
    Description, JobImage, JobStore, Lease, NewArtifact, Queue,
};
use sidbooth_evaluate::mask::Mask;
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
    /// Part size of multipart uploads.
    part_size: u64,
    /// Fault injection for tests: multipart uploads stop after this many parts, as a crash
    /// would leave them.
    stop_uploads_after: Option<usize>,
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
        part_size: u64,
    ) -> Self {
        Self {
            queue,
            jobs,
            store,
            lease,
            part_size,
            stop_uploads_after: None,
            artifacts: Mutex::new(None),
        }
    }

    /// Stops every multipart upload after `parts` parts with an error, as a worker that died
    /// mid-upload would (tests of the resume).
    pub fn with_upload_limit(mut self, parts: usize) -> Self {
        self.stop_uploads_after = Some(parts);
        self
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

    /// The photo's subject mask (`masks/NN.png`, from the describe stage or an upload), if it
    /// has one.
    pub async fn subject_mask(&self, image: &JobImage) -> Result<Option<Mask>, StageError> {
        let name = mask_artifact_name(image.idx);
        let Some(bytes) = self.artifact(&name).await? else {
            return Ok(None);
        };
        Mask::from_png(&bytes)
            .map(Some)
            .map_err(|e| StageError::permanent("mask_invalid", format!("{name}: {e}")))
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

    /// Stores (or replaces) an artifact from a file of any size: multipart upload, resumed
    /// where an earlier run of the stage left it (see `sidbooth_core::multipart`).
    pub async fn store_file(
        &self,
        name: &str,
        content_type: &str,
        path: &Path,
    ) -> Result<UploadReport, StageError> {
        let previous = self.artifact_key(name).await?;
        let key = self.blob("artifacts", &format!("e{}/{name}", self.lease.epoch));
        let record = self.upload_record(name);
        let report = self
            .store
            .put_file(
                &key,
                path,
                content_type,
                self.part_size,
                &record,
                self.stop_uploads_after,
            )
            .await?;
        let path = path.to_owned();
        let sha256 = tokio::task::spawn_blocking(move || file_sha256(&path))
            .await
            .map_err(|e| StageError::transient("worker_panic", e.to_string()))?
            .map_err(|e| StageError::transient("workdir", e.to_string()))?;
        let artifact = NewArtifact {
            name: name.to_owned(),
            object_key: report.key.clone(),
            content_type: content_type.to_owned(),
            size: report.size as i64,
            sha256,
        };
        if let Err(e) = self.queue.record_artifact(self.lease, &artifact).await {
            if let Err(delete) = self.store.delete(&report.key).await {
                tracing::warn!(object_key = %report.key, error = %delete, "could not delete an unrecorded artifact");
            }
            return Err(e.into());
        }
        if let Some(previous) = previous.filter(|k| *k != report.key) {
            if let Err(e) = self.store.delete(&previous).await {
                tracing::warn!(object_key = %previous, error = %e, "could not delete a replaced artifact");
            }
        }
        if let Some(map) = self.artifacts.lock().await.as_mut() {
            map.insert(name.to_owned(), report.key.clone());
        }
        Ok(report)
    }

    /// Downloads every artifact whose name starts with `prefix` into `dir`, keeping the rest of
    /// the name as the relative path; returns how many.
    pub async fn download_prefix(&self, prefix: &str, dir: &Path) -> Result<usize, StageError> {
        let rows = self.artifact_rows().await?;
        let mut n = 0;
        for row in rows.iter().filter(|a| a.name.starts_with(prefix)) {
            let relative = &row.name[prefix.len()..];
            if relative
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            {
                return Err(StageError::permanent(
                    "artifact_name",
                    format!("artifact {} has an unusable name", row.name),
                ));
            }
            let target = dir.join(relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| StageError::transient("workdir", e.to_string()))?;
            }
            // Streamed: a DreamBooth pipeline is gigabytes.
            match self.store.get_to_file(&row.object_key, &target).await {
                Ok(_) => {}
                Err(CoreError::NotFound) => {
                    return Err(StageError::permanent(
                        "artifact_missing",
                        format!(
                            "the artifact {} is recorded but missing from storage",
                            row.name
                        ),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
            n += 1;
        }
        Ok(n)
    }

    /// Keys of shared objects (`keys::shared`) under `prefix`.
    pub async fn list_shared(&self, prefix: &str) -> Result<Vec<String>, StageError> {
        Ok(self.store.list(&keys::shared(prefix)).await?)
    }

    /// A shared object by its full key (as [`list_shared`](Self::list_shared) gives it).
    pub async fn shared(&self, key: &str) -> Result<Option<Bytes>, StageError> {
        match self.store.get(key).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(CoreError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_shared(&self, name: &str, body: Bytes) -> Result<(), StageError> {
        Ok(self
            .store
            .put(&keys::shared(name), body, "application/octet-stream")
            .await?)
    }

    /// The compact key of a large file (see `keys::blob`).
    fn blob(&self, area: &str, name: &str) -> String {
        keys::blob(self.lease.tenant_id, self.lease.job_id, area, name)
    }

    /// Where the multipart upload of `what` is recorded while it runs (any lease's run of the
    /// stage finds it there).
    fn upload_record(&self, what: &str) -> String {
        format!("{}.upload", self.blob("work", &format!("upload/{what}")))
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

    /// Saves the file `path` as the work file `name`, streamed with a resumable multipart upload
    /// (a full fine-tuning checkpoint is gigabytes). Work files live under compact keys of
    /// their own (`keys::blob`): read them with [`work_to_file`](Self::work_to_file), delete
    /// them with [`delete_work_file`](Self::delete_work_file).
    pub async fn put_work_file(&self, name: &str, path: &Path) -> Result<(), StageError> {
        self.store
            .put_file(
                &self.blob("work", name),
                path,
                "application/octet-stream",
                self.part_size,
                &self.upload_record(&format!("work/{name}")),
                self.stop_uploads_after,
            )
            .await?;
        Ok(())
    }

    /// Streams the work file `name` into the file `path`; `false` when there is none.
    pub async fn work_to_file(&self, name: &str, path: &Path) -> Result<bool, StageError> {
        match self.store.get_to_file(&self.blob("work", name), path).await {
            Ok(_) => Ok(true),
            Err(CoreError::NotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the work file `name` and gives up an unfinished upload of it (a missing one is
    /// no error).
    pub async fn delete_work_file(&self, name: &str) -> Result<(), StageError> {
        self.store
            .abandon_upload(&self.upload_record(&format!("work/{name}")))
            .await?;
        match self.store.delete(&self.blob("work", name)).await {
            Ok(()) | Err(CoreError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
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

fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
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
