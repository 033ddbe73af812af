//! The second half of a transformer block's feed-forward, `linear(geglu(p)) + residual`, as
//! one op (diffusers' `GEGLU` with the erf GELU, then `ff.net.2`).
//!
//! Composed of candle ops it keeps, besides `p` (the first linear's output, `2·I` wide), the
//! GELU of the gate, the product (both `I` wide) and the linear's output: in SD 2.1 that is
//! the widest activation of every block. Here the graph keeps `p` and the residual only; the
//! backward computes the GEGLU's values again from `p`. On the CPU in f32 the GEGLU and its
//! gradient are one pass each over `p`; elsewhere they are candle ops.

use candle_core::{CustomOp1, CustomOp2, Result, Tensor, D};
use rayon::prelude::*;

use super::linear::{composed, forward_detached, out_shape, Adapter};
use super::{cpu_f32, with_f32, Output};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density's factor.
const FRAC_1_SQRT_2PI: f32 = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * FRAC_1_SQRT_2;

/// Rows handed to one parallel task.
const ROWS_PER_TASK: usize = 16;

/// `a · gelu(g)` for `p = [a, g]` split along its last dimension, composed of candle ops.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    let half = p.dim(D::Minus1)? / 2;
    let a = p.narrow(D::Minus1, 0, half)?;
    let g = p.narrow(D::Minus1, half, half)?;
    a * g.gelu_erf()?
}

/// `geglu(p)` with no graph: one pass on the CPU in f32.
fn geglu_detached(p: &Tensor) -> Result<Tensor> {
    let p = p.detach();
    if !cpu_f32(&[&p]) {
        return geglu(&p);
    }
    let half = p.dim(D::Minus1)? / 2;
    let u = with_f32(&p, |ps| {
        let mut u = vec![0f32; ps.len() / 2];
        u.par_chunks_mut(half * ROWS_PER_TASK)
            .zip(ps.par_chunks(2 * half * ROWS_PER_TASK))
            .for_each(|(u, p)| {
                for (u, p) in u.chunks_exact_mut(half).zip(p.chunks_exact(2 * half)) {
                    let (a, g) = p.split_at(half);
                    for ((u, &a), &g) in u.iter_mut().zip(a).zip(g) {
                        *u = a * gelu(g);
                    }
                }
            });
        Ok(u)
    })?;
    Tensor::from_vec(u, out_shape(&p, half), p.device())
}

fn gelu(g: f32) -> f32 {
    // as candle's `gelu_erf`
    (candle_core::cpu::erf::erf_f32(g * FRAC_1_SQRT_2) + 1.) * 0.5 * g
}

/// `(gelu(g), d gelu / dg)`: `g·Φ(g)` and `Φ(g) + g·φ(g)`.
fn gelu_and_slope(g: f32) -> (f32, f32) {
    let cdf = (candle_core::cpu::erf::erf_f32(g * FRAC_1_SQRT_2) + 1.) * 0.5;
    let pdf = (-0.5 * g * g).exp() * FRAC_1_SQRT_2PI;
    (g * cdf, cdf + g * pdf)
}

/// `linear(geglu(p), w, b) + residual` for a frozen `w` `[out, I]` and `b`, `p` `[..., 2·I]`.
/// A trained `w` or bias, or an adapter, goes through the composition.
pub fn geglu_linear(
    p: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adapter: Option<Adapter<'_>>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if adapter.is_some() || w.track_op() || b.is_some_and(|b| b.track_op()) {
        return composed(&geglu(p)?, w, b, adapter, residual);
    }
    let y = forward_detached(&geglu_detached(p)?, w, b, None, residual)?;
    let residual_in_graph = residual.is_some_and(|r| r.track_op());
    if !(p.track_op() || residual_in_graph) {
        return Ok(y);
    }
    let op = GegluLinear {
        y: Output::new(y),
        w: w.detach(),
    };
    let p = p.contiguous()?;
    match residual.filter(|_| residual_in_graph) {
        Some(r) => p.apply_op2(r, op),
        None => p.apply_op1(op),
    }
}

struct GegluLinear {
    y: Output,
    /// `[out, I]`.
    w: Tensor,
}

