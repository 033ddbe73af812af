//! Object keys in storage, grouped per tenant and job so a job's objects can be listed and
//! deleted with one prefix:
//!
//! ```text
//! tenants/{tenant}/jobs/{job}/inputs/{idx:02}-{file_name}
//! tenants/{tenant}/jobs/{job}/inputs/masks/{idx:02}.png   (a subject mask uploaded with photo idx)
//! tenants/{tenant}/jobs/{job}/artifacts/{name}
//! tenants/{tenant}/jobs/{job}/work/{name}        (checkpoints and other resumable state)
//! tenants/{tenant}/jobs/{job}/{area}/b-{hash}     (large files of `artifacts` or `work`; see
//!                                                  [`blob`])
//! shared/{name}                                   (derived from base models only, e.g. class
//!                                                  images: shared by every tenant's jobs)
//! ```

use uuid::Uuid;

pub fn job_prefix(tenant: Uuid, job: Uuid) -> String {
    format!("tenants/{tenant}/jobs/{job}/")
}

pub fn input(tenant: Uuid, job: Uuid, idx: usize, file_name: &str) -> String {
    format!("{}inputs/{idx:02}-{file_name}", job_prefix(tenant, job))
}

pub fn input_mask(tenant: Uuid, job: Uuid, idx: usize) -> String {
    format!("{}inputs/masks/{idx:02}.png", job_prefix(tenant, job))
}

pub fn artifact(tenant: Uuid, job: Uuid, name: &str) -> String {
    format!("{}artifacts/{name}", job_prefix(tenant, job))
}

pub fn work(tenant: Uuid, job: Uuid, name: &str) -> String {
    format!("{}work/{name}", job_prefix(tenant, job))
}

/// The key of a large file (multipart upload) named `name` under `area` (`artifacts` or
/// `work`): the name is hashed so the key stays short whatever the name. S3 allows 1024 bytes,
/// but a file-backed server such as s3s-fs writes the key, base64-encoded, into one file name of
/// at most 255 bytes, which the job's prefix and a pipeline path like
/// `weights/unet/diffusion_pytorch_model.safetensors` outgrow. The name itself is kept in
/// Postgres (artifacts) or derived again from the same name (work state).
pub fn blob(tenant: Uuid, job: Uuid, area: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    format!(
        "{}{area}/b-{}",
        job_prefix(tenant, job),
        hex::encode(&digest[..8])
    )
}

/// Objects that hold nothing of a tenant's (they are computed from a base model alone).
pub fn shared(name: &str) -> String {
    format!("shared/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_job_shares_its_prefix() {
        let (t, j) = (Uuid::now_v7(), Uuid::now_v7());
        let prefix = job_prefix(t, j);
        assert!(input(t, j, 3, "a.jpg").starts_with(&prefix));
        assert!(input(t, j, 3, "a.jpg").ends_with("inputs/03-a.jpg"));
        assert!(input_mask(t, j, 3).starts_with(&prefix));
        let long = "e12/weights/merged_pipeline/unet/diffusion_pytorch_model.safetensors";
        let b = blob(t, j, "artifacts", long);
        assert!(b.starts_with(&format!("{prefix}artifacts/b-")), "{b}");
        assert_eq!(
            b,
            blob(t, j, "artifacts", long),
            "the same name, the same key"
        );
        assert_ne!(b, blob(t, j, "artifacts", "e13/weights/x"));
        // The longest name s3s-fs keeps for a multipart upload (see `blob`).
        assert!(b.len() <= 122, "{} bytes", b.len());
        assert_ne!(input_mask(t, j, 3), input(t, j, 3, "masks/03.png"));
        assert!(artifact(t, j, "captions.zip").starts_with(&prefix));
        assert!(work(t, j, "ckpt").starts_with(&prefix));
        assert!(!shared("class-images/x").starts_with("tenants/"));
        assert!(!job_prefix(t, Uuid::now_v7()).starts_with(&prefix));
    }
}
