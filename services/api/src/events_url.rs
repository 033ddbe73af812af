//! Signed event-stream URLs for browsers: `EventSource` cannot send an `Authorization` header,
//! so `POST /v1/jobs/{id}/events-url` (with the key) hands out
//! `/v1/jobs/{id}/events?token=…`, which works without one for that job and tenant until it
//! expires.
//!
//! token = `<tenant id, simple>.<expiry, unix seconds>.<base64url HMAC-SHA256>` over
//! `sidbooth-events.v1:<tenant>:<job>:<expiry>`, keyed with the configured key (or one made at
//! start, which then holds only for this process: give every replica the same key).

use std::{fmt, str::FromStr, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;

/// A key given in configuration; its value never reaches `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(String);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

impl FromStr for SigningKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() < 32 {
            return Err("the key must be at least 32 characters".into());
        }
        Ok(Self(s.to_owned()))
    }
}

pub struct EventsUrlSigner {
    key: Vec<u8>,
    ttl: Duration,
}

impl EventsUrlSigner {
    pub fn new(key: Option<&SigningKey>, ttl: Duration) -> Self {
        let key = match key {
            Some(k) => k.0.as_bytes().to_vec(),
            None => {
                let mut k = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                k
            }
        };
        Self { key, ttl }
    }

    fn mac(&self, tenant: Uuid, job: Uuid, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(format!("sidbooth-events.v1:{tenant}:{job}:{expires}").as_bytes());
        mac
    }

    /// A token for `job` of `tenant` and when it expires.
    pub fn sign(&self, tenant: Uuid, job: Uuid) -> (String, DateTime<Utc>) {
        let expires = Utc::now() + self.ttl;
        let at = expires.timestamp();
        let tag = URL_SAFE_NO_PAD.encode(self.mac(tenant, job, at).finalize().into_bytes());
        (format!("{}.{at}.{tag}", tenant.simple()), expires)
    }

    /// The tenant a token was made for, when it is genuine, for `job`, and not expired.
    pub fn verify(&self, token: &str, job: Uuid) -> Option<Uuid> {
        let mut parts = token.split('.');
        let (tenant, expires, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let tenant = Uuid::try_parse(tenant).ok()?;
        let expires: i64 = expires.parse().ok()?;
        if expires < Utc::now().timestamp() {
            return None;
        }
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        self.mac(tenant, job, expires)
            .verify_slice(&tag)
            .ok()
            .map(|()| tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_for_its_job_until_it_expires() {
        let signer = EventsUrlSigner::new(None, Duration::from_secs(60));
        let (tenant, job) = (Uuid::now_v7(), Uuid::now_v7());
        let (token, expires) = signer.sign(tenant, job);
        assert!(expires > Utc::now());
        assert_eq!(signer.verify(&token, job), Some(tenant));
        assert_eq!(signer.verify(&token, Uuid::now_v7()), None, "another job");
        let other = EventsUrlSigner::new(None, Duration::from_secs(60));
        assert_eq!(other.verify(&token, job), None, "another key");
        // A changed tenant or expiry breaks the tag.
        let (_, rest) = token.split_once('.').unwrap();
        let forged = format!("{}.{rest}", Uuid::now_v7().simple());
        assert_eq!(signer.verify(&forged, job), None);
        let mut parts: Vec<&str> = token.split('.').collect();
        let later = (Utc::now().timestamp() + 10_000).to_string();
        parts[1] = &later;
        assert_eq!(signer.verify(&parts.join("."), job), None);
        assert_eq!(signer.verify("garbage", job), None);
    }

    #[test]
    fn an_expired_token_is_refused() {
        let signer = EventsUrlSigner::new(None, Duration::ZERO);
        let (tenant, job) = (Uuid::now_v7(), Uuid::now_v7());
        let (token, _) = signer.sign(tenant, job);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(signer.verify(&token, job), None);
    }

    #[test]
    fn configured_keys_are_shared_and_hidden() {
        let key: SigningKey = "k".repeat(40).parse().unwrap();
        assert!(!format!("{key:?}").contains("kkk"));
        let a = EventsUrlSigner::new(Some(&key), Duration::from_secs(60));
        let b = EventsUrlSigner::new(Some(&key), Duration::from_secs(60));
        let (tenant, job) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(b.verify(&a.sign(tenant, job).0, job), Some(tenant));
        assert!("short".parse::<SigningKey>().is_err());
    }
}
