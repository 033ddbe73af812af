//! Large files into storage: S3 multipart upload, streamed one part at a time from the file
//! (memory: one part), and resumable. The upload's id is recorded in a small object beside the
//! job's work state as soon as the upload starts, and the MD5 of every part once the server has
//! it; a later upload of the same file (a worker that took the job over) finds the record, asks
//! the server which parts it holds (`ListParts`), sends only the parts that are missing or whose
//! content differs, and completes the upload. Files no larger than one part go up with one PUT.
//! (The MD5s are ours because not every server lists its parts' ETags: s3s-fs does not.)

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use aws_sdk_s3::{
    primitives::ByteStream,
    types::{CompletedMultipartUpload, CompletedPart},
};
use bytes::Bytes;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::{
    error::{CoreError, Result},
    storage::ArtifactStore,
};

/// The default part: big enough that a multi-GB checkpoint is a few hundred requests, small
/// enough to hold in memory.
pub const DEFAULT_PART_SIZE: u64 = 64 * 1024 * 1024;

/// An upload in progress, as recorded to resume it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// The object being written.
    pub key: String,
    pub upload_id: String,
    pub part_size: u64,
    /// The file's size when the upload started (a different file starts over).
    pub size: u64,
    /// MD5 (hex) of each part the server confirmed, by part number.
    #[serde(default)]
    pub parts: std::collections::BTreeMap<i32, String>,
}

/// What an upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    /// The object written (a resumed upload keeps the key it started with).
    pub key: String,
    pub size: u64,
    /// Parts sent by this call.
    pub parts_sent: usize,
    /// Parts already on the server from an earlier, interrupted upload.
    pub parts_reused: usize,
}

fn io_err(path: &Path, e: std::io::Error) -> CoreError {
    CoreError::Storage(format!("{}: {e}", path.display()))
}

/// Part `n` (0-based) of the file.
fn read_part(path: &Path, n: u64, part_size: u64, size: u64) -> Result<Bytes> {
    let start = n * part_size;
    let len = part_size.min(size - start) as usize;
    let mut file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| io_err(path, e))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).map_err(|e| io_err(path, e))?;
    Ok(Bytes::from(buf))
}

