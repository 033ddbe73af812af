//! Convolution and linear layers with frozen weights, with a backward pass that computes only
//! the input gradient.
//!
//! candle 0.11's backward of `conv2d` always computes the kernel gradient and computes the input
//! gradient with `conv_transpose2d`, whose CPU kernel is a direct loop (10-20x slower than the
//! forward convolution on the tiny model's shapes); `matmul`'s backward always computes both
//! operand gradients. With frozen base weights (LoRA, Textual Inversion) those are wasted.
//! [`frozen_conv2d`] and [`frozen_linear`] compute the forward as usual and attach a custom
//! backward: the input gradient only, the convolution's as a `conv2d` with the flipped kernel.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// Returns `y`'s storage as the op's output (forward already computed on the detached input).
fn storage_of_cpu(y: &Tensor) -> Result<(CpuStorage, Shape)> {
    let (s, l) = y.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) if l.is_contiguous() && l.start_offset() == 0 => {
            Ok((cs.clone(), y.shape().clone()))
        }
        Storage::Cpu(_) => candle_core::bail!("frozen op: output not contiguous"),
        _ => candle_core::bail!("frozen op: output not on the CPU"),
    }
}

fn storage_of_cuda(y: &Tensor) -> Result<(CudaStorage, Shape)> {
    let (s, l) = y.storage_and_layout();
    match &*s {
        Storage::Cuda(cs) => Ok((cs.try_clone(l)?, y.shape().clone())),
        _ => candle_core::bail!("frozen op: output not on a CUDA device"),
    }
}

/// The forward result, handed to candle once and then dropped: the op stays in the graph until
/// the backward pass, and keeping `y` there too would hold every layer's output twice.
struct Output(std::sync::Mutex<Option<Tensor>>);

impl Output {
    fn new(y: Tensor) -> Self {
        Self(std::sync::Mutex::new(Some(y)))
    }

    fn take(&self) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen op: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("frozen op: forward ran twice".into()))
    }
}

struct FrozenConv2d {
    y: Output,
    /// `[in, out, k, k]`: the kernel flipped spatially with in/out swapped.
    w_flipped: Tensor,
    kernel: usize,
    padding: usize,
    stride: usize,
    in_hw: (usize, usize),
}

