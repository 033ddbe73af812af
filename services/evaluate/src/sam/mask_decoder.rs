//! SAM's mask decoder (`MaskDecoder`): output tokens (one IoU token, one token per mask) join
//! the prompt tokens in the two-way transformer; the image embedding is upscaled 4× by two
//! transposed convolutions and each mask token's hypernetwork MLP turns it into per-pixel
//! weights for one mask.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use sidbooth_engine::nn::{gelu, LayerNorm, Linear};

use super::config::SamConfig;
use super::transformer::TwoWayTransformer;

/// `LayerNorm2d`'s eps.
const NORM_EPS: f64 = 1e-6;

pub struct MaskDecoder {
    transformer: TwoWayTransformer,
    /// `iou_token` and `mask_tokens` stacked, `[1 + num_mask_tokens, D]`.
    output_tokens: Tensor,
    num_mask_tokens: usize,
    upscale1: ConvTranspose2x2,
    upscale_norm: LayerNorm,
    upscale2: ConvTranspose2x2,
    hypernetworks: Vec<Mlp>,
    iou_head: Mlp,
}

impl MaskDecoder {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let d = cfg.prompt_embed_dim;
        let k = cfg.num_mask_tokens();
        let output_tokens = Tensor::cat(
            &[
                vb.get((1, d), "iou_token.weight")?,
                vb.get((k, d), "mask_tokens.weight")?,
            ],
            0,
        )?;
        let up = vb.pp("output_upscaling");
        let hypernetworks = (0..k)
            .map(|i| {
                let dims = [d, d, d, d / 8];
                Mlp::load(vb.pp(format!("output_hypernetworks_mlps.{i}")), &dims)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut iou_dims = vec![d];
        iou_dims.extend(std::iter::repeat_n(
            cfg.iou_head_hidden_dim,
            cfg.iou_head_depth - 1,
        ));
        iou_dims.push(k);
        Ok(Self {
            transformer: TwoWayTransformer::load(vb.pp("transformer"), cfg)?,
            output_tokens,
            num_mask_tokens: k,
            upscale1: ConvTranspose2x2::load(up.pp("0"), d, d / 4)?,
            upscale_norm: LayerNorm::load(up.pp("1"), d / 4, NORM_EPS)?,
            upscale2: ConvTranspose2x2::load(up.pp("3"), d / 4, d / 8)?,
            hypernetworks,
            iou_head: Mlp::load(vb.pp("iou_prediction_head"), &iou_dims)?,
        })
    }

    /// `MaskDecoder.forward` for `n` prompts on one image: `image` and `image_pe`
    /// `[1, D, G, G]`, `sparse` `[n, S, D]`, `dense` broadcastable to `[n, D, G, G]`. Returns
    /// mask logits `[n, k, 4G, 4G]` and IoU predictions `[n, k]`, `k` being
    /// `num_multimask_outputs` when `multimask`, else 1.
    pub fn forward(
        &self,
        image: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (n, _, d) = sparse.dims3()?;
        let (_, _, g, _) = image.dims4()?;
        let output_tokens =
            self.output_tokens
                .unsqueeze(0)?
                .broadcast_as((n, self.num_mask_tokens + 1, d))?;
        let tokens = Tensor::cat(&[&output_tokens.contiguous()?, sparse], 1)?;
        let channels_last = |t: &Tensor| t.flatten_from(2)?.transpose(1, 2);
        let src = channels_last(&image.broadcast_add(dense)?.broadcast_as((n, d, g, g))?)?
            .contiguous()?;
        let pos = channels_last(image_pe)?.contiguous()?;
        let (hs, src) = self.transformer.forward(&src, &pos, &tokens)?;

        let up = self.upscale1.forward(&src.reshape((n, g, g, d))?)?;
        let up = gelu(&self.upscale_norm.forward(&up)?)?;
        let up = gelu(&self.upscale2.forward(&up)?)?;
        let side = 4 * g;
        let up = up.reshape((n, side * side, d / 8))?;
        let hyper = self
            .hypernetworks
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(&hs.narrow(1, 1 + i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let hyper = Tensor::cat(&hyper, 1)?;
        let masks = hyper
            .matmul(&up.t()?)?
            .reshape((n, self.num_mask_tokens, side, side))?;
        let iou = self.iou_head.forward(&hs.narrow(1, 0, 1)?.squeeze(1)?)?;

        let (first, count) = if multimask {
            (1, self.num_mask_tokens - 1)
        } else {
            (0, 1)
        };
        Ok((
            masks.narrow(1, first, count)?.contiguous()?,
            iou.narrow(D::Minus1, first, count)?.contiguous()?,
        ))
    }
}

/// `nn.ConvTranspose2d(kernel_size=2, stride=2)` on channels-last input: each input pixel
/// becomes a 2×2 block, so it is one matrix product and a rearrangement.
struct ConvTranspose2x2 {
    /// `[in, out * 4]` (the torch weight `[in, out, 2, 2]` flattened).
    weight: Tensor,
    bias: Tensor,
    out_channels: usize,
}

impl ConvTranspose2x2 {
    fn load(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        Ok(Self {
            weight: vb
                .get((in_c, out_c, 2, 2), "weight")?
                .reshape((in_c, out_c * 4))?,
            bias: vb.get(out_c, "bias")?,
            out_channels: out_c,
        })
    }

    /// `[B, H, W, in]` to `[B, 2H, 2W, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let o = self.out_channels;
        x.reshape((b * h * w, c))?
            .matmul(&self.weight)?
            .reshape((b, h, w, o, 2, 2))?
            .permute((0, 1, 4, 2, 5, 3))?
            .contiguous()?
            .reshape((b, 2 * h, 2 * w, o))?
            .broadcast_add(&self.bias)
    }
}

/// The decoder's `MLP`: linear layers with ReLU between them.
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    /// `dims` lists the widths from input to output.
    fn load(vb: VarBuilder, dims: &[usize]) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, io)| Linear::load(vb.pp(format!("layers.{i}")), io[0], io[1], true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        self.layers
            .iter()
            .enumerate()
            .try_fold(x.clone(), |x, (i, layer)| {
                let y = layer.forward(&x)?;
                if i < last {
                    y.relu()
                } else {
                    Ok(y)
                }
            })
    }
}
