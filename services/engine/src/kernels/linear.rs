//! A linear layer as one op: `x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ + residual`, for a weight and bias
//! that do not train (LoRA, Textual Inversion, Custom Diffusion's other layers, every frozen
//! layer under any method).
//!
//! Composed of candle ops, a LoRA linear keeps five tensors the size of its output until the
//! backward pass (the frozen product, its sum with the bias, the adapter's product, that scaled,
//! and the sum), and a plain one with a bias two, because every candle op holds its inputs
//! whether its backward needs them or not; a residual sum after it holds one more. Here the op
//! holds its input `x` (the adapter's gradients need it), the residual when it is in a graph,
//! and the adapter's two small matrices, and nothing the size of its output: in a UNet
//! transformer block that is most of what training keeps.
//!
//! The forward runs once, before the op is recorded: on the CPU in f32 as gemm products with
//! the bias, the adapter and the residual added in one pass after them, elsewhere as candle
//! ops on detached tensors. The backward computes the input gradient `g·W + scale·(g·B)·A` and
//! the adapter's `dB = scale·gᵀ·(x·Aᵀ)`, `dA = scale·(g·B)ᵀ·x` with candle ops, and only for
//! the arguments that are in a graph. A weight or bias that trains goes through the plain
//! composition ([`composed`]), which is also what the tests hold this op to.

use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Shape, Tensor};

use super::{cpu_f32, matmul_f32, with_f32, Output};

/// The low-rank adapter of a linear layer: `down` `[rank, in]`, `up` `[out, rank]`.
#[derive(Clone, Copy, Debug)]
pub struct Adapter<'a> {
    pub down: &'a Tensor,
    pub up: &'a Tensor,
    pub scale: f64,
}

impl Adapter<'_> {
    fn trains(&self) -> bool {
        self.down.track_op() || self.up.track_op()
    }
}

/// `x·wᵀ + b + adapter(x) + residual` for `x` `[..., in]`, `w` `[out, in]`, `b` `[out]` and a
/// residual shaped like the output.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adapter: Option<Adapter<'_>>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if w.track_op() || b.is_some_and(|b| b.track_op()) {
        return composed(x, w, b, adapter, residual);
    }
    let y = forward_detached(x, w, b, adapter, residual)?;
    let adapter_trains = adapter.is_some_and(|a| a.trains());
    let residual_in_graph = residual.is_some_and(|r| r.track_op());
    if !(x.track_op() || adapter_trains || residual_in_graph) {
        return Ok(y);
    }
    let op = FusedLinear {
        y: Output::new(y),
        w: w.detach(),
        adapter: adapter.map(|a| (a.down.detach(), a.up.detach(), a.scale)),
        x_grad: x.track_op(),
        has_residual: residual_in_graph,
        has_adapter: adapter_trains,
    };
    // The adapter's matrices travel as one flat argument (a custom op has at most three), so
    // that their gradients reach the variables through the concatenation's own backward.
    let packed = match adapter {
        Some(a) if adapter_trains => Some(Tensor::cat(
            &[
                a.down.flatten_all()?,
                a.up.flatten_all()?.to_dtype(a.down.dtype())?,
            ],
            0,
        )?),
        _ => None,
    };
    let x = x.contiguous()?;
    match (residual.filter(|_| residual_in_graph), packed) {
        (None, None) => x.apply_op1(op),
        (Some(r), None) => x.apply_op2(r, op),
        (None, Some(p)) => x.apply_op2(&p, op),
        (Some(r), Some(p)) => x.apply_op3(r, &p, op),
    }
}

/// The same computation composed of candle ops (each of which records its own backward).
pub fn composed(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adapter: Option<Adapter<'_>>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let mut y = matmul_last(x, &w.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    if let Some(a) = adapter {
        let dt = x.dtype();
        let h = matmul_last(x, &a.down.to_dtype(dt)?.t()?)?;
        let h = matmul_last(&h, &a.up.to_dtype(dt)?.t()?)?;
        y = (y + h.affine(a.scale, 0.0)?)?;
    }
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// `x [..., in] · m [in, out]`.
fn matmul_last(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let (lead, in_f) = lead_and_last(x)?;
    let y = x.reshape((lead, in_f))?.matmul(m)?;
    y.reshape(out_shape(x, m.dim(1)?))
}

