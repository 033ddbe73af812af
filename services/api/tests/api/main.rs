//! The API over real HTTP, with a real Postgres database and a real S3 server per test.

mod access;
mod browser;
mod images;
mod jobs;
mod masks;
mod ops;
mod outage;
mod quotas;
mod stream;
mod support;
mod uploads;
mod webhooks;
