//! The Vision Transformer trunk shared by CLIP's image tower and DINO, for inference: patch
//! embedding, a class token, learned positions, then pre-norm encoder layers without a mask
//! (`x + attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`, the same block in both models and in
//! CLIP's text tower, which adds a causal mask).
//!
//! Written for speed on the CPU, where evaluation usually runs:
//! * the patch embedding, a convolution whose stride equals its kernel, is what it is: every
//!   patch flattened to a row, times the kernel as a matrix;
//! * query, key and value come from one matrix product (their weights stacked, the query's
//!   pre-scaled by `head_dim^-0.5`), and the biases, activations and residuals are added in
//!   place ([`crate::fused`]);
//! * both models read only the class token of the last layer, so the last layer computes the
//!   class token's query, attention and MLP alone (every token still gives its key and value);
//! * images go through in batches sized so that no activation tensor passes ~16 MB: larger
//!   buffers are fresh `mmap`s on every allocation, whose page faults cost more than the bigger
//!   matrix products save.
//!
//! Layer norm is the engine's (candle's fused kernel when nothing tracks gradients).

// `usize::is_multiple_of` is newer than the workspace's rust-version.
#![allow(clippy::manual_is_multiple_of)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Module, Tensor, D};
use serde_json::Value;
use sidbooth_engine::nn::{Activation, LayerNorm, Linear};

use crate::error::{EvalError, Result};
use crate::fused;

/// Floats in the largest activation of one batch (see the module docs).
const BATCH_ELEMENTS: usize = 4 << 20;

/// A `Conv2d(channels, hidden, kernel = stride = patch)` as a matrix product.
#[derive(Clone, Debug)]
pub struct PatchEmbedding {
    /// `[hidden, channels * ph * pw]`, the kernel flattened in the order patches are.
    kernel: Tensor,
    bias: Option<Tensor>,
    channels: usize,
    patch: (usize, usize),
    image: (usize, usize),
}

impl PatchEmbedding {
    /// `weight`: the convolution kernel `[hidden, channels, ph, pw]`; `image`: `(height, width)`.
    pub fn new(
        weight: &Tensor,
        bias: Option<Tensor>,
        image: (usize, usize),
    ) -> candle_core::Result<Self> {
        let (hidden, channels, ph, pw) = weight.dims4()?;
        if image.0 % ph != 0 || image.1 % pw != 0 {
            candle_core::bail!(
                "image size {image:?} is not a multiple of the patch size {ph}x{pw}"
            );
        }
        let kernel = weight.reshape((hidden, channels * ph * pw))?;
        Ok(Self {
            kernel,
            bias,
            channels,
            patch: (ph, pw),
            image,
        })
    }

    pub fn num_patches(&self) -> usize {
        (self.image.0 / self.patch.0) * (self.image.1 / self.patch.1)
    }

    /// `[N, C, H, W]` -> `[N, patches, hidden]`, patches in row-major order as `flatten(2)`.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        if c != self.channels || (h, w) != self.image {
            candle_core::bail!(
                "pixel values of {c}x{h}x{w}, the model takes {}x{}x{}",
                self.channels,
                self.image.0,
                self.image.1
            );
        }
        let (ph, pw) = self.patch;
        let (gh, gw) = (h / ph, w / pw);
        let rows = pixels
            .reshape((n, c, gh, ph, gw, pw))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * gh * gw, c * ph * pw))?;
        fused::bias(rows.matmul(&self.kernel.t()?)?, self.bias.as_ref())?.reshape((n, gh * gw, ()))
    }
}

/// One encoder layer's weights as checkpoints store them (each model names them its own way).
pub struct LayerWeights {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub norm1: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub norm2: LayerNorm,
}

/// `x · Wᵀ` of a `[rows, in]` input and a `[out, in]` weight. The weight stays as checkpoints
/// store it: the matrix product reads it transposed faster than a transposed copy (the same
/// layout `torch.nn.Linear` hands its BLAS).
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

/// One pre-norm encoder layer; weights `[out, in]`.
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    norm1: LayerNorm,
    /// `[3 * hidden, hidden]`: query (scaled), key and value projections stacked.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    out: Tensor,
    out_bias: Option<Tensor>,
    norm2: LayerNorm,
    fc1: Tensor,
    fc1_bias: Option<Tensor>,
    fc2: Tensor,
    fc2_bias: Option<Tensor>,
    act: Activation,
    heads: usize,
}

