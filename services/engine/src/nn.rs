//! Differentiable building blocks shared by the text encoder, UNet and VAE.
//!
//! Everything here is composed of candle-core operations that record a backward op, so gradients
//! flow through every normalisation, softmax and linear layer (candle-nn's fused
//! `softmax_last_dim` / `layer_norm` do not record one).
//!
//! [`Linear`] carries an optional [`LoraAdapter`]; the training code attaches adapters by module
//! path through the `linears_mut` visitors of the models.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// A low-rank adapter added to a [`Linear`]: `y += scale * (x · downᵀ) · upᵀ`.
///
/// `down` has shape `[rank, in_features]`, `up` has shape `[out_features, rank]`. Both may be the
/// tensors of `candle_core::Var`s so that they receive gradients. `scale` is usually `alpha / rank`
/// (times a user weight).
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// The dense weight delta `scale * up · down`, shape `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.up.matmul(&self.down)?.affine(self.scale, 0.0)
    }
}

/// A fully connected layer `y = x Wᵀ + b` (+ an optional LoRA adapter), matching `torch.nn.Linear`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Module path inside its model, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub name: String,
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            lora: None,
        }
    }

    /// Loads `weight` (and `bias` when `bias` is true) from `vb`; the module path is `vb.prefix()`.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        Ok(Self::new(vb.prefix(), weight, bias))
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn set_lora(&mut self, adapter: LoraAdapter) {
        self.lora = Some(adapter);
    }

    pub fn take_lora(&mut self) -> Option<LoraAdapter> {
        self.lora.take()
    }

    /// Folds the adapter into the dense weight (inference only) and removes it.
    pub fn merge_lora(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let delta = l.delta_weight()?.to_dtype(self.weight.dtype())?;
            self.weight = (&self.weight + delta)?;
        }
        Ok(())
    }
}

impl Linear {
    fn adapter(&self) -> Option<crate::kernels::linear::Adapter<'_>> {
        self.lora.as_ref().map(|l| crate::kernels::linear::Adapter {
            down: &l.down,
            up: &l.up,
            scale: l.scale,
        })
    }

    /// `self(x) + residual` in one op (see `kernels::linear`): training keeps neither the
    /// layer's output nor the sum's inputs beyond what their gradients need.
    pub fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (w, b) = (&self.weight, self.bias.as_ref());
        crate::kernels::linear::linear(x, w, b, self.adapter(), residual)
    }

    /// `self(geglu(p)) + residual`, where `geglu` splits `p` in halves `[a, g]` and gives
    /// `a · gelu(g)` (diffusers' GEGLU feed-forward), in one op.
    pub fn forward_geglu(&self, p: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (w, b) = (&self.weight, self.bias.as_ref());
        crate::kernels::geglu::geglu_linear(p, w, b, self.adapter(), residual)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }
}

/// 2-D convolution matching `torch.nn.Conv2d` (dilation 1, groups 1).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub name: String,
    /// `[out, in, k, k]`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn load(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_c, "bias")?);
        Ok(Self {
            name: vb.prefix(),
            weight,
            bias,
            stride,
            padding,
        })
    }
}

impl Conv2d {
    /// The convolution plus `shift` (`[B, out, 1, 1]`, broadcast over positions) and
    /// `residual`, added in the same op (see `kernels::layers::conv2d`).
    pub fn forward_with(
        &self,
        x: &Tensor,
        shift: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let addends = crate::kernels::layers::Addends {
            bias: self.bias.as_ref(),
            shift,
            residual,
        };
        crate::kernels::layers::conv2d(x, &self.weight, self.padding, self.stride, addends)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }
}

/// Layer normalisation over the last dimension (differentiable), matching `torch.nn.LayerNorm`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::kernels::norm::supported(x, &self.weight, &self.bias) {
            return crate::kernels::norm::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        if !(x.track_op() || self.weight.track_op() || self.bias.track_op()) {
            // nothing here needs a gradient: the fused kernel (which records no backward op)
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            );
        }
        self.forward_differentiable(x)
    }
}

impl LayerNorm {
    /// The composed (differentiable) computation, used whenever an input or parameter tracks gradients.
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let internal = if dt == DType::F16 || dt == DType::BF16 {
            DType::F32
        } else {
            dt
        };
        let x = x.to_dtype(internal)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dt)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Group normalisation on `[B, C, ...]` (differentiable), matching `torch.nn.GroupNorm`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if channels % groups != 0 {
            candle_core::bail!("GroupNorm: {channels} channels not divisible by {groups} groups");
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::kernels::norm::supported(x, &self.weight, &self.bias) {
            return crate::kernels::norm::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                false,
            );
        }
        self.forward_composed(x)
    }
}

impl GroupNorm {
    /// `silu(self.forward(x))`, one kernel on the CPU (every resnet norm is followed by SiLU).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if crate::kernels::norm::supported(x, &self.weight, &self.bias) {
            return crate::kernels::norm::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                true,
            );
        }
        silu(&self.forward_composed(x)?)
    }

    /// The composition of candle ops (any device and dtype; differentiable).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let internal = if dt == DType::F16 || dt == DType::BF16 {
            DType::F32
        } else {
            dt
        };
        let shape = x.dims().to_vec();
        let (b, c) = (shape[0], shape[1]);
        let x = x.to_dtype(internal)?.reshape((b, self.groups, ()))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let xn = xn.reshape(shape.as_slice())?.to_dtype(dt)?;
        let mut bshape = vec![1usize; shape.len()];
        bshape[1] = c;
        xn.broadcast_mul(&self.weight.reshape(bshape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(bshape.as_slice())?)
    }
}

