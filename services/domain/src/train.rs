//! Training settings: one variant per method, each with its own fields and the defaults of its
//! paper or reference code (the README says where we differ). `method` names the variant;
//! without it a spec means LoRA.
//!
//! ```json
//! {"method": "dreambooth", "steps": 1000, "train_text_encoder": true, "prior_preservation": true}
//! {"method": "textual_inversion", "num_vectors": 2}
//! {"method": "svdiff", "learning_rate_1d": 1e-6}
//! ```

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::spec_error::SpecError;

/// Restricting the loss to the subject mask (the paper's alternative to SID, for comparison):
/// every method can train this way, on the job's subject masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaskedLoss {
    /// How the masked loss is averaged.
    #[serde(default)]
    pub normalization: MaskNormalization,
    /// Weight of the loss outside the mask (OneTrainer's `unmasked_weight`; kohya's masked
    /// loss is 0).
    #[serde(default)]
    pub unmasked_weight: f64,
}

/// The two normalisations the open trainers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MaskNormalization {
    /// kohya sd-scripts: the weighted loss averaged over the whole latent, so a small subject
    /// trains with a small loss.
    #[default]
    Kohya,
    /// OneTrainer's `normalize_masked_area_loss`: divided by the mask's mean, so the loss per
    /// subject pixel does not depend on the subject's size.
    MaskedArea,
}

/// Which cross-attention weights Custom Diffusion trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CrossAttentionWeights {
    /// `to_k` and `to_v` of every cross-attention (the paper's choice, `crossattn_kv`).
    #[default]
    KeyValue,
    /// Also `to_q` and `to_out` (`crossattn`).
    All,
}

/// Precision of the optimizer's moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerState {
    #[default]
    F32,
    /// Half the optimizer memory of full fine-tuning.
    Bf16,
}

fn d_steps_1000() -> u32 {
    1000
}
fn d_true() -> bool {
    true
}
fn d_prior_weight() -> f64 {
    1.0
}
fn d_class_images_100() -> u32 {
    100
}
fn d_rank() -> u32 {
    4
}
fn d_lr_lora() -> f64 {
    1e-4
}
fn d_ti_steps() -> u32 {
    3000
}
fn d_ti_lr() -> f64 {
    2e-3
}
fn d_one() -> u32 {
    1
}
fn d_cd_steps() -> u32 {
    500
}
fn d_cd_lr() -> f64 {
    1e-5
}
fn d_class_images_200() -> u32 {
    200
}
fn d_svdiff_lr() -> f64 {
    1e-3
}
fn d_svdiff_lr_1d() -> f64 {
    1e-6
}

/// LoRA (DreamBooth with low-rank adapters), diffusers' `train_dreambooth_lora.py` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default = "d_steps_1000")]
    pub steps: u32,
    #[serde(default = "d_lr_lora")]
    pub learning_rate: f64,
    #[serde(default)]
    pub seed: u64,
    /// Rank of the adapters.
    #[serde(default = "d_rank")]
    pub rank: u32,
    /// Also adapt the text encoder's attention.
    #[serde(default)]
    pub train_text_encoder: bool,
    /// DreamBooth's class-prior preservation loss.
    #[serde(default)]
    pub prior_preservation: bool,
    #[serde(default = "d_prior_weight")]
    pub prior_loss_weight: f64,
    /// Class images sampled from the base model for prior preservation.
    #[serde(default = "d_class_images_100")]
    pub num_class_images: u32,
    /// Recompute the UNet's blocks (and the text encoder's layers, when it trains) in the
    /// backward pass instead of keeping their activations: less memory for about a third more
    /// compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_loss: Option<MaskedLoss>,
}

