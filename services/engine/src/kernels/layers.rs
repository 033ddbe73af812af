//! Convolution and linear layers with a backward pass that computes only what is needed.
//!
//! candle 0.11's backward of `conv2d` always computes the kernel gradient and computes the input
//! gradient with `conv_transpose2d`, whose CPU kernel is a direct loop (10-20x slower than the
//! forward convolution on the tiny model's shapes). With a frozen kernel (LoRA, Textual
//! Inversion) the kernel gradient is wasted. [`conv2d`] computes the forward as usual (on the
//! CPU as im2col and one matrix product) and attaches a custom backward: the input gradient
//! only, as a convolution with the flipped kernel; a trained kernel's gradient, on the CPU, as
//! one matrix product with the input's columns. (Linear layers: `kernels::linear`.)

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv as cpu_conv;
use super::{cpu_f32, f32_slice, Output};

/// `x.conv2d(w, padding, stride, 1, 1)` of detached tensors, through im2col on the CPU.
fn conv2d_detached(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if cpu_conv::applies(x, w) {
        return cpu_conv::conv2d(x, w, padding, stride);
    }
    x.conv2d(w, padding, stride, 1, 1)
}

struct FrozenConv2d {
    /// The output, computed before the op was recorded.
    y: Output,
    /// `[out, in, k, k]`.
    w: Tensor,
    shape: ConvShape,
    /// Whether a shift `[B, out, 1, 1]` follows the input among the arguments (then the
    /// residual, if any, follows it).
    has_shift: bool,
}

impl FrozenConv2d {
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(conv2d_input_grad(grad, &self.w, self.shape)?))
    }
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

/// The gradient of a `[B, C, 1, 1]` shift (or `[1, C, 1, 1]`, one for the whole batch) added to
/// every position of `grad`.
fn shift_grad(grad: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let g = grad.sum_keepdim(3)?.sum_keepdim(2)?;
    if shift.dim(0)? == 1 && g.dim(0)? > 1 {
        g.sum_keepdim(0)
    } else {
        Ok(g)
    }
}

impl CustomOp1 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }
    precomputed_forward!(1);
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.input_grad(x, grad)
    }
}

impl CustomOp2 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }
    precomputed_forward!(2);
    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let second = match (self.has_shift, second.track_op()) {
            (_, false) => None,
            (true, true) => Some(shift_grad(grad, second)?),
            (false, true) => Some(grad.clone()),
        };
        Ok((self.input_grad(x, grad)?, second))
    }
}

impl CustomOp3 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }
    precomputed_forward!(3);
    fn bwd(
        &self,
        x: &Tensor,
        shift: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shift = shift
            .track_op()
            .then(|| shift_grad(grad, shift))
            .transpose()?;
        let residual = residual.track_op().then(|| grad.clone());
        Ok((self.input_grad(x, grad)?, shift, residual))
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

/// What is added to a convolution's output in the same op: a bias `[out]`, a shift
/// `[B, out, 1, 1]` (a resnet's time embedding) and a residual shaped like the output.
#[derive(Clone, Copy, Default)]
pub struct Addends<'a> {
    pub bias: Option<&'a Tensor>,
    pub shift: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
}