/// Numerically stable softmax over the last dimension; built from differentiable ops whenever `x`
/// tracks gradients, else candle's fused kernel.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    softmax_last_differentiable(x)
}

/// The composed softmax `exp(x - max) / sum`.
pub fn softmax_last_differentiable(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// `x * sigmoid(1.702 x)` (CLIP's quick_gelu).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = (x.affine(-1.702, 0.0)?.exp()? + 1.0)?.recip()?;
    x * s
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Activation named in a transformers/diffusers config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    QuickGelu,
    GeluTanh,
    Silu,
}

impl Activation {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "gelu" => Ok(Self::Gelu),
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "silu" | "swish" => Ok(Self::Silu),
            o => Err(format!("unsupported activation {o}")),
        }
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu(x),
            Self::QuickGelu => quick_gelu(x),
            Self::GeluTanh => x.gelu(),
            Self::Silu => silu(x),
        }
    }
}

/// Collects mutable references to every [`Linear`] of a module tree.
pub trait VisitLinears {
    fn visit_linears<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>);
}

impl VisitLinears for Linear {
    fn visit_linears<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>) {
        out.push(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn linear_with_lora_matches_dense_delta() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 5, &dev)?;
        let mut lin = Linear::new("x", w.clone(), Some(b.clone()));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?;
        let down = Tensor::randn(0f32, 1.0, (2, 4), &dev)?;
        let up = Tensor::randn(0f32, 1.0, (5, 2), &dev)?;
        lin.set_lora(LoraAdapter {
            down: down.clone(),
            up: up.clone(),
            scale: 0.5,
        });
        let y = lin.forward(&x)?;
        let w2 = (w + up.matmul(&down)?.affine(0.5, 0.0)?)?;
        let y2 = x.broadcast_matmul(&w2.t()?)?.broadcast_add(&b)?;
        let diff = (y - y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "diff {diff}");
        Ok(())
    }

    #[test]
    fn norms_and_softmax_have_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 4, 3, 3), &dev)?;
        let gn = GroupNorm {
            weight: Var::ones(4, DType::F32, &dev)?.as_tensor().clone(),
            bias: Tensor::zeros(4, DType::F32, &dev)?,
            groups: 2,
            eps: 1e-5,
        };
        let w = Var::randn(0f32, 1.0, 3, &dev)?;
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: Tensor::zeros(3, DType::F32, &dev)?,
            eps: 1e-5,
        };
        let y = softmax_last(&ln.forward(&gn.forward(x.as_tensor())?)?)?;
        let loss = (y.sqr()?.sum_all()? + quick_gelu(x.as_tensor())?.sum_all()?)?;
        let grads = loss.backward()?;
        let gx = grads.get(x.as_tensor()).expect("x grad");
        let gw = grads.get(w.as_tensor()).expect("ln weight grad");
        assert!(gx.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        assert!(gw.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        // softmax rows sum to one, layer norm output has zero mean
        let s = y.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-5));
        Ok(())
    }

    #[test]
    fn fused_inference_paths_match_differentiable_ones() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (3, 5, 7), &dev)? + 1.0)?;
        let ln = LayerNorm {
            weight: Tensor::randn(1f32, 0.1, 7, &dev)?,
            bias: Tensor::randn(0f32, 0.1, 7, &dev)?,
            eps: 1e-5,
        };
        assert!(!x.track_op());
        let d = (ln.forward(&x)? - ln.forward_differentiable(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "layer norm {d}");
        let d = (softmax_last(&x)? - softmax_last_differentiable(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "softmax {d}");
        // with a Var input the differentiable path is taken and gradients flow
        let v = Var::from_tensor(&x)?;
        let g = softmax_last(v.as_tensor())?.sqr()?.sum_all()?.backward()?;
        assert!(g.get(v.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn im2col_convolution_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, h, w, k, s, p) in [
            (3, 5, 7, 6, 3, 1, 1),
            (4, 2, 8, 8, 3, 2, 1),
            (4, 3, 9, 9, 3, 2, 0),
            (2, 3, 5, 5, 3, 1, 0),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let conv = Conv2d {
                name: "c".into(),
                weight: Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?,
                bias: Some(Tensor::randn(0f32, 1.0, o, &dev)?),
                stride: s,
                padding: p,
            };
            let a = conv.forward(&x)?;
            let want = x
                .conv2d(&conv.weight, p, s, 1, 1)?
                .broadcast_add(&conv.bias.clone().unwrap().reshape((1, o, 1, 1))?)?;
            assert_eq!(a.dims(), want.dims());
            let d = (a - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{c} {o} {h} {w} {k} {s} {p}: {d}");
        }
        Ok(())
    }

    #[test]
    fn group_norm_normalises_each_group() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (1, 4, 5, 5), &dev)? + 2.0)?;
        let gn = GroupNorm {
            weight: Tensor::ones(4, DType::F32, &dev)?,
            bias: Tensor::zeros(4, DType::F32, &dev)?,
            groups: 2,
            eps: 1e-6,
        };
        let y = gn.forward(&x)?.reshape((2, 50))?;
        let m = y.mean(1)?.to_vec1::<f32>()?;
        let v = y.sqr()?.mean(1)?.to_vec1::<f32>()?;
        for i in 0..2 {
            assert!(
                m[i].abs() < 1e-4 && (v[i] - 1.0).abs() < 1e-3,
                "{m:?} {v:?}"
            );
        }
        Ok(())
    }
}
