//! sidbooth diffusion engine: Stable Diffusion 1.x / 2.x on candle, a plain synchronous library.
//!
//! # Public API
//!
//! Inference half:
//! - [`config`]: [`config::ModelDir::open`] parses a diffusers directory (`model_index.json`,
//!   `unet/`, `text_encoder/`, `vae/`, `scheduler/`, `tokenizer/`) into [`config::UNetConfig`],
//!   [`config::ClipTextConfig`], [`config::VaeConfig`], [`config::SchedulerConfig`];
//!   [`config::Variant`] picks `*.safetensors` or `*.fp16.safetensors`.
//! - [`nn`]: differentiable layers. [`nn::Linear`] (`weight [out,in]`, `bias`, optional
//!   [`nn::LoraAdapter`] `{ down [rank,in], up [out,rank], scale }`, forward
//!   `x Wᵀ + b + scale·(x downᵀ) upᵀ`), [`nn::Conv2d`], [`nn::LayerNorm`], [`nn::GroupNorm`],
//!   [`nn::softmax_last`], [`nn::VisitLinears`].
//! - [`mapped`]: weight files mapped into memory, served without a copy in processes whose
//!   global allocator is [`mapped::MappedAware`] (the sidbooth binaries install it).
//! - [`weights`]: `VarBuilder`s over safetensors ([`weights::from_safetensors`]), tensor maps such
//!   as a `VarMap`'s `Var`s ([`weights::from_tensors`]) or seeded random weights
//!   ([`weights::seeded`]); each returns a [`weights::Record`] of every tensor fetched.
//! - [`clip::ClipTextModel`]: `new(vb, &cfg)`, `forward(ids [B,N]) -> [B,N,hidden]`
//!   (last_hidden_state), `linears_mut() -> Vec<(String, &mut Linear)>` with names like
//!   `text_model.encoder.layers.0.self_attn.q_proj`, `named_weights()`, `token_embedding`,
//!   `resize_token_embeddings(vocab, init_from)` (textual inversion).
//! - [`unet::UNet2DConditionModel`]: `new(vb, &cfg)`, `forward(sample, timesteps, context)`,
//!   `forward_with(.., Option<&mut AttentionRecorder>)`, `linears_mut()` with names like
//!   `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` / `...attn2.to_out.0`,
//!   `named_weights()`.
//! - [`vae::AutoencoderKL`]: `encode(images in [-1,1]) -> DiagonalGaussian`, `decode(latents)`
//!   (unscaled), `encode_latents(images, noise)` (scaled by `scaling_factor`, for training).
//! - [`scheduler::DdimScheduler`]: diffusers' DDIM (`set_timesteps`, `step`), plus the training
//!   helpers `add_noise(x0, noise, t)`, `velocity(x0, noise, t)`, `target(..)`.
//! - [`tokenizer::ClipTokenizer`]: `from_dir`, `encode(prompt) -> Vec<u32>` (padded to 77),
//!   `token_positions(prompt, word)`, `add_token(placeholder) -> id`.
//! - [`attention::AttentionRecorder`] and [`attention::save_heatmap_png`].
//! - [`lora`]: key naming shared with the exporter ([`lora::key_for`], [`lora::parse_key`],
//!   `unet.<module>.lora_A.weight` / `lora_B.weight`), alpha from the safetensors metadata entry
//!   [`lora::ADAPTER_METADATA_KEY`] (`{"unet.r": 4, "unet.lora_alpha": 8, ...}`, as diffusers'
//!   `save_lora_weights` writes it) or per-module `.alpha` tensors; [`lora::load_lora`] /
//!   [`lora::apply_lora`] attach a file's adapters (`StableDiffusion::load_lora` does both).
//! - [`pipeline::StableDiffusion`]: `load(dir, &LoadOptions)`, `from_parts`, `encode_prompt`,
//!   `generate(&GenerateRequest, progress, cancel) -> GenerateOutput { images, attention_maps, latents }`;
//!   [`pipeline::initial_latents`] documents the seeded RNG.
//! - [`tiny::TinyModel`]: a seeded tiny SD (builds in milliseconds), `save_diffusers_dir`.
//!
//! Full fine-tuning: build a model from `Var`s with [`weights::from_tensors`] (e.g. the
//! `named_weights()` of a loaded model turned into `Var`s); every weight then receives a gradient
//! (`tests/tiny.rs` checks this for the UNet and the text encoder).
//!
//! Tests: `cargo test -p sidbooth-engine` (unit tests, `tests/parity.rs` against diffusers
//! fixtures written by `scripts/parity/make_fixtures.py`, `tests/tiny.rs` end to end).
//! Benchmarks: `examples/bench.rs` (tiny, CPU) vs `scripts/parity/bench_diffusers.py`;
//! `examples/bench_sd21.rs` + `scripts/gpu/bench_sd21.sh` (SD 2.1-base sized, GPU).
//!
//! Training half: [`train`].

// `usize::is_multiple_of` is newer than the workspace's rust-version.
#![allow(clippy::manual_is_multiple_of)]

pub mod attention;
pub mod clip;
pub mod config;
pub mod error;
pub mod kernels;
pub mod lora;
pub mod mapped;
pub mod nn;
pub mod pipeline;
pub mod png_text;
pub mod recompute;
pub mod scheduler;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{is_transient_failure, Error, Result};
