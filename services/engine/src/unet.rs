//! diffusers' `UNet2DConditionModel` for SD 1.x / 2.x, differentiable, with diffusers' weight names.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::attention::AttentionRecorder;
use crate::config::UNetConfig;
use crate::nn::{silu, softmax_last, Conv2d, GroupNorm, LayerNorm, Linear, VisitLinears};
use crate::recompute::{checkpoint, GradSink, Segment};
use crate::weights::NamedWeights;

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding` (computed in f32).
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let exponent: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), dev)?;
    let args = t
        .to_dtype(DType::F32)?
        .reshape(((), 1))?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers `ResnetBlock2D` (also used by the VAE, with `temb_channels = None`).
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), groups, in_c, eps)?,
            conv1: Conv2d::load(vb.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            time_emb_proj: match temb_channels {
                Some(t) => Some(Linear::load(vb.pp("time_emb_proj"), t, out_c, true)?),
                None => None,
            },
            norm2: GroupNorm::load(vb.pp("norm2"), groups, out_c, eps)?,
            conv2: Conv2d::load(vb.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            conv_shortcut: if in_c != out_c {
                Some(Conv2d::load(vb.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // The time embedding and the skip connection are added in the convolutions' ops, so
        // that training keeps neither convolution's output before the sums.
        let shift = match (&self.time_emb_proj, temb) {
            (Some(p), Some(t)) => Some(p.forward(&silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?),
            _ => None,
        };
        let h = self
            .conv1
            .forward_with(&self.norm1.forward_silu(x)?, shift.as_ref(), None)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = self
            .conv2
            .forward_with(&self.norm2.forward_silu(&h)?, None, Some(&skip))?;
        if self.output_scale_factor != 1.0 {
            out.affine(1.0 / self.output_scale_factor, 0.0)
        } else {
            Ok(out)
        }
    }

    fn visit<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>) {
        if let Some(l) = &mut self.time_emb_proj {
            out.push(l);
        }
    }
}

/// Receives attention probabilities `[B, heads, N, M]`.
pub type ProbsSink<'a> = &'a mut dyn FnMut(&Tensor) -> Result<()>;

/// diffusers `Attention` (q, k, v without bias, `to_out.0` with bias).
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub head_dim: usize,
    pub upcast: bool,
    /// Cross-attention only: the first context token's key and value are detached (Custom
    /// Diffusion's `CustomDiffusionAttnProcessor`); the values are unchanged.
    pub detach_bos: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, bias)?,
            to_k: Linear::load(vb.pp("to_k"), context_dim, inner, bias)?,
            to_v: Linear::load(vb.pp("to_v"), context_dim, inner, bias)?,
            to_out: Linear::load(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            head_dim,
            upcast,
            detach_bos: false,
        })
    }

    /// `x`: `[B, N, query_dim]`, `context`: `[B, M, context_dim]` (or `x` for self-attention).
    /// When `probs_out` is given, the probabilities `[B, heads, N, M]` are handed to it.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        probs_out: Option<ProbsSink<'_>>,
    ) -> Result<Tensor> {
        self.forward_residual(x, context, probs_out, None)
    }

    /// [`forward`](Self::forward) plus `residual`, added in the output projection's op.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        probs_out: Option<ProbsSink<'_>>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let (b, n, _) = x.dims3()?;
        let m = ctx.dim(1)?;
        let (k, v) = (self.to_k.forward(ctx)?, self.to_v.forward(ctx)?);
        let (k, v) = if self.detach_bos && context.is_some() && m > 1 {
            let bos_detached = |t: Tensor| -> Result<Tensor> {
                Tensor::cat(&[&t.narrow(1, 0, 1)?.detach(), &t.narrow(1, 1, m - 1)?], 1)
            };
            (bos_detached(k)?, bos_detached(v)?)
        } else {
            (k, v)
        };
        let q = self.to_q.forward(x)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let o = match probs_out {
            // Without a recorder the probabilities are never held whole, nor the per-head
            // copies of q, k, v and the output (see `kernels::attention`).
            None => crate::kernels::attention::attention_tokens(
                &q,
                &k,
                &v,
                self.heads,
                scale,
                self.upcast,
            )?,
            Some(f) => {
                // [b, len, heads * head_dim] -> [b, heads, len, head_dim]
                let heads = |t: Tensor, len: usize| -> Result<Tensor> {
                    t.reshape((b, len, self.heads, self.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let (q, k, v) = (heads(q, n)?, heads(k, m)?, heads(v, m)?);
                let dt = q.dtype();
                let (q, k) = if self.upcast {
                    (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
                } else {
                    (q, k)
                };
                let w = (q.matmul(&k.t()?)? * scale)?;
                // softmax in f32 for half-precision inputs (as torch's fused attention
                // accumulates)
                let p = softmax_last(&w.to_dtype(DType::F32)?)?.to_dtype(dt)?;
                f(&p)?;
                p.matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((b, n, self.heads * self.head_dim))?
            }
        };
        self.to_out.forward_residual(&o, residual)
    }

    fn visit<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>) {
        out.push(&mut self.to_q);
        out.push(&mut self.to_k);
        out.push(&mut self.to_v);
        out.push(&mut self.to_out);
    }
}

#[derive(Clone, Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner_ff = dim * 4;
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, false, upcast)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                cross_dim,
                heads,
                head_dim,
                false,
                upcast,
            )?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, 1e-5)?,
            ff_proj: Linear::load(vb.pp("ff.net.0.proj"), dim, inner_ff * 2, true)?,
            ff_out: Linear::load(vb.pp("ff.net.2"), inner_ff, dim, true)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        hw: (usize, usize),
        rec: Option<&mut AttentionRecorder>,
    ) -> Result<Tensor> {
        // Each residual sum is made in the op of the layer before it (see `kernels::linear`).
        let x = self
            .attn1
            .forward_residual(&self.norm1.forward(x)?, None, None, Some(x))?;
        let h = self.norm2.forward(&x)?;
        let x = match rec {
            Some(r) => {
                let mut f = |p: &Tensor| r.record(p, hw.0, hw.1);
                self.attn2
                    .forward_residual(&h, Some(ctx), Some(&mut f), Some(&x))?
            }
            None => self.attn2.forward_residual(&h, Some(ctx), None, Some(&x))?,
        };
        let p = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        self.ff_out.forward_geglu(&p, Some(&x))
    }

    fn visit<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>) {
        self.attn1.visit(out);
        self.attn2.visit(out);
        out.push(&mut self.ff_proj);
        out.push(&mut self.ff_out);
    }
}

#[derive(Clone, Debug)]
enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers `Transformer2DModel` (continuous input).
#[derive(Clone, Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(
        vb: VarBuilder,
        c: &UNetConfig,
        channels: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Proj::Linear(Linear::load(vb.pp("proj_in"), channels, inner, true)?),
                Proj::Linear(Linear::load(vb.pp("proj_out"), inner, channels, true)?),
            )
        } else {
            (
                Proj::Conv(Conv2d::load(vb.pp("proj_in"), channels, inner, 1, 1, 0)?),
                Proj::Conv(Conv2d::load(vb.pp("proj_out"), inner, channels, 1, 1, 0)?),
            )
        };
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    inner,
                    heads,
                    head_dim,
                    c.cross_attention_dim,
                    c.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), c.norm_num_groups, channels, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        mut rec: Option<&mut AttentionRecorder>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Linear(l) => l.forward(&hn.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)?,
            Proj::Conv(cv) => {
                let y = cv.forward(&hn)?;
                let inner = y.dim(1)?;
                y.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?
            }
        };
        for blk in &self.blocks {
            t = blk.forward(&t, ctx, (h, w), rec.as_deref_mut())?;
        }
        let out = match &self.proj_out {
            Proj::Linear(l) => {
                let y = l.forward(&t)?;
                y.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?
            }
            Proj::Conv(cv) => {
                let inner = t.dim(2)?;
                cv.forward(
                    &t.reshape((b, h, w, inner))?
                        .permute((0, 3, 1, 2))?
                        .contiguous()?,
                )?
            }
        };
        out + x
    }

    fn visit<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>) {
        if let Proj::Linear(l) = &mut self.proj_in {
            out.push(l);
        }
        for b in &mut self.blocks {
            b.visit(out);
        }
        if let Proj::Linear(l) = &mut self.proj_out {
            out.push(l);
        }
    }
}

#[derive(Clone, Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

/// The denoising UNet.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    weights: NamedWeights,
    /// Gradient checkpointing: resnets and transformers are recomputed in the backward pass
    /// and the gradients of their weights go here (see [`crate::recompute`]).
    recompute: Option<Arc<GradSink>>,
}

/// A resnet as a recomputed segment: `(x, time embedding)`.
struct ResnetSegment(ResnetBlock2D);

impl Segment for ResnetSegment {
    fn name(&self) -> &'static str {
        "recompute-resnet"
    }
    fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        self.0.forward(x, Some(emb))
    }
}

/// A transformer as a recomputed segment: `(x, text states)`.
struct TransformerSegment(Transformer2D);

impl Segment for TransformerSegment {
    fn name(&self) -> &'static str {
        "recompute-transformer"
    }
    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.0.forward(x, context, None)
    }
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` rooted at the component (names like `conv_in.weight`).
    #[allow(clippy::needless_range_loop)]
    pub fn new(vb: VarBuilder, c: &UNetConfig) -> Result<Self> {
        c.validate().map_err(candle_core::Error::msg)?;
        let boc = &c.block_out_channels;
        let nb = boc.len();
        let temb = boc[0] * 4;
        let g = c.norm_num_groups;
        let eps = c.norm_eps;
        let time_linear_1 = Linear::load(vb.pp("time_embedding.linear_1"), boc[0], temb, true)?;
        let time_linear_2 = Linear::load(vb.pp("time_embedding.linear_2"), temb, temb, true)?;
        let conv_in = Conv2d::load(vb.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?;

        let mut down = Vec::new();
        let mut out_c = boc[0];
        for i in 0..nb {
            let in_c = out_c;
            out_c = boc[i];
            let vbd = vb.pp(format!("down_blocks.{i}"));
            let cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block {
                let ic = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    vbd.pp(format!("resnets.{j}")),
                    ic,
                    out_c,
                    Some(temb),
                    g,
                    eps,
                    1.0,
                )?);
                if cross {
                    attentions.push(Transformer2D::new(
                        vbd.pp(format!("attentions.{j}")),
                        c,
                        out_c,
                        c.heads(i),
                        c.transformer_layers(i),
                    )?);
                }
            }
            let downsample = if i + 1 < nb {
                Some(Conv2d::load(
                    vbd.pp("downsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let mc = boc[nb - 1];
        let vbm = vb.pp("mid_block");
        let mid = MidBlock {
            resnets: vec![
                ResnetBlock2D::new(
                    vbm.pp("resnets.0"),
                    mc,
                    mc,
                    Some(temb),
                    g,
                    eps,
                    c.mid_block_scale_factor,
                )?,
                ResnetBlock2D::new(
                    vbm.pp("resnets.1"),
                    mc,
                    mc,
                    Some(temb),
                    g,
                    eps,
                    c.mid_block_scale_factor,
                )?,
            ],
            attentions: vec![Transformer2D::new(
                vbm.pp("attentions.0"),
                c,
                mc,
                c.heads(nb - 1),
                c.transformer_layers(nb - 1),
            )?],
        };

        let rev: Vec<usize> = boc.iter().rev().cloned().collect();
        let mut up = Vec::new();
        let mut out_c = rev[0];
        for i in 0..nb {
            let prev_out = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(nb - 1)];
            let vbu = vb.pp(format!("up_blocks.{i}"));
            let cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
            let heads = c.heads(nb - 1 - i);
            let layers = c.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_c } else { out_c };
                let ric = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    vbu.pp(format!("resnets.{j}")),
                    ric + skip,
                    out_c,
                    Some(temb),
                    g,
                    eps,
                    1.0,
                )?);
                if cross {
                    attentions.push(Transformer2D::new(
                        vbu.pp(format!("attentions.{j}")),
                        c,
                        out_c,
                        heads,
                        c.transformer_layers(nb - 1 - i),
                    )?);
                }
            }
            let upsample = if i + 1 < nb {
                Some(Conv2d::load(
                    vbu.pp("upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }
        let norm_out = GroupNorm::load(vb.pp("conv_norm_out"), g, boc[0], eps)?;
        let conv_out = Conv2d::load(vb.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?;
        Ok(Self {
            config: c.clone(),
            time_linear_1,
            time_linear_2,
            conv_in,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            weights: Vec::new(),
            recompute: None,
        })
    }

    /// Turns gradient checkpointing on (with the sink that collects the recomputed weights'
    /// gradients) or off. Sampling with an attention recorder never recomputes.
    pub fn set_gradient_checkpointing(&mut self, sink: Option<Arc<GradSink>>) {
        self.recompute = sink;
    }

    fn resnet(&self, r: &ResnetBlock2D, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        match &self.recompute {
            Some(sink) => checkpoint(ResnetSegment(r.clone()), sink, x, emb),
            None => r.forward(x, Some(emb)),
        }
    }

    fn transformer(
        &self,
        a: &Transformer2D,
        x: &Tensor,
        context: &Tensor,
        rec: Option<&mut AttentionRecorder>,
    ) -> Result<Tensor> {
        match (&self.recompute, rec) {
            (Some(sink), None) => checkpoint(TransformerSegment(a.clone()), sink, x, context),
            (_, rec) => a.forward(x, context, rec),
        }
    }

    pub(crate) fn set_named_weights(&mut self, w: NamedWeights) {
        self.weights = w;
    }

    /// The tensors the model was built from, by diffusers name (e.g. `conv_in.weight`).
    pub fn named_weights(&self) -> &NamedWeights {
        &self.weights
    }

    /// Detaches (or no longer detaches) the start token's key and value in every cross-attention
    /// (see [`Attention::detach_bos`]).
    pub fn set_cross_attention_detach_bos(&mut self, on: bool) {
        let transformers = self
            .down
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut())
            .chain(self.mid.attentions.iter_mut())
            .chain(self.up.iter_mut().flat_map(|b| b.attentions.iter_mut()));
        for t in transformers {
            for blk in &mut t.blocks {
                blk.attn2.detach_bos = on;
            }
        }
    }

    /// Every [`Linear`] by diffusers module path (e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, `...attn2.to_out.0`,
    /// `...ff.net.0.proj`, `...proj_in` when linear, `time_embedding.linear_1`, `...time_emb_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        self.visit_linears(&mut v);
        v.into_iter().map(|l| (l.name.clone(), l)).collect()
    }

    /// Predicts noise (or v) for `sample` `[B, C, H, W]` at `timestep` (shape `[]`, `[1]` or `[B]`,
    /// any float/int dtype) given `context` `[B, T, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, timestep: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timestep, context, None)
    }

    /// Convenience: one scalar timestep for the whole batch.
    pub fn forward_t(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let t = Tensor::new(&[timestep as f32], sample.device())?;
        self.forward_with(sample, &t, context, None)
    }

    /// [`forward`](Self::forward) that also feeds cross-attention probabilities to `rec`.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        mut rec: Option<&mut AttentionRecorder>,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let dt = sample.dtype();
        let t = timestep.to_dtype(DType::F32)?.flatten_all()?;
        // One timestep for the whole batch (sampling) gives one embedding row, added to every
        // image by broadcasting: each image then goes through the same products whatever the
        // batch size (a product of a few rows can round differently from one of many), so an
        // image sampled in a batch equals the image sampled alone.
        let t = match t.dim(0)? {
            n if n == b || n == 1 => t,
            _ => t.broadcast_as(b)?.contiguous()?,
        };
        let c = &self.config;
        let temb =
            timestep_embedding(&t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?
                .to_dtype(dt)?;
        let emb = self
            .time_linear_2
            .forward(&silu(&self.time_linear_1.forward(&temb)?)?)?;
        let sample = if c.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };

        let mut x = self.conv_in.forward(&sample)?;
        let mut res: Vec<Tensor> = vec![x.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = self.resnet(r, &x, &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = self.transformer(a, &x, context, rec.as_deref_mut())?;
                }
                res.push(x.clone());
            }
            if let Some(d) = &blk.downsample {
                x = d.forward(&x)?;
                res.push(x.clone());
            }
        }
        x = self.resnet(&self.mid.resnets[0], &x, &emb)?;
        x = self.transformer(&self.mid.attentions[0], &x, context, rec.as_deref_mut())?;
        x = self.resnet(&self.mid.resnets[1], &x, &emb)?;
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = res
                    .pop()
                    .ok_or_else(|| candle_core::Error::msg("unet: skip stack empty"))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = self.resnet(r, &x, &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = self.transformer(a, &x, context, rec.as_deref_mut())?;
                }
            }
            if let Some(u) = &blk.upsample {
                // Upsample to the size of the next skip connection (2x for sizes divisible by the
                // overall factor, as diffusers' `upsample_size`).
                let (th, tw) = match res.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (x.dim(2)? * 2, x.dim(3)? * 2),
                };
                x = u.forward(&x.upsample_nearest2d(th, tw)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}

impl VisitLinears for UNet2DConditionModel {
    fn visit_linears<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>) {
        out.push(&mut self.time_linear_1);
        out.push(&mut self.time_linear_2);
        for b in &mut self.down {
            let mut atts = b.attentions.iter_mut();
            for r in b.resnets.iter_mut() {
                r.visit(out);
                if let Some(a) = atts.next() {
                    a.visit(out);
                }
            }
        }
        let (r0, r1) = self.mid.resnets.split_at_mut(1);
        r0[0].visit(out);
        self.mid.attentions[0].visit(out);
        r1[0].visit(out);
        for b in &mut self.up {
            let mut atts = b.attentions.iter_mut();
            for r in b.resnets.iter_mut() {
                r.visit(out);
                if let Some(a) = atts.next() {
                    a.visit(out);
                }
            }
        }
    }
}