fn etag_of(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

impl ArtifactStore {
    /// Writes `path` to `key`, resuming the upload recorded at `record_key` if there is one for
    /// this file. Parts of `part_size` bytes (S3 wants at least 5 MiB but for the last part;
    /// tests use smaller ones on servers that allow it). `stop_after` ends the call after that
    /// many parts were sent, as an interruption would (tests of the resume).
    #[tracing::instrument(skip(self, path), fields(path = %path.display()))]
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        content_type: &str,
        part_size: u64,
        record_key: &str,
        stop_after: Option<usize>,
    ) -> Result<UploadReport> {
        let size = std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
        if size <= part_size {
            let body = std::fs::read(path).map_err(|e| io_err(path, e))?;
            self.put(key, Bytes::from(body), content_type).await?;
            return Ok(UploadReport {
                key: key.to_owned(),
                size,
                parts_sent: 1,
                parts_reused: 0,
            });
        }
        let (mut record, on_server) = self
            .resume_or_start(key, content_type, size, part_size, record_key)
            .await?;
        let parts = size.div_ceil(part_size);
        let mut completed = Vec::with_capacity(parts as usize);
        let (mut sent, mut reused) = (0usize, 0usize);
        for n in 0..parts {
            let number = (n + 1) as i32;
            let body = read_part(path, n, part_size, size)?;
            let etag = etag_of(&body);
            let held = on_server.contains(&number)
                && record.parts.get(&number).map(String::as_str) == Some(etag.as_str());
            if held {
                reused += 1;
            } else {
                if stop_after.is_some_and(|limit| sent >= limit) {
                    return Err(CoreError::Storage(format!(
                        "upload of {} stopped after {sent} parts",
                        path.display()
                    )));
                }
                self.client()
                    .upload_part()
                    .bucket(self.bucket())
                    .key(&record.key)
                    .upload_id(&record.upload_id)
                    .part_number(number)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map_err(crate::storage::sdk_err)?;
                sent += 1;
                record.parts.insert(number, etag.clone());
                self.save_record(record_key, &record).await?;
            }
            completed.push(
                CompletedPart::builder()
                    .part_number(number)
                    .e_tag(format!("\"{etag}\""))
                    .build(),
            );
        }
        self.client()
            .complete_multipart_upload()
            .bucket(self.bucket())
            .key(&record.key)
            .upload_id(&record.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(crate::storage::sdk_err)?;
        self.delete(record_key).await?;
        Ok(UploadReport {
            key: record.key,
            size,
            parts_sent: sent,
            parts_reused: reused,
        })
    }

    async fn save_record(&self, record_key: &str, record: &UploadRecord) -> Result<()> {
        self.put(
            record_key,
            Bytes::from(serde_json::to_vec(record)?),
            "application/json",
        )
        .await
    }

    /// The recorded upload of this file with the part numbers the server holds, or a new upload,
    /// recorded before any part is sent.
    async fn resume_or_start(
        &self,
        key: &str,
        content_type: &str,
        size: u64,
        part_size: u64,
        record_key: &str,
    ) -> Result<(UploadRecord, std::collections::HashSet<i32>)> {
        let recorded = match self.get(record_key).await {
            Ok(bytes) => serde_json::from_slice::<UploadRecord>(&bytes).ok(),
            Err(CoreError::NotFound) => None,
            Err(e) => return Err(e),
        };
        match recorded {
            Some(record) if record.size == size && record.part_size == part_size => {
                match self.uploaded_parts(&record).await {
                    Ok(parts) => {
                        tracing::info!(key = %record.key, parts = parts.len(), "resuming an upload");
                        return Ok((record, parts));
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "the recorded upload is gone; starting over")
                    }
                }
            }
            // Another file now: its parts are of no use.
            Some(stale) => self.abort(&stale).await,
            None => {}
        }
        let created = self
            .client()
            .create_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(crate::storage::sdk_err)?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| CoreError::Storage("the server gave no upload id".into()))?
            .to_owned();
        let record = UploadRecord {
            key: key.to_owned(),
            upload_id,
            part_size,
            size,
            parts: Default::default(),
        };
        self.save_record(record_key, &record).await?;
        Ok((record, Default::default()))
    }

    /// Gives up the upload recorded at `record_key`, if there is one: aborts it on the server
    /// and deletes the record. For a file that is no longer wanted (an old checkpoint whose
    /// upload a killed worker left half done).
    pub async fn abandon_upload(&self, record_key: &str) -> Result<()> {
        let recorded = match self.get(record_key).await {
            Ok(bytes) => serde_json::from_slice::<UploadRecord>(&bytes).ok(),
            Err(CoreError::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some(record) = recorded {
            self.abort(&record).await;
        }
        match self.delete(record_key).await {
            Ok(()) | Err(CoreError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Aborts an upload: a server keeps (and bills) its parts until then. A failure is only
    /// logged, since the upload may already be gone.
    async fn abort(&self, record: &UploadRecord) {
        let aborted = self
            .client()
            .abort_multipart_upload()
            .bucket(self.bucket())
            .key(&record.key)
            .upload_id(&record.upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(error = %crate::storage::sdk_err(e), "could not abort an upload");
        }
    }

    /// Part numbers the server holds for the upload; an error when the upload is gone.
    async fn uploaded_parts(
        &self,
        record: &UploadRecord,
    ) -> Result<std::collections::HashSet<i32>> {
        let mut parts = std::collections::HashSet::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client()
                .list_parts()
                .bucket(self.bucket())
                .key(&record.key)
                .upload_id(&record.upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(crate::storage::sdk_err)?;
            for p in page.parts() {
                let expected = record.parts.get(&p.part_number().unwrap_or(0));
                // A server that lists ETags must agree with the MD5 we recorded.
                let agrees = match (p.e_tag(), expected) {
                    (Some(tag), Some(md5)) => tag.trim_matches('"') == md5,
                    _ => true,
                };
                if let (Some(n), true) = (p.part_number(), agrees) {
                    parts.insert(n);
                }
            }
            match page.next_part_number_marker() {
                Some(next) if page.is_truncated() == Some(true) => marker = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(parts)
    }
}
