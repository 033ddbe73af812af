//! SAM's image encoder: a ViTDet-style ViT (`ImageEncoderViT`) with windowed and global
//! attention blocks, decomposed relative positions, and a convolutional neck down to
//! `prompt_embed_dim` channels.
//!
//! Tokens stay channels-last (`[B, H, W, C]`) as in the reference, so the neck's 1×1
//! convolution and its `LayerNorm2d`s are a matrix product and a layer norm over the last axis.
//! Global attention over ViT-B's 64² grid would hold 12 × 4096 × 4096 scores at once; it is
//! computed a few query rows at a time instead ([`SCORE_BUDGET`]).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use sidbooth_engine::nn::{gelu, softmax_last, Conv2d, LayerNorm, Linear};

use super::config::SamConfig;
use super::rel_pos::get_rel_pos;

/// `partial(nn.LayerNorm, eps=1e-6)` of `build_sam.py`, also `LayerNorm2d`'s eps.
const NORM_EPS: f64 = 1e-6;

/// Most attention scores (f32 elements) one chunk of queries may hold: 64 MiB.
const SCORE_BUDGET: usize = 1 << 24;

pub struct ImageEncoder {
    patch_size: usize,
    /// `patch_embed.proj` as a matrix `[embed_dim, 3 * p * p]`, and its bias.
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// `[1, G, G, embed_dim]`.
    pos_embed: Tensor,
    blocks: Vec<Block>,
    /// `neck.0` (1×1, no bias) as a matrix `[out, embed_dim]`.
    neck_proj: Tensor,
    neck_norm1: LayerNorm,
    neck_conv: Conv2d,
    neck_norm2: LayerNorm,
}

impl ImageEncoder {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let (d, p, g, out) = (
            cfg.encoder_embed_dim,
            cfg.vit_patch_size,
            cfg.embedding_size(),
            cfg.prompt_embed_dim,
        );
        let pe = vb.pp("patch_embed.proj");
        let patch_weight = pe.get((d, 3, p, p), "weight")?.reshape((d, 3 * p * p))?;
        let patch_bias = pe.get(d, "bias")?;
        let pos_embed = vb.get((1, g, g, d), "pos_embed")?;
        let blocks = (0..cfg.encoder_depth)
            .map(|i| {
                let global = cfg.window_size == 0 || cfg.encoder_global_attn_indexes.contains(&i);
                let window = if global { 0 } else { cfg.window_size };
                Block::load(vb.pp(format!("blocks.{i}")), cfg, window)
            })
            .collect::<Result<Vec<_>>>()?;
        let neck = vb.pp("neck");
        let neck_proj = neck.get((out, d, 1, 1), "0.weight")?.reshape((out, d))?;
        let neck_conv = Conv2d {
            name: format!("{}.2", neck.prefix()),
            weight: neck.get((out, out, 3, 3), "2.weight")?,
            bias: None,
            stride: 1,
            padding: 1,
        };
        Ok(Self {
            patch_size: p,
            patch_weight,
            patch_bias,
            pos_embed,
            blocks,
            neck_proj,
            neck_norm1: LayerNorm::load(neck.pp("1"), out, NORM_EPS)?,
            neck_conv,
            neck_norm2: LayerNorm::load(neck.pp("3"), out, NORM_EPS)?,
        })
    }

    /// `[B, 3, S, S]` normalised, padded images to the embedding `[B, prompt_embed_dim, G, G]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.patch_embed(x)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = x.broadcast_matmul(&self.neck_proj.t()?)?;
        let x = self.neck_norm1.forward(&x)?.permute((0, 3, 1, 2))?;
        let x = self
            .neck_conv
            .forward(&x.contiguous()?)?
            .permute((0, 2, 3, 1))?;
        self.neck_norm2
            .forward(&x)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// The stride-`p` `p`×`p` convolution on non-overlapping patches, as one matrix product;
    /// channels-last output `[B, G, G, embed_dim]`.
    fn patch_embed(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?
            .reshape((b, gh, gw, ()))
    }
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    /// 0 for global attention.
    window: usize,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &SamConfig, window: usize) -> Result<Self> {
        let d = cfg.encoder_embed_dim;
        let size = if window == 0 {
            cfg.embedding_size()
        } else {
            window
        };
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), d, NORM_EPS)?,
            attn: Attention::load(vb.pp("attn"), d, cfg.encoder_num_heads, size)?,
            norm2: LayerNorm::load(vb.pp("norm2"), d, NORM_EPS)?,
            lin1: Linear::load(mlp.pp("lin1"), d, cfg.encoder_mlp_dim(), true)?,
            lin2: Linear::load(mlp.pp("lin2"), cfg.encoder_mlp_dim(), d, true)?,
            window,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let h = if self.window == 0 {
            self.attn.forward(&h)?
        } else {
            let (_, gh, gw, _) = h.dims4()?;
            let (windows, padded) = window_partition(&h, self.window)?;
            window_unpartition(&self.attn.forward(&windows)?, self.window, padded, (gh, gw))?
        };
        let x = (x + h)?;
        let m = self
            .lin2
            .forward(&gelu(&self.lin1.forward(&self.norm2.forward(&x)?)?)?)?;
        x + m
    }
}

/// Pads `[B, H, W, C]` with zeros at the bottom and right to multiples of `ws` and cuts it into
/// `[B * windows, ws, ws, C]`; also returns the padded size.
fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let x = x
        .pad_with_zeros(1, 0, hp - h)?
        .pad_with_zeros(2, 0, wp - w)?;
    let windows = x
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))?;
    Ok((windows, (hp, wp)))
}