fn lead_and_last(t: &Tensor) -> Result<(usize, usize)> {
    let last = t.dim(candle_core::D::Minus1)?;
    Ok((t.elem_count() / last.max(1), last))
}

pub(super) fn out_shape(x: &Tensor, out_f: usize) -> Shape {
    let mut dims = x.dims().to_vec();
    *dims
        .last_mut()
        .expect("a linear input has a last dimension") = out_f;
    Shape::from(dims)
}

/// The forward value, with no graph.
pub(super) fn forward_detached(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adapter: Option<Adapter<'_>>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let same_shape = |r: &Tensor| r.dims() == out_shape(x, w.dims()[0]).dims();
    let mut all = vec![x, w];
    all.extend(b);
    all.extend(residual);
    all.extend(adapter.iter().flat_map(|a| [a.down, a.up]));
    // The CPU kernel reads the values and records nothing.
    if cpu_f32(&all) && residual.is_none_or(same_shape) {
        return forward_cpu(x, w, b, adapter, residual);
    }
    let (down, up) = adapter.map(|a| (a.down.detach(), a.up.detach())).unzip();
    let adapter = match (adapter, &down, &up) {
        (Some(a), Some(down), Some(up)) => Some(Adapter {
            down,
            up,
            scale: a.scale,
        }),
        _ => None,
    };
    let (b, residual) = (b.map(Tensor::detach), residual.map(Tensor::detach));
    composed(
        &x.detach(),
        &w.detach(),
        b.as_ref(),
        adapter,
        residual.as_ref(),
    )?
    .contiguous()
}

