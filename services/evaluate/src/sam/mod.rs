//! Segment Anything (SAM) on candle: box and point prompts ([`Sam::predict_boxes`],
//! [`Sam::mask_for_box`], as Grounded-SAM prompts it) and automatic mask proposals
//! ([`Sam::proposals`]).
//!
//! The modules follow segment-anything's: [`image_encoder`] (ViT), [`prompt_encoder`],
//! [`mask_decoder`] with its [`transformer`], [`transforms`] for `SamPredictor`'s pre- and
//! postprocessing, [`automatic`] for `SamAutomaticMaskGenerator`. Every size comes from a
//! [`SamConfig`], so the tests run a tiny SAM through the same code as ViT-B.
//!
//! A SAM directory holds the weights in the facebookresearch key layout
//! (`image_encoder.blocks.0.attn.qkv.weight`, `prompt_encoder.pe_layer...`,
//! `mask_decoder.transformer.layers.0...`) as `model.safetensors`, or as the only
//! `*.safetensors` file of the directory (`sam_vit_b_01ec64.safetensors`), and optionally our
//! `config.json` ([`SamConfig`]; ViT-B without it). A missing tensor is an error naming it.

pub mod automatic;
mod checkpoint;
pub mod config;
pub mod image_encoder;
pub mod mask_decoder;
pub mod predict;
pub mod prompt_encoder;
pub mod rel_pos;
pub mod transformer;
pub mod transforms;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use sidbooth_engine::kernels::on_compute_threads;
use sidbooth_engine::weights::{save_safetensors, seeded};

pub use automatic::{Proposal, ProposalSettings};
pub use config::SamConfig;
pub use predict::Prediction;

use crate::error::{EvalError, Result};
use crate::mask::{Mask, PixelBox};
use image_encoder::ImageEncoder;
use mask_decoder::MaskDecoder;
use prompt_encoder::PromptEncoder;
use transforms::{model_input, to_input_frame, Postprocess};

/// `Sam.mask_threshold`: a pixel belongs to a mask where its logit is above this.
pub const MASK_THRESHOLD: f32 = 0.0;

/// A loaded SAM model.
pub struct Sam {
    cfg: SamConfig,
    device: Device,
    encoder: ImageEncoder,
    prompt_encoder: PromptEncoder,
    decoder: MaskDecoder,
    /// `prompt_encoder.get_dense_pe()`, the same for every image.
    dense_pe: Tensor,
}

/// The encoder's view of one photo: what every prompt on it is decoded against.
#[derive(Debug, Clone)]
pub struct ImageEmbedding {
    /// `[1, prompt_embed_dim, G, G]`.
    pub features: Tensor,
    /// `(height, width)` of the photo.
    pub original_size: (usize, usize),
    /// `(height, width)` of the resized photo inside the padded model input.
    pub input_size: (usize, usize),
}

impl Sam {
    /// Loads a SAM directory (see the module documentation).
    pub fn load(dir: &Path, device: &Device) -> Result<Sam> {
        let cfg = checkpoint::read_config(dir)?;
        let weights = checkpoint::weights_file(dir)?;
        let vb = checkpoint::open(&weights, device)?;
        Sam::build(vb, cfg, device).map_err(|e| EvalError::loading(&weights, e))
    }

    /// The tiny model ([`SamConfig::tiny`]) with seeded random weights: fast, deterministic,
    /// meaningless masks.
    pub fn tiny(seed: u64, device: &Device) -> Result<Sam> {
        Sam::seeded(SamConfig::tiny(), seed, device)
    }

    /// A model of any size with seeded random weights (benchmarks: ViT-B's cost without its
    /// checkpoint).
    pub fn seeded(cfg: SamConfig, seed: u64, device: &Device) -> Result<Sam> {
        cfg.validate().map_err(EvalError::Invalid)?;
        let (vb, _) = seeded(seed, DType::F32, device);
        Ok(Sam::build(vb, cfg, device)?)
    }

    /// Writes the tiny model of `seed` as a directory [`Sam::load`] reads.
    pub fn write_tiny_dir(seed: u64, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let (vb, record) = seeded(seed, DType::F32, &Device::Cpu);
        Sam::build(vb, SamConfig::tiny(), &Device::Cpu)?;
        save_safetensors(&record.take(), DType::F32, &dir.join("model.safetensors"))?;
        let config = dir.join("config.json");
        let json = serde_json::to_string_pretty(&SamConfig::tiny())
            .map_err(|e| EvalError::config(&config, e.to_string()))?;
        std::fs::write(&config, json).map_err(|e| EvalError::io(&config, e))
    }