/// The inverse of [`window_partition`], dropping the padding.
fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    (hp, wp): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let c = windows.dim(D::Minus1)?;
    let b = windows.dim(0)? / ((hp / ws) * (wp / ws));
    windows
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, hp, wp, c))?
        .narrow(1, 0, h)?
        .narrow(2, 0, w)?
        .contiguous()
}

/// Multi-head self-attention over an `S`×`S` grid with decomposed relative positions.
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    /// `get_rel_pos` of both axes for this grid, `[S, S, head_dim]`.
    rel_h: Tensor,
    rel_w: Tensor,
}

impl Attention {
    fn load(vb: VarBuilder, dim: usize, heads: usize, size: usize) -> Result<Self> {
        let head_dim = dim / heads;
        let table = |name: &str| -> Result<Tensor> {
            let t = vb
                .get_unchecked(name)
                .or_else(|_| vb.get((2 * size - 1, head_dim), name))?;
            match t.dims() {
                [_, hd] if *hd == head_dim => get_rel_pos(size, size, &t),
                other => candle_core::bail!(
                    "{}.{name}: expected [L, {head_dim}], got {other:?}",
                    vb.prefix()
                ),
            }
        };
        Ok(Self {
            qkv: Linear::load(vb.pp("qkv"), dim, 3 * dim, true)?,
            proj: Linear::load(vb.pp("proj"), dim, dim, true)?,
            heads,
            rel_h: table("rel_pos_h")?,
            rel_w: table("rel_pos_w")?,
        })
    }

    /// `[B, S, S, C]` to `[B, S, S, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_chunked(x, SCORE_BUDGET)
    }

    /// [`Attention::forward`] holding at most `budget` scores at once (at least one query row).
    fn forward_chunked(&self, x: &Tensor, budget: usize) -> Result<Tensor> {
        let (b, s, s2, c) = x.dims4()?;
        debug_assert_eq!(s, s2);
        let (nh, hd, n) = (self.heads, c / self.heads, s * s);
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))?
            .reshape((3, b * nh, n, hd))?;
        let q = qkv.get(0)?.contiguous()?;
        let kt = qkv.get(1)?.t()?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scale = (hd as f64).powf(-0.5);
        let rows = (budget / (b * nh * s * n)).clamp(1, s);
        let mut outs = Vec::with_capacity(s.div_ceil(rows));
        for r0 in (0..s).step_by(rows) {
            let len = rows.min(s - r0);
            let qc = q.narrow(1, r0 * s, len * s)?;
            let scores = (qc.affine(scale, 0.0)?.matmul(&kt))?;
            let scores = self.add_rel_pos(&scores, &qc, r0, len, s)?;
            outs.push(softmax_last(&scores)?.matmul(&v)?);
        }
        let o = Tensor::cat(&outs, 1)?
            .reshape((b, nh, s, s, hd))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((b, s, s, c))?;
        self.proj.forward(&o)
    }

    /// `add_decomposed_rel_pos` for query rows `r0..r0 + len`: `scores` `[BH, len * S, S * S]`,
    /// `q` (unscaled) `[BH, len * S, hd]`.
    fn add_rel_pos(
        &self,
        scores: &Tensor,
        q: &Tensor,
        r0: usize,
        len: usize,
        s: usize,
    ) -> Result<Tensor> {
        let (bh, _, hd) = q.dims3()?;
        let q = q.reshape((bh, len, s, hd))?;
        // rel_h[b, y, x, ky] = q[b, y, x, :] · Rh[y, ky, :]
        let rh = self.rel_h.narrow(0, r0, len)?;
        let rel_h = q
            .permute((1, 0, 2, 3))?
            .reshape((len, bh * s, hd))?
            .matmul(&rh.transpose(1, 2)?)?
            .reshape((len, bh, s, s))?
            .permute((1, 0, 2, 3))?;
        // rel_w[b, y, x, kx] = q[b, y, x, :] · Rw[x, kx, :]
        let rel_w = q
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((s, bh * len, hd))?
            .matmul(&self.rel_w.transpose(1, 2)?)?
            .reshape((s, bh, len, s))?
            .permute((1, 2, 0, 3))?;
        scores
            .reshape((bh, len, s, s, s))?
            .broadcast_add(&rel_h.unsqueeze(4)?)?
            .broadcast_add(&rel_w.unsqueeze(3)?)?
            .reshape((bh, len * s, s * s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn attention_in_row_chunks_equals_attention_at_once() {
        let (vb, _) = sidbooth_engine::weights::seeded(4, DType::F32, &Device::Cpu);
        let attn = Attention::load(vb, 8, 2, 5).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 5, 8), &Device::Cpu).unwrap();
        let whole = attn.forward_chunked(&x, usize::MAX).unwrap();
        // one row (5 queries of 2 x 2 heads against 25 keys) per chunk, and 2 rows
        for budget in [1, 2 * 2 * 5 * 25 * 2] {
            let chunked = attn.forward_chunked(&x, budget).unwrap();
            let d = (&chunked - &whole)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "budget {budget}: {d}");
        }
    }

    #[test]
    fn windows_round_trip_through_padding() {
        let x = Tensor::arange(0f32, 2.0 * 5.0 * 4.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 5, 4, 3))
            .unwrap();
        let (w, padded) = window_partition(&x, 3).unwrap();
        assert_eq!(padded, (6, 6));
        assert_eq!(w.dims(), &[2 * 4, 3, 3, 3]);
        // window 1 of image 0 starts at column 3; its third column is padding
        let first = w.get(1).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            first,
            vec![vec![9.0, 10.0, 11.0], vec![0.0; 3], vec![0.0; 3]]
        );
        let back = window_unpartition(&w, 3, padded, (5, 4)).unwrap();
        let d = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}
