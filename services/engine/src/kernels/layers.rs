//! Convolution and linear layers with a backward pass that computes only what is needed.
//!
//! candle 0.11's backward of `conv2d` always computes the kernel gradient and computes the input
//! gradient with `conv_transpose2d`, whose CPU kernel is a direct loop (10-20x slower than the
//! forward convolution on the tiny model's shapes); `matmul`'s backward always computes both
//! operand gradients. With frozen base weights (LoRA, Textual Inversion) those are wasted.
//! [`conv2d`] and [`frozen_linear`] compute the forward as usual (a convolution on the CPU as
//! im2col and one matrix product) and attach a custom backward: the input gradient only, the
//! convolution's as a convolution with the flipped kernel; a trained kernel's gradient, on the
//! CPU, as one matrix product with the input's columns.

use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::conv as cpu_conv;
use super::{cpu_f32, f32_slice, matmul_f32, storage_of_cpu, storage_of_cuda, with_f32, Output};

/// `x.conv2d(w, padding, stride, 1, 1)` of detached tensors, through im2col on the CPU.
fn conv2d_detached(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if cpu_conv::applies(x, w) {
        return cpu_conv::conv2d(x, w, padding, stride);
    }
    x.conv2d(w, padding, stride, 1, 1)
}

struct FrozenConv2d {
    /// The output computed before (GPU), or none: the CPU forward computes it.
    y: Output,
    /// `[out, in, k, k]`.
    w: Tensor,
    shape: ConvShape,
}

/// A convolution computed in a CPU forward, from the input's storage (no copy of the input,
/// the kernel or the output).
fn cpu_conv_fwd(
    xs: &[f32],
    xl: &Layout,
    ws: &[f32],
    w_dims: &[usize],
    shape: ConvShape,
) -> Result<(CpuStorage, Shape)> {
    let (b, c, h, wd) = xl.shape().dims4()?;
    let (o, k) = (w_dims[0], w_dims[2]);
    let (y, ho, wo) =
        cpu_conv::conv2d_f32(xs, (b, c, h, wd), ws, (o, k), shape.padding, shape.stride)?;
    Ok((CpuStorage::F32(y), Shape::from((b, o, ho, wo))))
}

impl CustomOp1 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if let Some(y) = self.y.try_take() {
            return storage_of_cpu(&y);
        }
        let xs = f32_slice(s, l)?;
        with_f32(&self.w, |ws| {
            cpu_conv_fwd(xs, l, ws, self.w.dims(), self.shape)
        })
    }
    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        storage_of_cuda(&self.y.take()?)
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(conv2d_input_grad(grad, &self.w, self.shape)?))
    }
}

#[derive(Clone, Copy, Debug)]
struct ConvShape {
    kernel: usize,
    padding: usize,
    stride: usize,
    in_hw: (usize, usize),
}

