//! Object keys in storage, grouped per tenant and job so a job's objects can be listed and
//! deleted with one prefix:
//!
//! ```text
//! tenants/{tenant}/jobs/{job}/inputs/{idx:02}-{file_name}
//! tenants/{tenant}/jobs/{job}/inputs/masks/{idx:02}.png   (a subject mask uploaded with photo idx)
//! tenants/{tenant}/jobs/{job}/artifacts/{name}
//! tenants/{tenant}/jobs/{job}/work/{name}        (checkpoints and other resumable state)
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
        assert_ne!(input_mask(t, j, 3), input(t, j, 3, "masks/03.png"));
        assert!(artifact(t, j, "captions.zip").starts_with(&prefix));
        assert!(work(t, j, "ckpt").starts_with(&prefix));
        assert!(!job_prefix(t, Uuid::now_v7()).starts_with(&prefix));
    }
}