impl GegluLinear {
    /// The gradient of `p` for the output gradient `grad`.
    fn p_grad(&self, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !p.track_op() {
            return Ok(None);
        }
        let p = p.detach();
        let out_f = self.w.dim(0)?;
        let lead = grad.elem_count() / out_f.max(1);
        let half = p.dim(D::Minus1)? / 2;
        let du = grad
            .reshape((lead, out_f))?
            .matmul(&self.w.to_dtype(grad.dtype())?)?
            .reshape(out_shape(&p, half))?;
        if cpu_f32(&[&p, &du]) {
            return geglu_backward_cpu(&p, &du).map(Some);
        }
        let (a, g) = (
            p.narrow(D::Minus1, 0, half)?,
            p.narrow(D::Minus1, half, half)?,
        );
        let cdf = ((g.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
        let pdf = (g.sqr()?.affine(-0.5, 0.0)?.exp()? * FRAC_1_SQRT_2PI as f64)?;
        let slope = (&cdf + (&g * pdf)?)?;
        let da = (&du * (&g * &cdf)?)?;
        let dg = ((du * a)? * slope)?;
        Ok(Some(Tensor::cat(&[da, dg], D::Minus1)?))
    }
}

/// `[d a, d g]` for `p = [a, g]` and the gradient `du` of `a · gelu(g)`, in one pass.
fn geglu_backward_cpu(p: &Tensor, du: &Tensor) -> Result<Tensor> {
    let half = du.dim(D::Minus1)?;
    let dp = with_f32(p, |ps| {
        with_f32(du, |dus| {
            let mut dp = vec![0f32; ps.len()];
            dp.par_chunks_mut(2 * half * ROWS_PER_TASK)
                .zip(ps.par_chunks(2 * half * ROWS_PER_TASK))
                .zip(dus.par_chunks(half * ROWS_PER_TASK))
                .for_each(|((dp, p), du)| {
                    let rows = dp
                        .chunks_exact_mut(2 * half)
                        .zip(p.chunks_exact(2 * half))
                        .zip(du.chunks_exact(half));
                    for ((dp, p), du) in rows {
                        let (da, dg) = dp.split_at_mut(half);
                        let (a, g) = p.split_at(half);
                        for i in 0..half {
                            let (gelu, slope) = gelu_and_slope(g[i]);
                            da[i] = du[i] * gelu;
                            dg[i] = du[i] * a[i] * slope;
                        }
                    }
                });
            Ok(dp)
        })
    })?;
    Tensor::from_vec(dp, p.shape(), p.device())
}

impl CustomOp1 for GegluLinear {
    fn name(&self) -> &'static str {
        "geglu-linear"
    }
    precomputed_forward!(1);
    fn bwd(&self, p: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.p_grad(p, grad)
    }
}

impl CustomOp2 for GegluLinear {
    fn name(&self) -> &'static str {
        "geglu-linear"
    }
    precomputed_forward!(2);
    fn bwd(
        &self,
        p: &Tensor,
        residual: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dr = residual.track_op().then(|| grad.clone());
        Ok((self.p_grad(p, grad)?, dr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::linear::tests::{rel, var_or_const};
    use candle_core::{DType, Device};

    #[test]
    fn geglu_linear_matches_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        // f32: the CPU kernels; f64: the candle-op path other devices take.
        for dtype in [DType::F32, DType::F64] {
            for (p_grad, residual) in [(true, true), (true, false), (false, true)] {
                let rnd = |s: &[usize]| Tensor::randn(0f32, 1.5, s, &dev)?.to_dtype(dtype);
                // rows of 2·I = 12, more rows than one parallel task takes
                let (p, pv) = var_or_const(rnd(&[2, 21, 12])?, p_grad)?;
                let (w, b) = (rnd(&[5, 6])?, rnd(&[5])?);
                let (r, rv) = var_or_const(rnd(&[2, 21, 5])?, residual)?;
                let probe = rnd(&[2, 21, 5])?;
                let ours = geglu_linear(&p, &w, Some(&b), None, Some(&r))?;
                let plain = composed(&geglu(&p)?, &w, Some(&b), None, Some(&r))?;
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert!(rel(&ours, &plain) < tol, "values {}", rel(&ours, &plain));
                let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
                let g_plain = (&plain * &probe)?.sum_all()?.backward()?;
                for (name, v) in [("p", &pv), ("residual", &rv)] {
                    if let Some(v) = v {
                        let (a, q) = (g_ours.get(v).unwrap(), g_plain.get(v).unwrap());
                        // candle's GELU gradient rounds its density constant (0.398942)
                        assert!(
                            rel(a, q) < 1e-5,
                            "{name} gradient {} ({dtype:?})",
                            rel(a, q)
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