/// DreamBooth, full fine-tuning of the UNet and (by default) the text encoder with class-prior
/// preservation: the paper's main method (diffusers' `train_dreambooth.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DreamboothSettings {
    #[serde(default = "d_steps_1000")]
    pub steps: u32,
    /// Default 2e-6 with the text encoder (diffusers' recipe for training both), 5e-6
    /// without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_true")]
    pub train_text_encoder: bool,
    #[serde(default = "d_true")]
    pub prior_preservation: bool,
    #[serde(default = "d_prior_weight")]
    pub prior_loss_weight: f64,
    #[serde(default = "d_class_images_100")]
    pub num_class_images: u32,
    /// Precision of the optimizer's moments (bf16 halves their memory).
    #[serde(default)]
    pub optimizer_state: OptimizerState,
    /// Also write a single-file checkpoint in the original Stable Diffusion layout (A1111,
    /// ComfyUI) beside the diffusers pipeline.
    #[serde(default)]
    pub single_file: bool,
    /// Recompute the UNet's blocks (and the text encoder's layers, when it trains) in the
    /// backward pass instead of keeping their activations: less memory for about a third more
    /// compute (on by default: full fine-tuning is where memory runs out).
    #[serde(default = "d_true")]
    pub gradient_checkpointing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_loss: Option<MaskedLoss>,
}

impl DreamboothSettings {
    pub fn effective_learning_rate(&self) -> f64 {
        self.learning_rate
            .unwrap_or(if self.train_text_encoder { 2e-6 } else { 5e-6 })
    }
}

/// Textual Inversion: a new token `<{token}>` whose embedding alone learns. Defaults from
/// diffusers' textual inversion example: 3000 steps at 5e-4 scaled by its batch of 4
/// (2e-3 at our batch 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextualInversionSettings {
    #[serde(default = "d_ti_steps")]
    pub steps: u32,
    #[serde(default = "d_ti_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub seed: u64,
    /// Embedding vectors of the new token.
    #[serde(default = "d_one")]
    pub num_vectors: u32,
    /// The word whose embedding initialises the token (default: the subject class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer: Option<String>,
    /// Also write the embedding in the A1111 layout (`<sks>.safetensors`, the prompt word being
    /// the file name there).
    #[serde(default)]
    pub a1111: bool,
    /// Recompute the UNet's blocks (and the text encoder's layers, when it trains) in the
    /// backward pass instead of keeping their activations: less memory for about a third more
    /// compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_loss: Option<MaskedLoss>,
}

/// Custom Diffusion: the cross-attention keys and values plus a new token `<{token}>`, with
/// its rescaling augmentation and class-prior preservation. Defaults from diffusers'
/// `train_custom_diffusion.py` example (250 steps at batch 2, 1e-5): 500 steps at batch 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomDiffusionSettings {
    #[serde(default = "d_cd_steps")]
    pub steps: u32,
    #[serde(default = "d_cd_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub weights: CrossAttentionWeights,
    /// The "very small" / "close up" rescaling augmentation with its loss mask.
    #[serde(default = "d_true")]
    pub augment: bool,
    #[serde(default = "d_true")]
    pub prior_preservation: bool,
    #[serde(default = "d_prior_weight")]
    pub prior_loss_weight: f64,
    #[serde(default = "d_class_images_200")]
    pub num_class_images: u32,
    /// Recompute the UNet's blocks (and the text encoder's layers, when it trains) in the
    /// backward pass instead of keeping their activations: less memory for about a third more
    /// compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_loss: Option<MaskedLoss>,
}

/// SVDiff: spectral shifts of every UNet weight (`W = U diag(relu(s + delta)) Vt`), optionally
/// of the text encoder, with the reference code's two learning rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SvdiffSettings {
    #[serde(default = "d_steps_1000")]
    pub steps: u32,
    /// For the shifts of matrices and kernels.
    #[serde(default = "d_svdiff_lr")]
    pub learning_rate: f64,
    /// For the shifts of 1-D weights (norm scales).
    #[serde(default = "d_svdiff_lr_1d")]
    pub learning_rate_1d: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub train_text_encoder: bool,
    #[serde(default)]
    pub prior_preservation: bool,
    #[serde(default = "d_prior_weight")]
    pub prior_loss_weight: f64,
    #[serde(default = "d_class_images_100")]
    pub num_class_images: u32,
    /// Also write a merged diffusers pipeline for tools without an SVDiff loader.
    #[serde(default)]
    pub merged_pipeline: bool,
    /// Recompute the UNet's blocks (and the text encoder's layers, when it trains) in the
    /// backward pass instead of keeping their activations: less memory for about a third more
    /// compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_loss: Option<MaskedLoss>,
}

