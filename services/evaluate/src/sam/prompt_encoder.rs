//! SAM's prompt encoder for box and point prompts (`PromptEncoder`).
//!
//! Prompts are positions in the model's input frame (the resized photo, before padding).
//! Each becomes random-Fourier features of its position (`PositionEmbeddingRandom`) plus a
//! learned embedding saying what it is: a box's top-left or bottom-right corner, a foreground
//! point, or the "not a point" padding that SamPredictor appends to point prompts given without
//! a box. Mask prompts are not supported: the decoder always gets the learned "no mask"
//! embedding as its dense prompt, so `mask_downscaling` is never loaded.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::SamConfig;

pub struct PromptEncoder {
    /// Side of the (square) model input, the frame prompt positions are normalised by.
    image_size: usize,
    embedding_size: usize,
    /// `pe_layer.positional_encoding_gaussian_matrix`, `[2, embed_dim / 2]`.
    gaussian: Tensor,
    /// `point_embeddings.{0..4}`: background point, foreground point, box corners; `[1, D]`.
    point_embeddings: Vec<Tensor>,
    not_a_point: Tensor,
    /// `no_mask_embed`, `[1, D]`.
    no_mask: Tensor,
}

impl PromptEncoder {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let d = cfg.prompt_embed_dim;
        let point_embeddings = (0..4)
            .map(|i| vb.get((1, d), &format!("point_embeddings.{i}.weight")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            image_size: cfg.image_size,
            embedding_size: cfg.embedding_size(),
            gaussian: vb.get((2, d / 2), "pe_layer.positional_encoding_gaussian_matrix")?,
            point_embeddings,
            not_a_point: vb.get((1, d), "not_a_point_embed.weight")?,
            no_mask: vb.get((1, d), "no_mask_embed.weight")?,
        })
    }

    /// `_pe_encoding`: positions in [0, 1]², `[N, 2]` (x, y), to `[N, D]`.
    fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        let c = coords
            .affine(2.0, -1.0)?
            .matmul(&self.gaussian)?
            .affine(2.0 * std::f64::consts::PI, 0.0)?;
        Tensor::cat(&[c.sin()?, c.cos()?], D::Minus1)
    }

    /// `get_dense_pe`: the encoding of every cell centre of the embedding grid,
    /// `[1, D, G, G]`.
    pub fn dense_pe(&self) -> Result<Tensor> {
        let g = self.embedding_size;
        let mut coords = Vec::with_capacity(g * g * 2);
        for i in 0..g {
            for j in 0..g {
                coords.push((j as f32 + 1.0 - 0.5) / g as f32);
                coords.push((i as f32 + 1.0 - 0.5) / g as f32);
            }
        }
        let coords = Tensor::from_vec(coords, (g * g, 2), self.gaussian.device())?;
        self.pe_encoding(&coords)?
            .reshape((g, g, ()))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()
    }

    /// `no_mask_embed` as the dense prompt, `[1, D, 1, 1]` (broadcast over the grid).
    pub fn dense_no_mask(&self) -> Result<Tensor> {
        self.no_mask.reshape((1, (), 1, 1))
    }

    /// Sparse embeddings of box prompts `[x0, y0, x1, y1]` in the input frame, `[n, 2, D]`.
    /// Positions are float32 from the start, as SamPredictor passes its box tensor.
    pub fn embed_boxes(&self, boxes: &[[f32; 4]]) -> Result<Tensor> {
        let size = self.image_size as f32;
        let coords: Vec<f32> = boxes
            .iter()
            .flat_map(|b| b.map(|v| (v + 0.5) / size))
            .collect();
        let n = boxes.len();
        let coords = Tensor::from_vec(coords, (2 * n, 2), self.gaussian.device())?;
        let pe = self.pe_encoding(&coords)?.reshape((n, 2, ()))?;
        let corners = Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0)?;
        pe.broadcast_add(&corners.unsqueeze(0)?)
    }

    /// Sparse embeddings of one foreground point per prompt (input frame), padded with the
    /// "not a point" token as SamPredictor does without a box: `[n, 2, D]`. Positions stay
    /// float64 until normalised, as the automatic mask generator's point tensor does.
    pub fn embed_points(&self, points: &[[f64; 2]]) -> Result<Tensor> {
        let size = self.image_size as f64;
        let coords: Vec<f32> = points
            .iter()
            .flat_map(|p| p.map(|v| ((v + 0.5) / size) as f32))
            .collect();
        let n = points.len();
        let coords = Tensor::from_vec(coords, (n, 2), self.gaussian.device())?;
        let pe = self
            .pe_encoding(&coords)?
            .broadcast_add(&self.point_embeddings[1])?;
        let pad = self.not_a_point.broadcast_as(pe.shape())?;
        Tensor::stack(&[pe, pad.contiguous()?], 1)
    }
}