impl EncoderLayer {
    pub fn new(w: LayerWeights, heads: usize, act: Activation) -> candle_core::Result<Self> {
        let hidden = w.q.out_features();
        if heads == 0 || hidden % heads != 0 {
            candle_core::bail!("hidden size {hidden} is not a multiple of {heads} heads");
        }
        let scale = ((hidden / heads) as f64).powf(-0.5);
        let qkv = Tensor::cat(&[&(&w.q.weight * scale)?, &w.k.weight, &w.v.weight], 0)?;
        let qkv_bias = match (&w.q.bias, &w.k.bias, &w.v.bias) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[&(q * scale)?, k, v], 0)?),
            (None, None, None) => None,
            _ => candle_core::bail!("query, key and value disagree on having a bias"),
        };
        Ok(Self {
            norm1: w.norm1,
            qkv,
            qkv_bias,
            out: w.out.weight,
            out_bias: w.out.bias,
            norm2: w.norm2,
            fc1: w.fc1.weight,
            fc1_bias: w.fc1.bias,
            fc2: w.fc2.weight,
            fc2_bias: w.fc2.bias,
            act,
            heads,
        })
    }

    fn hidden(&self) -> usize {
        self.out.dim(0).unwrap_or(0)
    }

    fn intermediate(&self) -> usize {
        self.fc1.dim(0).unwrap_or(0)
    }

    /// `[B*N, parts*hidden]` projections -> `parts` tensors `[B, heads, N, head_dim]`.
    fn split_heads(&self, x: &Tensor, b: usize, parts: usize) -> candle_core::Result<Vec<Tensor>> {
        let hidden = self.hidden();
        let n = x.dim(0)? / b;
        let x = x
            .reshape((b, n, parts, self.heads, hidden / self.heads))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        (0..parts).map(|i| x.get(i)).collect()
    }

    /// `x + fc2(act(fc1(ln2(x))))` of `[rows, hidden]`.
    fn mlp(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.norm2.forward(x)?;
        let h = fused::bias_act(linear(&h, &self.fc1)?, self.fc1_bias.as_ref(), self.act)?;
        fused::bias_residual(linear(&h, &self.fc2)?, self.fc2_bias.as_ref(), x)
    }

    /// `[B, N, hidden]` -> `[B, N, hidden]`; `mask` (`[1, 1, N, N]`, e.g. CLIP text's causal
    /// mask) is added to the attention scores.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, n, hidden) = x.dims3()?;
        let x = x.reshape((b * n, hidden))?;
        let h = self.norm1.forward(&x)?;
        let qkv = fused::bias(linear(&h, &self.qkv)?, self.qkv_bias.as_ref())?;
        let [q, k, v] = <[Tensor; 3]>::try_from(self.split_heads(&qkv, b, 3)?).expect("3 parts");
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let p = fused::softmax_last(scores)?;
        let o = p
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * n, hidden))?;
        let y = fused::bias_residual(linear(&o, &self.out)?, self.out_bias.as_ref(), &x)?;
        self.mlp(&y)?.reshape((b, n, hidden))
    }

    /// The first token's output alone, `[B, hidden]`: its query against every token's key.
    pub fn forward_first(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, hidden) = x.dims3()?;
        let h = self.norm1.forward(x)?;
        let first = x.narrow(1, 0, 1)?.reshape((b, hidden))?;
        let h_first = h.narrow(1, 0, 1)?.reshape((b, hidden))?;
        let bias = |from: usize, len: usize| {
            self.qkv_bias
                .as_ref()
                .map(|t| t.narrow(0, from, len))
                .transpose()
        };
        let q = fused::bias(
            linear(&h_first, &self.qkv.narrow(0, 0, hidden)?)?,
            bias(0, hidden)?.as_ref(),
        )?;
        let kv = fused::bias(
            linear(
                &h.reshape((b * n, hidden))?,
                &self.qkv.narrow(0, hidden, 2 * hidden)?,
            )?,
            bias(hidden, 2 * hidden)?.as_ref(),
        )?;
        let [k, v] = <[Tensor; 2]>::try_from(self.split_heads(&kv, b, 2)?).expect("2 parts");
        let q = q.reshape((b, self.heads, 1, hidden / self.heads))?;
        let p = fused::softmax_last(q.matmul(&k.t()?)?)?;
        let o = p.matmul(&v)?.reshape((b, hidden))?;
        let y = fused::bias_residual(linear(&o, &self.out)?, self.out_bias.as_ref(), &first)?;
        self.mlp(&y)
    }
}

/// Patches, class token and positions, the optional pre-norm (CLIP's `pre_layrnorm`), layers.
#[derive(Clone, Debug)]
pub struct VisionTrunk {
    pub patches: PatchEmbedding,
    /// `[hidden]`.
    pub class_token: Tensor,
    /// `[1 + patches, hidden]`.
    pub positions: Tensor,
    pub pre_norm: Option<LayerNorm>,
    pub layers: Vec<EncoderLayer>,
}

impl VisionTrunk {
    /// The class token's output of the last layer, `[N, hidden]` (before any final norm).
    pub fn class_token_output(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let patches = self.patches.forward(pixels)?;
        let (n, _, hidden) = patches.dims3()?;
        let cls = self
            .class_token
            .reshape((1, 1, hidden))?
            .repeat((n, 1, 1))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions)?;
        if let Some(norm) = &self.pre_norm {
            x = norm.forward(&x)?;
        }
        let Some((last, rest)) = self.layers.split_last() else {
            return x.narrow(1, 0, 1)?.squeeze(1);
        };
        for layer in rest {
            x = layer.forward(&x, None)?;
        }
        last.forward_first(&x)
    }

    /// Images per forward pass (see the module docs).
    pub fn batch_size(&self) -> usize {
        let tokens = self.patches.num_patches() + 1;
        let widest = self.layers.first().map_or(1, |l| {
            (3 * l.hidden()).max(l.intermediate()).max(l.heads * tokens)
        });
        (BATCH_ELEMENTS / (tokens * widest)).clamp(1, 64)
    }

    /// `f` (a forward pass) on consecutive batches of `pixels` `[N, ...]`, concatenated.
    pub fn in_batches(
        &self,
        pixels: &Tensor,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (n, batch) = (pixels.dim(0)?, self.batch_size());
        if n <= batch {
            return f(pixels);
        }
        let parts = (0..n)
            .step_by(batch)
            .map(|at| f(&pixels.narrow(0, at, batch.min(n - at))?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

/// Rows divided by their L2 norm (`x / x.norm(dim=-1, keepdim=True)`).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// A `[N, D]` tensor as rows.
pub fn rows(x: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    x.to_device(&Device::Cpu)?.to_vec2::<f32>()
}

/// A model directory's JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EvalError::config(path, e.to_string()))
}

/// `path` if it is a file, else an error naming it.
pub(crate) fn existing(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(EvalError::io(&path, "no such file"))
    }
}