/// The training settings of a job; `method` says which variant.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum TrainSettings {
    Lora(LoraSettings),
    Dreambooth(DreamboothSettings),
    TextualInversion(TextualInversionSettings),
    CustomDiffusion(CustomDiffusionSettings),
    Svdiff(SvdiffSettings),
}

/// The same, as serde reads it (the method tag is required there).
#[derive(Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
enum Tagged {
    Lora(LoraSettings),
    Dreambooth(DreamboothSettings),
    TextualInversion(TextualInversionSettings),
    CustomDiffusion(CustomDiffusionSettings),
    Svdiff(SvdiffSettings),
}

impl<'de> Deserialize<'de> for TrainSettings {
    /// A spec without `method` means LoRA.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(d)?;
        if let serde_json::Value::Object(map) = &mut value {
            map.entry("method")
                .or_insert_with(|| serde_json::Value::String("lora".into()));
        }
        let tagged = Tagged::deserialize(value).map_err(serde::de::Error::custom)?;
        Ok(match tagged {
            Tagged::Lora(s) => TrainSettings::Lora(s),
            Tagged::Dreambooth(s) => TrainSettings::Dreambooth(s),
            Tagged::TextualInversion(s) => TrainSettings::TextualInversion(s),
            Tagged::CustomDiffusion(s) => TrainSettings::CustomDiffusion(s),
            Tagged::Svdiff(s) => TrainSettings::Svdiff(s),
        })
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("the defaults parse")
    }
}

/// A method's name, as the spec and the CLI spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainMethod {
    Lora,
    Dreambooth,
    TextualInversion,
    CustomDiffusion,
    Svdiff,
}