impl CustomOp1 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        storage_of_cpu(&self.y.take()?)
    }
    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        storage_of_cuda(&self.y.take()?)
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = if self.stride == 1 {
            grad.clone()
        } else {
            // insert stride-1 zeros between gradient entries
            let s = self.stride;
            let (b, c, h, w) = grad.dims4()?;
            let mut parts = vec![grad.unsqueeze(4)?];
            let z = grad.zeros_like()?.unsqueeze(4)?;
            parts.extend(std::iter::repeat_n(z, s - 1));
            let g =
                Tensor::cat(&parts, 4)?
                    .reshape((b, c, h, w * s))?
                    .narrow(3, 0, (w - 1) * s + 1)?;
            let w2 = (w - 1) * s + 1;
            let mut parts = vec![g.unsqueeze(3)?];
            let z = g.zeros_like()?.unsqueeze(3)?;
            parts.extend(std::iter::repeat_n(z, s - 1));
            Tensor::cat(&parts, 3)?
                .reshape((b, c, h * s, w2))?
                .narrow(2, 0, (h - 1) * s + 1)?
        };
        // Input rows/columns the strided forward never reached on the far side still receive
        // kernel contributions: extend the (dilated) gradient there by zeros before convolving.
        let (_, _, gh, gw) = g.dims4()?;
        let (ih, iw) = self.in_hw;
        let full = |n: usize| n + self.kernel - 1 - 2 * self.padding;
        let g = if full(gh) < ih {
            g.pad_with_zeros(2, 0, ih - full(gh))?
        } else {
            g
        };
        let g = if full(gw) < iw {
            g.pad_with_zeros(3, 0, iw - full(gw))?
        } else {
            g
        };
        let pad = self.kernel - 1 - self.padding;
        Ok(Some(g.conv2d(&self.w_flipped, pad, 1, 1, 1)?))
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)` for a square kernel `w` that is not trained; the
/// backward computes the input gradient only. Falls back to the plain op for a `w` that needs a
/// gradient (a variable, or a tensor computed from one: SVDiff's weights), or a padding above
/// `(kernel - 1) / 2`.
pub fn frozen_conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if w.track_op() || kh != kw || 2 * padding > kh - 1 || !x.track_op() {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let y = x.detach().conv2d(w, padding, stride, 1, 1)?.contiguous()?;
    let w_flipped = w.detach().flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    let (_, _, h, wd) = x.dims4()?;
    x.apply_op1(FrozenConv2d {
        y: Output::new(y),
        w_flipped,
        kernel: kh,
        padding,
        stride,
        in_hw: (h, wd),
    })
}

struct FrozenLinear {
    y: Output,
    /// `[out, in]`.
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        storage_of_cpu(&self.y.take()?)
    }
    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        storage_of_cuda(&self.y.take()?)
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // grad [..., out] · W [out, in]
        let dims = grad.dims().to_vec();
        let out_f = dims[dims.len() - 1];
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let gi = grad.reshape((lead, out_f))?.matmul(&self.w)?;
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(self.w.dims()[1]);
        Ok(Some(gi.reshape(shape)?))
    }
}

/// `x · wᵀ` (no bias) for a weight `w` `[out, in]` that is not trained; the backward computes the
/// input gradient only. Falls back to the plain op for a `w` that needs a gradient (a variable
/// or a tensor computed from one).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_f = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let out_f = w.dims()[0];
    let mut out_shape = dims[..dims.len() - 1].to_vec();
    out_shape.push(out_f);
    if w.track_op() || !x.track_op() {
        return x.reshape((lead, in_f))?.matmul(&w.t()?)?.reshape(out_shape);
    }
    let y = x
        .detach()
        .reshape((lead, in_f))?
        .matmul(&w.detach().t()?)?
        .reshape(out_shape)?
        .contiguous()?;
    x.apply_op1(FrozenLinear {
        y: Output::new(y),
        w: w.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn conv_matches_candle_forward_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, p, s, hw) in &[
            (3, 1, 1, 8),
            (3, 1, 2, 8),
            (3, 1, 2, 7),
            (1, 0, 1, 5),
            (3, 0, 2, 9),
            (3, 0, 1, 6),
        ] {
            let x = Var::randn(0f32, 1.0, (2, 3, hw, hw), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev)?;
            let probe = |y: &Tensor| -> Result<Tensor> { (y * y.affine(0.5, 0.1)?)?.sum_all() };
            let y_ref = x.as_tensor().conv2d(&w, p, s, 1, 1)?;
            let g_ref = probe(&y_ref)?
                .backward()?
                .get(x.as_tensor())
                .unwrap()
                .clone();
            let y = frozen_conv2d(x.as_tensor(), &w, p, s)?;
            let g = probe(&y)?.backward()?.get(x.as_tensor()).unwrap().clone();
            assert_eq!(y.dims(), y_ref.dims());
            assert!(max_diff(&y, &y_ref) < 1e-5, "fwd k{k} p{p} s{s} hw{hw}");
            assert_eq!(g.dims(), g_ref.dims(), "k{k} p{p} s{s} hw{hw}");
            assert!(
                max_diff(&g, &g_ref) < 1e-4,
                "bwd k{k} p{p} s{s} hw{hw}: {}",
                max_diff(&g, &g_ref)
            );
        }
        Ok(())
    }

    #[test]
    fn linear_matches_candle_forward_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 5, 6), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let y_ref = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let g_ref = y_ref
            .sqr()?
            .sum_all()?
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let y = frozen_linear(x.as_tensor(), &w)?;
        let store = y.sqr()?.sum_all()?.backward()?;
        let g = store.get(x.as_tensor()).unwrap();
        assert!(max_diff(&y, &y_ref) < 1e-5);
        assert!(max_diff(g, &g_ref) < 1e-4);
        assert!(store.get(&w).is_none());
        Ok(())
    }
}