/// The gradient of a convolution's input for the kernel `w` (`[out, in, k, k]`): on the CPU in
/// f32 by `kernels::conv`; elsewhere the output gradient, dilated by the stride, convolved
/// with the flipped kernel.
fn conv2d_input_grad(grad: &Tensor, w: &Tensor, shape: ConvShape) -> Result<Tensor> {
    if cpu_conv::applies(grad, w) {
        return cpu_conv::conv2d_input_grad(grad, w, shape.in_hw, shape.padding, shape.stride);
    }
    let w_flipped = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    let ConvShape {
        kernel,
        padding,
        stride,
        in_hw,
    } = shape;
    let g = if stride == 1 {
        grad.clone()
    } else {
        // insert stride-1 zeros between gradient entries
        let s = stride;
        let (b, c, h, w) = grad.dims4()?;
        let mut parts = vec![grad.unsqueeze(4)?];
        let z = grad.zeros_like()?.unsqueeze(4)?;
        parts.extend(std::iter::repeat_n(z, s - 1));
        let g = Tensor::cat(&parts, 4)?
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
    let (ih, iw) = in_hw;
    let full = |n: usize| n + kernel - 1 - 2 * padding;
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
    conv2d_detached(&g, &w_flipped, kernel - 1 - padding, 1)
}

/// A convolution whose kernel trains (DreamBooth, SVDiff), on the CPU in f32: candle's own
/// backward computes the input gradient with its direct `conv_transpose2d` loop; here it is the
/// flipped-kernel convolution above, and the kernel gradient one matrix product per image with
/// the input's columns (im2col, computed again in the backward instead of kept).
struct TrainedConv2d {
    shape: ConvShape,
    /// Whether the input needs a gradient (the latents entering `conv_in` do not).
    input_grad: bool,
}

impl candle_core::CustomOp2 for TrainedConv2d {
    fn name(&self) -> &'static str {
        "trained-conv2d"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ws) = (f32_slice(x, xl)?, f32_slice(w, wl)?);
        cpu_conv_fwd(xs, xl, ws, wl.dims(), self.shape)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w) = (x.detach(), w.detach());
        let dx = if self.input_grad {
            Some(conv2d_input_grad(grad, &w, self.shape)?)
        } else {
            None
        };
        let s = self.shape;
        let dw = cpu_conv::conv2d_weight_grad(&x, grad, s.kernel, s.padding, s.stride)?;
        Ok((dx, Some(dw)))
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)` with a backward pass that computes only what is needed,
/// fast on the CPU: for a square kernel `w` that is not trained, the input gradient only; for
/// one that trains (a variable, or a tensor computed from one: SVDiff's weights), on the CPU in
/// f32, both gradients through im2col. Other cases (a padding above `(kernel - 1) / 2`, a
/// trained kernel on a GPU) use candle's op.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, h, wd) = x.dims4()?;
    let shape = ConvShape {
        kernel: kh,
        padding,
        stride,
        in_hw: (h, wd),
    };
    let cpu_f32 = cpu_f32(&[x, w]);
    if kh != kw || 2 * padding > kh - 1 || !(x.track_op() || w.track_op()) {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    if w.track_op() {
        if !cpu_f32 {
            return x.conv2d(w, padding, stride, 1, 1);
        }
        return x.contiguous()?.apply_op2(
            &w.contiguous()?,
            TrainedConv2d {
                shape,
                input_grad: x.track_op(),
            },
        );
    }
    let y = if cpu_f32 {
        Output::none()
    } else {
        Output::new(conv2d_detached(&x.detach(), &w.detach(), padding, stride)?.contiguous()?)
    };
    x.contiguous()?.apply_op1(FrozenConv2d {
        y,
        w: w.detach(),
        shape,
    })
}

struct FrozenLinear {
    /// The output computed before (GPU), or none: the CPU forward computes it.
    y: Output,
    /// `[out, in]`.
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if let Some(y) = self.y.try_take() {
            return storage_of_cpu(&y);
        }
        let xs = f32_slice(s, l)?;
        let (out_f, in_f) = self.w.dims2()?;
        let lead = xs.len() / in_f;
        let mut y = vec![0f32; lead * out_f];
        with_f32(&self.w, |ws| {
            matmul_f32(
                &mut y,
                out_f,
                false,
                (xs, false),
                (ws, true),
                (lead, out_f, in_f),
            );
            Ok(())
        })?;
        let mut dims = l.dims().to_vec();
        *dims
            .last_mut()
            .expect("a linear input has a last dimension") = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
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
    let y = if cpu_f32(&[x, w]) {
        Output::none()
    } else {
        Output::new(
            x.detach()
                .reshape((lead, in_f))?
                .matmul(&w.detach().t()?)?
                .reshape(out_shape)?
                .contiguous()?,
        )
    };
    x.contiguous()?.apply_op1(FrozenLinear { y, w: w.detach() })
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
            let y = conv2d(x.as_tensor(), &w, p, s)?;
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
    fn trained_kernel_conv_matches_candle_in_both_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, p, s, hw, input_grad) in &[
            (3, 1, 1, 8, true),
            (3, 1, 2, 7, true),
            (1, 0, 1, 5, true),
            (3, 0, 2, 9, true),
            (3, 1, 1, 6, false), // conv_in: the latents need no gradient
        ] {
            let x0 = Tensor::randn(0f32, 1.0, (2, 3, hw, hw), &dev)?;
            let x = Var::from_tensor(&x0)?;
            let xt = if input_grad {
                x.as_tensor().clone()
            } else {
                x0.clone()
            };
            let w = Var::randn(0f32, 1.0, (4, 3, k, k), &dev)?;
            let probe = |y: &Tensor| -> Result<Tensor> { (y * y.affine(0.5, 0.1)?)?.sum_all() };
            let g_ref = probe(&xt.conv2d(&w, p, s, 1, 1)?)?.backward()?;
            let y = conv2d(&xt, &w, p, s)?;
            let g = probe(&y)?.backward()?;
            let case = format!("k{k} p{p} s{s} hw{hw}");
            assert!(
                max_diff(&y, &xt.conv2d(&w, p, s, 1, 1)?) < 1e-5,
                "fwd {case}"
            );
            let (dw, dw_ref) = (g.get(&w).unwrap(), g_ref.get(&w).unwrap());
            let scale = dw_ref.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(max_diff(dw, dw_ref) < 1e-5 * scale, "dw {case}");
            if input_grad {
                let (dx, dx_ref) = (g.get(&x).unwrap(), g_ref.get(&x).unwrap());
                assert!(max_diff(dx, dx_ref) < 1e-4, "dx {case}");
            } else {
                assert!(g.get(&x).is_none());
            }
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