impl TrainMethod {
    pub const ALL: [TrainMethod; 5] = [
        TrainMethod::Lora,
        TrainMethod::Dreambooth,
        TrainMethod::TextualInversion,
        TrainMethod::CustomDiffusion,
        TrainMethod::Svdiff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TrainMethod::Lora => "lora",
            TrainMethod::Dreambooth => "dreambooth",
            TrainMethod::TextualInversion => "textual_inversion",
            TrainMethod::CustomDiffusion => "custom_diffusion",
            TrainMethod::Svdiff => "svdiff",
        }
    }

    pub fn parse(s: &str) -> Option<TrainMethod> {
        TrainMethod::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Methods that learn a new token `<{token}>` (prompts and descriptions use it instead of
    /// the bare token).
    pub fn learns_new_token(self) -> bool {
        matches!(
            self,
            TrainMethod::TextualInversion | TrainMethod::CustomDiffusion
        )
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), SpecError> {
    if value < min || value > max {
        return Err(SpecError::Invalid(format!(
            "train.{field} is {value}; it must be between {min} and {max}"
        )));
    }
    Ok(())
}

fn check_rate(field: &str, value: f64) -> Result<(), SpecError> {
    if value.is_nan() || value <= 0.0 || value > 1.0 {
        return Err(SpecError::Invalid(format!(
            "train.{field} is {value}; it must be in (0, 1]"
        )));
    }
    Ok(())
}

impl TrainSettings {
    pub fn method(&self) -> TrainMethod {
        match self {
            TrainSettings::Lora(_) => TrainMethod::Lora,
            TrainSettings::Dreambooth(_) => TrainMethod::Dreambooth,
            TrainSettings::TextualInversion(_) => TrainMethod::TextualInversion,
            TrainSettings::CustomDiffusion(_) => TrainMethod::CustomDiffusion,
            TrainSettings::Svdiff(_) => TrainMethod::Svdiff,
        }
    }

    pub fn steps(&self) -> u32 {
        match self {
            TrainSettings::Lora(s) => s.steps,
            TrainSettings::Dreambooth(s) => s.steps,
            TrainSettings::TextualInversion(s) => s.steps,
            TrainSettings::CustomDiffusion(s) => s.steps,
            TrainSettings::Svdiff(s) => s.steps,
        }
    }

    /// The base learning rate of the run (SVDiff's 1-D rate is a second group).
    pub fn learning_rate(&self) -> f64 {
        match self {
            TrainSettings::Lora(s) => s.learning_rate,
            TrainSettings::Dreambooth(s) => s.effective_learning_rate(),
            TrainSettings::TextualInversion(s) => s.learning_rate,
            TrainSettings::CustomDiffusion(s) => s.learning_rate,
            TrainSettings::Svdiff(s) => s.learning_rate,
        }
    }

    pub fn seed(&self) -> u64 {
        match self {
            TrainSettings::Lora(s) => s.seed,
            TrainSettings::Dreambooth(s) => s.seed,
            TrainSettings::TextualInversion(s) => s.seed,
            TrainSettings::CustomDiffusion(s) => s.seed,
            TrainSettings::Svdiff(s) => s.seed,
        }
    }

    /// `(prior loss weight, class images)` when the run uses class-prior preservation.
    pub fn prior(&self) -> Option<(f64, u32)> {
        let (on, weight, n) = match self {
            TrainSettings::Lora(s) => (
                s.prior_preservation,
                s.prior_loss_weight,
                s.num_class_images,
            ),
            TrainSettings::Dreambooth(s) => (
                s.prior_preservation,
                s.prior_loss_weight,
                s.num_class_images,
            ),
            TrainSettings::TextualInversion(_) => (false, 0.0, 0),
            TrainSettings::CustomDiffusion(s) => (
                s.prior_preservation,
                s.prior_loss_weight,
                s.num_class_images,
            ),
            TrainSettings::Svdiff(s) => (
                s.prior_preservation,
                s.prior_loss_weight,
                s.num_class_images,
            ),
        };
        on.then_some((weight, n))
    }

    pub fn gradient_checkpointing(&self) -> bool {
        match self {
            TrainSettings::Lora(s) => s.gradient_checkpointing,
            TrainSettings::Dreambooth(s) => s.gradient_checkpointing,
            TrainSettings::TextualInversion(s) => s.gradient_checkpointing,
            TrainSettings::CustomDiffusion(s) => s.gradient_checkpointing,
            TrainSettings::Svdiff(s) => s.gradient_checkpointing,
        }
    }

    pub fn masked_loss(&self) -> Option<&MaskedLoss> {
        match self {
            TrainSettings::Lora(s) => s.masked_loss.as_ref(),
            TrainSettings::Dreambooth(s) => s.masked_loss.as_ref(),
            TrainSettings::TextualInversion(s) => s.masked_loss.as_ref(),
            TrainSettings::CustomDiffusion(s) => s.masked_loss.as_ref(),
            TrainSettings::Svdiff(s) => s.masked_loss.as_ref(),
        }
    }

    /// Precision of the optimizer's moments (only DreamBooth, whose state is the size of the
    /// model, offers bf16).
    pub fn optimizer_state(&self) -> OptimizerState {
        match self {
            TrainSettings::Dreambooth(s) => s.optimizer_state,
            _ => OptimizerState::default(),
        }
    }

    /// The token prompts and descriptions use for this method: `<sks>` for the methods that
    /// learn a new token, the job's token otherwise.
    pub fn prompt_token(&self, token: &str) -> String {
        if self.method().learns_new_token() {
            format!("<{token}>")
        } else {
            token.to_owned()
        }
    }

    /// `text` with the job's token (as a whole word) replaced by [`Self::prompt_token`].
    pub fn rewrite_token(&self, text: &str, token: &str) -> String {
        let new = self.prompt_token(token);
        if new == token {
            return text.to_owned();
        }
        text.split(' ')
            .map(|w| if w == token { new.as_str() } else { w })
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        check_range("steps", self.steps(), 1, 20_000)?;
        check_rate("learning_rate", self.learning_rate())?;
        if let Some((weight, n)) = self.prior() {
            check_range("num_class_images", n, 1, 1000)?;
            if !(0.0..=100.0).contains(&weight) {
                return Err(SpecError::Invalid(format!(
                    "train.prior_loss_weight is {weight}; it must be between 0 and 100"
                )));
            }
        }
        if let Some(m) = self.masked_loss() {
            if !(0.0..=1.0).contains(&m.unmasked_weight) {
                return Err(SpecError::Invalid(format!(
                    "train.masked_loss.unmasked_weight is {}; it must be between 0 and 1",
                    m.unmasked_weight
                )));
            }
        }
        match self {
            TrainSettings::Lora(s) => check_range("rank", s.rank, 1, 256),
            TrainSettings::TextualInversion(s) => {
                check_range("num_vectors", s.num_vectors, 1, 16)?;
                match &s.initializer {
                    Some(w) if w.trim().is_empty() || w.split_whitespace().count() > 1 => Err(
                        SpecError::Invalid("train.initializer must be one word".into()),
                    ),
                    _ => Ok(()),
                }
            }
            TrainSettings::Svdiff(s) => check_rate("learning_rate_1d", s.learning_rate_1d),
            TrainSettings::Dreambooth(_) | TrainSettings::CustomDiffusion(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<TrainSettings, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn no_method_means_lora_with_its_defaults() {
        let s = parse(serde_json::json!({})).unwrap();
        assert_eq!(s.method(), TrainMethod::Lora);
        assert_eq!(
            (s.steps(), s.learning_rate(), s.prior()),
            (1000, 1e-4, None)
        );
        let TrainSettings::Lora(l) = &s else {
            unreachable!()
        };
        assert_eq!(l.rank, 4);
        assert_eq!(s, TrainSettings::default());
        // Written back, the method is named.
        assert_eq!(serde_json::to_value(&s).unwrap()["method"], "lora");
    }

    #[test]
    fn each_method_has_its_paper_defaults() {
        let db = parse(serde_json::json!({"method": "dreambooth"})).unwrap();
        assert_eq!(db.learning_rate(), 2e-6);
        assert_eq!(db.prior(), Some((1.0, 100)));
        let db = parse(serde_json::json!({"method": "dreambooth", "train_text_encoder": false}))
            .unwrap();
        assert_eq!(db.learning_rate(), 5e-6);
        let ti = parse(serde_json::json!({"method": "textual_inversion"})).unwrap();
        assert_eq!((ti.steps(), ti.prior()), (3000, None));
        let cd = parse(serde_json::json!({"method": "custom_diffusion"})).unwrap();
        assert_eq!(cd.prior(), Some((1.0, 200)));
        let sv = parse(serde_json::json!({"method": "svdiff"})).unwrap();
        let TrainSettings::Svdiff(s) = &sv else {
            unreachable!()
        };
        assert_eq!((s.learning_rate, s.learning_rate_1d), (1e-3, 1e-6));
        for s in [db, ti, cd, sv] {
            s.validate().unwrap();
        }
    }

    #[test]
    fn fields_of_another_method_are_refused() {
        let e = parse(serde_json::json!({"method": "textual_inversion", "rank": 4})).unwrap_err();
        assert!(e.to_string().contains("rank"), "{e}");
        assert!(parse(serde_json::json!({"method": "svdif"})).is_err());
        assert!(parse(serde_json::json!({"rank": 4, "num_vectors": 2})).is_err());
    }

    #[test]
    fn new_token_methods_rewrite_the_token() {
        let ti = parse(serde_json::json!({"method": "textual_inversion"})).unwrap();
        assert_eq!(
            ti.rewrite_token("a photo of sks dog on a sksy rug", "sks"),
            "a photo of <sks> dog on a sksy rug"
        );
        let lora = TrainSettings::default();
        assert_eq!(
            lora.rewrite_token("a photo of sks dog", "sks"),
            "a photo of sks dog"
        );
    }

    #[test]
    fn ranges_are_checked() {
        let bad = |v| parse(v).unwrap().validate().is_err();
        assert!(bad(serde_json::json!({"steps": 0})));
        assert!(bad(serde_json::json!({"rank": 0})));
        assert!(bad(
            serde_json::json!({"method": "svdiff", "learning_rate_1d": 0.0})
        ));
        assert!(bad(
            serde_json::json!({"method": "textual_inversion", "num_vectors": 0})
        ));
        assert!(bad(
            serde_json::json!({"masked_loss": {"unmasked_weight": 2.0}})
        ));
        assert!(bad(
            serde_json::json!({"prior_preservation": true, "num_class_images": 0})
        ));
        assert!(!bad(
            serde_json::json!({"masked_loss": {"normalization": "masked_area"}})
        ));
    }
}