impl Addends<'_> {
    /// `y` plus the addends, composed of candle ops.
    fn add_to(&self, mut y: Tensor) -> Result<Tensor> {
        if let Some(b) = self.bias {
            y = y.broadcast_add(&b.reshape((1, b.dims1()?, 1, 1))?)?;
        }
        if let Some(t) = self.shift {
            y = y.broadcast_add(t)?;
        }
        match self.residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)` plus the addends, with a backward pass that computes
/// only what is needed, fast on the CPU: for a square kernel `w` that is not trained, one op
/// whose backward gives the input gradient only (and the shift's and residual's), and whose
/// graph keeps the input and the addends in a graph but not the output before the additions;
/// for a kernel that trains (a variable, or a tensor computed from one: SVDiff's weights), on
/// the CPU in f32, both gradients through im2col. Other cases (a padding above
/// `(kernel - 1) / 2`, a trained kernel on a GPU) use candle's op.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    addends: Addends<'_>,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, h, wd) = x.dims4()?;
    let shape = ConvShape {
        kernel: kh,
        padding,
        stride,
        in_hw: (h, wd),
    };
    let in_graph = |t: Option<&Tensor>| t.is_some_and(|t| t.track_op());
    let bias_trains = in_graph(addends.bias);
    let any_graph = x.track_op()
        || w.track_op()
        || bias_trains
        || in_graph(addends.shift)
        || in_graph(addends.residual);
    if !any_graph {
        return addends.add_to(conv2d_detached(x, w, padding, stride)?);
    }
    let candle_op =
        kh != kw || 2 * padding > kh - 1 || bias_trains || (w.track_op() && !cpu_f32(&[x, w]));
    if candle_op {
        return addends.add_to(x.conv2d(w, padding, stride, 1, 1)?);
    }
    if w.track_op() {
        let y = x.contiguous()?.apply_op2(
            &w.contiguous()?,
            TrainedConv2d {
                shape,
                input_grad: x.track_op(),
            },
        )?;
        return addends.add_to(y);
    }
    let detached = Addends {
        bias: addends.bias,
        shift: addends.shift.map(Tensor::detach).as_ref(),
        residual: addends.residual.map(Tensor::detach).as_ref(),
    }
    .add_to(conv2d_detached(&x.detach(), &w.detach(), padding, stride)?)?
    .contiguous()?;
    let shift = addends.shift.filter(|t| t.track_op());
    let residual = addends.residual.filter(|t| t.track_op());
    let op = FrozenConv2d {
        y: Output::new(detached),
        w: w.detach(),
        shape,
        has_shift: shift.is_some(),
    };
    let x = x.contiguous()?;
    match (shift, residual) {
        (None, None) => x.apply_op1(op),
        (Some(t), None) => x.apply_op2(t, op),
        (None, Some(r)) => x.apply_op2(r, op),
        (Some(t), Some(r)) => x.apply_op3(t, r, op),
    }
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
            let y = conv2d(x.as_tensor(), &w, p, s, Addends::default())?;
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
            let y = conv2d(&xt, &w, p, s, Addends::default())?;
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

    /// Bias, shift and residual added in the op: the same values and gradients as the sums
    /// composed after candle's convolution, and the graph keeps no output-sized tensor besides
    /// the input and the residual.
    #[test]
    fn addends_match_the_composed_sums() -> Result<()> {
        let dev = Device::Cpu;
        // (shift, residual, the shift's batch: one per image or one for the batch)
        let cases = [
            (true, false, 2),
            (true, false, 1),
            (false, true, 2),
            (true, true, 2),
            (true, true, 1),
            (false, false, 2),
        ];
        for &(shift, residual, shift_batch) in &cases {
            let x = Var::randn(0f32, 1.0, (2, 3, 6, 6), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 1.0, 4, &dev)?;
            let t = Var::randn(0f32, 1.0, (shift_batch, 4, 1, 1), &dev)?;
            let r = Var::randn(0f32, 1.0, (2, 4, 6, 6), &dev)?;
            let addends = Addends {
                bias: Some(&b),
                shift: shift.then_some(t.as_tensor()),
                residual: residual.then_some(r.as_tensor()),
            };
            let probe = Tensor::randn(0f32, 1.0, (2, 4, 6, 6), &dev)?;
            let ours = conv2d(x.as_tensor(), &w, 1, 1, addends)?;
            let plain = addends.add_to(x.as_tensor().conv2d(&w, 1, 1, 1, 1)?)?;
            assert!(max_diff(&ours, &plain) < 1e-5);
            let kept = ours
                .sorted_nodes()
                .iter()
                .filter(|n| n.id() != ours.id() && !n.is_variable())
                .filter(|n| n.elem_count() == ours.elem_count())
                .count();
            assert_eq!(kept, 0, "shift {shift} residual {residual}");
            let g = (&ours * &probe)?.sum_all()?.backward()?;
            let g_ref = (&plain * &probe)?.sum_all()?.backward()?;
            for (name, v, used) in [
                ("x", &x, true),
                ("shift", &t, shift),
                ("residual", &r, residual),
            ] {
                match (g.get(v), g_ref.get(v)) {
                    (Some(a), Some(p)) => {
                        assert_eq!(a.dims(), p.dims(), "{name}");
                        assert!(max_diff(a, p) < 1e-4, "{name}")
                    }
                    (None, None) => assert!(!used, "{name}"),
                    _ => panic!("{name}: gradient present in one graph only"),
                }
            }
        }
        Ok(())
    }
}