/// The CPU f32 forward: each product written by gemm into its own buffer (as candle's matmul
/// does: accumulating into a prefilled one makes gemm's small-matrix path give a row another
/// rounding when the batch is small, and an image sampled in a batch must equal the image
/// sampled alone), then the bias, the adapter and the residual added in one pass, in the
/// composition's order.
fn forward_cpu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adapter: Option<Adapter<'_>>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (lead, in_f) = lead_and_last(x)?;
    let out_f = w.dim(0)?;
    let mut y = vec![0f32; lead * out_f];
    let mut low_rank = None;
    with_f32(x, |xs| {
        with_f32(w, |ws| {
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
        if let Some(a) = adapter {
            let rank = a.down.dim(0)?;
            let mut h = vec![0f32; lead * rank];
            with_f32(a.down, |ds| {
                matmul_f32(
                    &mut h,
                    rank,
                    false,
                    (xs, false),
                    (ds, true),
                    (lead, rank, in_f),
                );
                Ok(())
            })?;
            let mut l = vec![0f32; lead * out_f];
            with_f32(a.up, |us| {
                matmul_f32(
                    &mut l,
                    out_f,
                    false,
                    (&h, false),
                    (us, true),
                    (lead, out_f, rank),
                );
                Ok(())
            })?;
            low_rank = Some((l, a.scale as f32));
        }
        Ok(())
    })?;
    let bias = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    let add = |ys: &mut [f32], rs: Option<&[f32]>| {
        for (at, v) in ys.iter_mut().enumerate() {
            if let Some(b) = &bias {
                *v += b[at % out_f];
            }
            if let Some((l, s)) = &low_rank {
                *v += l[at] * s;
            }
            if let Some(r) = rs {
                *v += r[at];
            }
        }
    };
    match residual {
        Some(r) => with_f32(r, |rs| {
            add(&mut y, Some(rs));
            Ok(())
        })?,
        None if bias.is_some() || low_rank.is_some() => add(&mut y, None),
        None => {}
    }
    Tensor::from_vec(y, out_shape(x, out_f), x.device())
}

struct FusedLinear {
    /// The output, computed before the op was recorded.
    y: Output,
    /// `[out, in]`, not trained.
    w: Tensor,
    /// `(down, up, scale)`, detached.
    adapter: Option<(Tensor, Tensor, f64)>,
    x_grad: bool,
    /// Whether the arguments after `x` include the residual, then the packed adapter.
    has_residual: bool,
    has_adapter: bool,
}

impl FusedLinear {
    /// Gradients of `x`, the residual and the packed adapter.
    fn grads(
        &self,
        x: &Tensor,
        packed: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (lead, in_f) = lead_and_last(x)?;
        let out_f = self.w.dim(0)?;
        let dt = grad.dtype();
        let g = grad.reshape((lead, out_f))?;
        let adapter = match &self.adapter {
            Some((d, u, s)) => Some((d.to_dtype(dt)?, u.to_dtype(dt)?, *s)),
            None => None,
        };
        // g·B, `[lead, rank]`: shared by the input's and the down matrix's gradients.
        let gb = match &adapter {
            Some((_, u, _)) if self.x_grad || packed.is_some() => Some(g.matmul(u)?),
            _ => None,
        };
        let dx = if self.x_grad {
            let mut dx = g.matmul(&self.w.to_dtype(dt)?)?;
            if let (Some((d, _, s)), Some(gb)) = (&adapter, &gb) {
                dx = (dx + gb.affine(*s, 0.0)?.matmul(d)?)?;
            }
            Some(dx.reshape(x.shape())?)
        } else {
            None
        };
        let dp = match (packed, &adapter, &gb) {
            (Some(p), Some((d, _, s)), Some(gb)) => {
                let x2 = x.detach().to_dtype(dt)?.reshape((lead, in_f))?;
                let h = x2.matmul(&d.t()?)?;
                let dup = g.t()?.matmul(&h)?.affine(*s, 0.0)?;
                let ddown = gb.t()?.matmul(&x2)?.affine(*s, 0.0)?;
                Some(
                    Tensor::cat(&[ddown.flatten_all()?, dup.flatten_all()?], 0)?
                        .to_dtype(p.dtype())?,
                )
            }
            _ => None,
        };
        let dr = self.has_residual.then(|| grad.clone());
        Ok((dx, dr, dp))
    }
}

impl CustomOp1 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }
    precomputed_forward!(1);
    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(x, None, grad)?.0)
    }
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }
    precomputed_forward!(2);
    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.has_adapter {
            let (dx, _, dp) = self.grads(x, Some(second), grad)?;
            Ok((dx, dp))
        } else {
            let (dx, dr, _) = self.grads(x, None, grad)?;
            Ok((dx, dr))
        }
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }
    precomputed_forward!(3);
    fn bwd(
        &self,
        x: &Tensor,
        _residual: &Tensor,
        packed: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, Some(packed), grad)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// `max |a - b| / max |b|`, in f64 (the tests run in f32 and f64).
    pub(in crate::kernels) fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (a, b) = (f(a), f(b));
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap().max(1e-300)
    }

    struct Case {
        bias: bool,
        /// None, Some(false): a frozen adapter, Some(true): a trained one.
        adapter: Option<bool>,
        /// None, Some(false): a residual outside the graph, Some(true): in it.
        residual: Option<bool>,
        x_grad: bool,
    }

    pub(in crate::kernels) fn var_or_const(t: Tensor, var: bool) -> Result<(Tensor, Option<Var>)> {
        if var {
            let v = Var::from_tensor(&t)?;
            Ok((v.as_tensor().clone(), Some(v)))
        } else {
            Ok((t, None))
        }
    }

    fn check(case: &Case, dtype: DType) -> Result<()> {
        let dev = Device::Cpu;
        let rnd = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dtype);
        let (x, xv) = var_or_const(rnd(&[2, 5, 6])?, case.x_grad)?;
        let w = rnd(&[4, 6])?;
        let b = if case.bias { Some(rnd(&[4])?) } else { None };
        let trained = case.adapter == Some(true);
        let (down, dv) = var_or_const(rnd(&[3, 6])?, trained)?;
        let (up, uv) = var_or_const(rnd(&[4, 3])?, trained)?;
        let adapter = case.adapter.map(|_| Adapter {
            down: &down,
            up: &up,
            scale: 0.7,
        });
        let (r, rv) = var_or_const(rnd(&[2, 5, 4])?, case.residual == Some(true))?;
        let residual = case.residual.map(|_| &r);
        let probe = rnd(&[2, 5, 4])?;

        let ours = linear(&x, &w, b.as_ref(), adapter, residual)?;
        let plain = composed(&x, &w, b.as_ref(), adapter, residual)?;
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        assert!(rel(&ours, &plain) < tol, "values {}", rel(&ours, &plain));
        let in_graph = case.x_grad || trained || case.residual == Some(true);
        assert_eq!(ours.track_op(), in_graph);
        if !in_graph {
            return Ok(());
        }
        let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
        let g_plain = (&plain * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &xv), ("down", &dv), ("up", &uv), ("residual", &rv)] {
            if let Some(v) = v {
                let (a, p) = (g_ours.get(v).unwrap(), g_plain.get(v).unwrap());
                assert!(rel(a, p) < tol, "{name} gradient {}", rel(a, p));
            }
        }
        Ok(())
    }

    #[test]
    fn matches_the_composition_in_values_and_gradients() -> Result<()> {
        for bias in [false, true] {
            for adapter in [None, Some(false), Some(true)] {
                for residual in [None, Some(false), Some(true)] {
                    for x_grad in [false, true] {
                        let case = Case {
                            bias,
                            adapter,
                            residual,
                            x_grad,
                        };
                        // f32: the CPU kernel; f64: the candle-op forward other devices use.
                        for dtype in [DType::F32, DType::F64] {
                            check(&case, dtype).map_err(|e| {
                                candle_core::Error::Msg(format!(
                                    "bias {bias} adapter {adapter:?} residual {residual:?} \
                                     x_grad {x_grad} {dtype:?}: {e}"
                                ))
                            })?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// What the graph keeps: the composition holds tensors the size of the output (the frozen
    /// product, the bias sum, the adapter's product and its scaled copy); the op none.
    #[test]
    fn keeps_no_tensor_the_size_of_its_output() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (64, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (16, 8), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 16, &dev)?;
        let down = Var::randn(0f32, 1.0, (2, 8), &dev)?;
        let up = Var::randn(0f32, 1.0, (16, 2), &dev)?;
        let residual = Var::randn(0f32, 1.0, (64, 16), &dev)?;
        let adapter = Some(Adapter {
            down: &down,
            up: &up,
            scale: 1.0,
        });
        let output_sized = |y: &Tensor| {
            y.sorted_nodes()
                .iter()
                .filter(|t| t.id() != y.id() && !t.is_variable())
                .filter(|t| t.elem_count() == y.elem_count())
                .count()
        };
        let ours = linear(&x, &w, Some(&b), adapter, Some(&residual))?;
        let plain = composed(&x, &w, Some(&b), adapter, Some(&residual))?;
        assert_eq!(output_sized(&ours), 0);
        assert!(output_sized(&plain) >= 4, "{}", output_sized(&plain));
        Ok(())
    }

    /// A row's output does not depend on how many images are in the batch (an image sampled
    /// in a batch is the image sampled alone, which the CLI and the worker rely on). Products
    /// of a few rows only (`rows x out` up to 256) take another path in gemm and round
    /// differently, which is why the UNet computes one time embedding for a batch that shares
    /// its timestep.
    #[test]
    fn rows_do_not_depend_on_the_batch() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, in_f, out_f) in [(77, 32, 64), (77, 64, 32), (77, 320, 1280), (64, 1280, 320)] {
            let x = Tensor::randn(0f32, 1.0, (6, rows, in_f), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &dev)?;
            let b = Tensor::randn(0f32, 1.0, out_f, &dev)?;
            let (down, up) = (
                Tensor::randn(0f32, 1.0, (4, in_f), &dev)?,
                Tensor::randn(0f32, 1.0, (out_f, 4), &dev)?,
            );
            let a = Some(Adapter {
                down: &down,
                up: &up,
                scale: 0.5,
            });
            let all = linear(&x, &w, Some(&b), a, None)?;
            let two = linear(&x.narrow(0, 2, 2)?, &w, Some(&b), a, None)?;
            let diff = (all.narrow(0, 2, 2)? - two)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{rows} x {in_f} -> {out_f}");
        }
        Ok(())
    }
}
