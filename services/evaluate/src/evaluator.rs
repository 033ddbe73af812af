//! The evaluation models together, and the features the measures compare.
//!
//! [`Evaluators`] holds CLIP, DINO and SAM, each optional, loaded from local directories or
//! built from a seed ([`Evaluators::tiny`], for tests and demos: numbers made with them say
//! nothing). Every measure needs CLIP; masks need SAM. Feature extraction batches images so the
//! models run on many at once.

use std::path::Path;

use candle_core::Device;
use image::RgbImage;
use sidbooth_domain::report::ModelEntry;

use crate::clip::ClipModel;
use crate::dino::DinoModel;
use crate::error::{EvalError, Result};
use crate::mask::Mask;
use crate::measures::{attention_on_subject, ImageFeatures, ReferenceFeatures};
use crate::sam::Sam;
use crate::segments::{non_subject_segment, subject_segment};

/// An attention map: its values in row-major order and its size `(h, w)`.
pub type AttentionMap<'a> = (&'a [f32], (usize, usize));

pub struct Evaluators {
    pub clip: Option<ClipModel>,
    pub dino: Option<DinoModel>,
    pub sam: Option<Sam>,
    /// What the report names as the models used.
    pub models: Vec<ModelEntry>,
}

impl std::fmt::Debug for Evaluators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluators")
            .field("models", &self.models)
            .finish()
    }
}

fn entry(role: &str, name: String, random_weights: bool) -> ModelEntry {
    ModelEntry {
        role: role.to_owned(),
        name,
        random_weights,
    }
}

impl Evaluators {
    /// Loads the models from the directories given.
    pub fn load(
        clip: Option<&Path>,
        dino: Option<&Path>,
        sam: Option<&Path>,
        device: &Device,
    ) -> Result<Self> {
        let mut models = Vec::new();
        let clip = match clip {
            Some(dir) => {
                models.push(entry("clip", dir.display().to_string(), false));
                Some(ClipModel::load(dir, device)?)
            }
            None => None,
        };
        let dino = match dino {
            Some(dir) => {
                models.push(entry("dino", dir.display().to_string(), false));
                Some(DinoModel::load(dir, device)?)
            }
            None => None,
        };
        let sam = match sam {
            Some(dir) => {
                models.push(entry("sam", dir.display().to_string(), false));
                Some(Sam::load(dir, device)?)
            }
            None => None,
        };
        Ok(Self {
            clip,
            dino,
            sam,
            models,
        })
    }

    /// Tiny CLIP, DINO and SAM with random weights from `seed`: the whole evaluation runs in
    /// seconds on a CPU, and its numbers mean nothing (the report says so).
    pub fn tiny(seed: u64, device: &Device) -> Result<Self> {
        let name = |m: &str| format!("sidbooth-tiny-{m}-{seed}");
        Ok(Self {
            clip: Some(ClipModel::tiny(seed, device)?),
            dino: Some(DinoModel::tiny(seed, device)?),
            sam: Some(Sam::tiny(seed, device)?),
            models: vec![
                entry("clip", name("clip"), true),
                entry("dino", name("dino"), true),
                entry("sam", name("sam"), true),
            ],
        })
    }

    /// True when any model has random weights.
    pub fn random_weights(&self) -> bool {
        self.models.iter().any(|m| m.random_weights)
    }

    /// CLIP, which every measure needs.
    pub fn clip(&self) -> Result<&ClipModel> {
        self.clip.as_ref().ok_or_else(|| {
            EvalError::Invalid(
                "no CLIP model: every measure needs one (a directory in the layout of \
                 openai/clip-vit-base-patch32)"
                    .into(),
            )
        })
    }

    /// CLIP (and DINO) embeddings of the references and, where a photo has a mask, of its
    /// subject and non-subject segments. `photos[i]` pairs with `masks[i]`.
    pub fn reference_features(
        &self,
        photos: &[RgbImage],
        masks: &[Option<&Mask>],
    ) -> Result<Vec<ReferenceFeatures>> {
        assert_eq!(photos.len(), masks.len(), "one mask slot per photo");
        let clip = self.clip()?.image_embeddings(photos)?;
        let dino = match &self.dino {
            Some(d) => Some(d.image_embeddings(photos)?),
            None => None,
        };
        // Segments of the photos whose mask has a subject pixel, in photo order.
        let mut segmented = Vec::new();
        let mut segments = Vec::new();
        for (i, (photo, mask)) in photos.iter().zip(masks).enumerate() {
            if let Some(mask) = mask {
                if let Some(subject) = subject_segment(photo, mask) {
                    segmented.push(i);
                    segments.push(subject);
                    segments.push(non_subject_segment(photo, mask));
                }
            }
        }
        let segment_embeddings = if segments.is_empty() {
            Vec::new()
        } else {
            self.clip()?.image_embeddings(&segments)?
        };
        let mut out: Vec<ReferenceFeatures> = clip
            .into_iter()
            .enumerate()
            .map(|(i, clip)| ReferenceFeatures {
                clip,
                dino: dino.as_ref().map(|d| d[i].clone()),
                subject: None,
                non_subject: None,
            })
            .collect();
        for (k, &i) in segmented.iter().enumerate() {
            out[i].subject = Some(segment_embeddings[2 * k].clone());
            out[i].non_subject = Some(segment_embeddings[2 * k + 1].clone());
        }
        Ok(out)
    }

    /// CLIP (and DINO) embeddings of generated images, and the share of each image's attention
    /// map inside its subject mask where it has both (`attention[i]`: the map and its size;
    /// `masks[i]`: the generated image's subject mask).
    pub fn image_features(
        &self,
        images: &[RgbImage],
        attention: &[Option<AttentionMap<'_>>],
        masks: &[Option<&Mask>],
    ) -> Result<Vec<ImageFeatures>> {
        assert!(attention.len() == images.len() && masks.len() == images.len());
        let clip = self.clip()?.image_embeddings(images)?;
        let dino = match &self.dino {
            Some(d) => Some(d.image_embeddings(images)?),
            None => None,
        };
        Ok(clip
            .into_iter()
            .enumerate()
            .map(|(i, clip)| ImageFeatures {
                clip,
                dino: dino.as_ref().map(|d| d[i].clone()),
                attention_on_subject: match (attention[i], masks[i]) {
                    (Some((map, size)), Some(mask)) => attention_on_subject(map, size, mask),
                    _ => None,
                },
            })
            .collect())
    }

    /// CLIP text embeddings of prompts (pass them without the identifier).
    pub fn text_features(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.clip()?.text_embeddings(&refs)
    }
}
