//! Train descriptions for sidbooth: the instructions a vision-language model gets for each of
//! the paper's description cases and for object and style mode ([`instructions`]), validation
//! and repair of every description, whether written by a model or a person ([`validate`]), and a
//! client for any OpenAI-compatible chat-completions endpoint ([`client`]).
//!
//! With the `fake-vlm` feature, [`fake`] provides a local OpenAI-compatible server for tests.
//! With the `clap` feature, [`client::VlmArgs`] maps flags and `SIDBOOTH_VLM_*` variables to a
//! [`client::VlmConfig`].

pub mod client;
pub mod instructions;
pub mod photo;
pub mod subject_box;
pub mod validate;

#[cfg(feature = "fake-vlm")]
pub mod fake;

#[cfg(feature = "clap")]
pub use client::VlmArgs;
pub use client::{
    cache_key, ApiKey, BoxOutcome, Outcome, Progress, VlmClient, VlmConfig, VlmError,
};
pub use instructions::{fixed_description, instruction_for, Instruction, INSTRUCTION_VERSION};
pub use photo::{prepare_photo, sha256_hex, PhotoError, PreparedPhoto};
pub use subject_box::{BoxProblem, NormalizedBox};
pub use validate::{validate_description, DescriptionProblem, DescriptionRules};