    fn build(vb: VarBuilder, cfg: SamConfig, device: &Device) -> candle_core::Result<Sam> {
        let encoder = ImageEncoder::load(vb.pp("image_encoder"), &cfg)?;
        let prompt_encoder = PromptEncoder::load(vb.pp("prompt_encoder"), &cfg)?;
        let decoder = MaskDecoder::load(vb.pp("mask_decoder"), &cfg)?;
        let dense_pe = prompt_encoder.dense_pe()?;
        Ok(Sam {
            cfg,
            device: device.clone(),
            encoder,
            prompt_encoder,
            decoder,
            dense_pe,
        })
    }

    pub fn config(&self) -> &SamConfig {
        &self.cfg
    }

    /// The normalised, padded model input `[1, 3, S, S]` of a photo and the size
    /// `(height, width)` of the resized photo inside it.
    pub fn preprocess(&self, photo: &RgbImage) -> Result<(Tensor, (usize, usize))> {
        if photo.width() == 0 || photo.height() == 0 {
            return Err(EvalError::Image("SAM cannot embed an empty image".into()));
        }
        Ok(model_input(photo, &self.cfg, &self.device)?)
    }

    /// `SamPredictor.set_image`: runs the image encoder on a photo.
    pub fn embed(&self, photo: &RgbImage) -> Result<ImageEmbedding> {
        let (input, input_size) = self.preprocess(photo)?;
        Ok(ImageEmbedding {
            // On the engine's CPU threads, as every model pass (see `on_compute_threads`).
            features: on_compute_threads(&self.device, || self.encoder.forward(&input))?,
            original_size: (photo.height() as usize, photo.width() as usize),
            input_size,
        })
    }

    /// Masks for box prompts in the photo's pixel coordinates, one prompt per box, as
    /// `SamPredictor.predict(box=...)` makes them.
    pub fn predict_boxes(
        &self,
        emb: &ImageEmbedding,
        boxes: &[PixelBox],
        multimask: bool,
    ) -> Result<Prediction> {
        if boxes.is_empty() {
            return Err(EvalError::Invalid(
                "predict_boxes needs at least one box".into(),
            ));
        }
        let frame = |x: f32, y: f32| {
            to_input_frame(
                [f64::from(x), f64::from(y)],
                emb.original_size,
                emb.input_size,
            )
            .map(|v| v as f32)
        };
        let input_boxes: Vec<[f32; 4]> = boxes
            .iter()
            .map(|b| {
                let ([x0, y0], [x1, y1]) = (frame(b.x0, b.y0), frame(b.x1, b.y1));
                [x0, y0, x1, y1]
            })
            .collect();
        let sparse = self.prompt_encoder.embed_boxes(&input_boxes)?;
        self.decode(emb, &sparse, multimask)
    }

    /// Masks for single foreground points `[x, y]` in the photo's pixel coordinates, one
    /// prompt per point, as the automatic mask generator prompts them.
    pub fn predict_points(
        &self,
        emb: &ImageEmbedding,
        points: &[[f64; 2]],
        multimask: bool,
    ) -> Result<Prediction> {
        if points.is_empty() {
            return Err(EvalError::Invalid(
                "predict_points needs at least one point".into(),
            ));
        }
        let input_points: Vec<[f64; 2]> = points
            .iter()
            .map(|&p| to_input_frame(p, emb.original_size, emb.input_size))
            .collect();
        let sparse = self.prompt_encoder.embed_points(&input_points)?;
        self.decode(emb, &sparse, multimask)
    }

    /// The subject mask of one box, as Grounded-SAM asks for it (`multimask_output=False`).
    pub fn mask_for_box(&self, photo: &RgbImage, b: PixelBox) -> Result<Mask> {
        let emb = self.embed(photo)?;
        self.predict_boxes(&emb, &[b], false)?.mask(0, 0)
    }

    fn decode(&self, emb: &ImageEmbedding, sparse: &Tensor, multimask: bool) -> Result<Prediction> {
        let dense = self.prompt_encoder.dense_no_mask()?;
        let (low_res_logits, iou_predictions) = on_compute_threads(&self.device, || {
            self.decoder
                .forward(&emb.features, &self.dense_pe, sparse, &dense, multimask)
        })?;
        Ok(Prediction {
            low_res_logits,
            iou_predictions,
            post: Postprocess::new(
                self.cfg.low_res_size(),
                self.cfg.image_size,
                emb.input_size,
                emb.original_size,
            ),
            original_size: emb.original_size,
        })
    }
}
