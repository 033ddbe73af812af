//! In-place CPU kernels for the image towers' inference: `y = act(y + bias)` after the first MLP
//! matrix product, `y += bias + residual` after the others and the attention softmax. One pass
//! each over memory instead of the two to six passes (and fresh allocations) of the composed
//! tensor ops, split across threads, with `exp` and `erf` in vectorisable f32 arithmetic
//! (AVX2/FMA when the CPU has them).
//!
//! Other devices, dtypes or layouts take the composed candle ops ([`Activation::apply`]), so a
//! model runs the same everywhere; only the CPU is faster.

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use sidbooth_engine::nn::Activation;

// The kernels write into `x`: it must be a tensor of its own (a matrix product's output), not a
// view of a tensor that is still in use elsewhere.

/// `act(x + bias)`, `x`: `[..., n]` from a matrix product, `bias`: `[n]`.
pub fn bias_act(x: Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    let kind = match act {
        Activation::Gelu => Some(Kind::Gelu),
        Activation::QuickGelu => Some(Kind::QuickGelu),
        _ => None,
    };
    match (kind, bias) {
        (Some(kind), Some(b)) if fusable(&x, &[b]) && fits(&x, b) => {
            x.inplace_op2(b, &BiasAct(kind))?;
            Ok(x)
        }
        _ => act.apply(&with_bias(x, bias)?),
    }
}

/// `x + bias`, `x`: `[..., n]` from a matrix product, `bias`: `[n]`.
pub fn bias(x: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) if fusable(&x, &[b]) && fits(&x, b) => {
            x.inplace_op2(b, &BiasAct(Kind::Identity))?;
            Ok(x)
        }
        _ => with_bias(x, bias),
    }
}

/// `x + bias + residual`, `x`: `[..., n]` from a matrix product, `residual` of its shape.
pub fn bias_residual(x: Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
    match bias {
        Some(b) if fusable(&x, &[b, residual]) && fits(&x, b) && residual.dims() == x.dims() => {
            x.inplace_op3(b, residual, &BiasResidual)?;
            Ok(x)
        }
        _ => with_bias(x, bias)? + residual,
    }
}

/// Softmax over the last dimension of attention scores (a matrix product's output).
pub fn softmax_last(x: Tensor) -> Result<Tensor> {
    if fusable(&x, &[]) && x.rank() > 0 {
        x.inplace_op1(&SoftmaxLast)?;
        return Ok(x);
    }
    sidbooth_engine::nn::softmax_last(&x)
}

fn with_bias(x: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => x.broadcast_add(b),
        None => Ok(x),
    }
}

/// A bias of `x`'s last dimension (anything else goes through the broadcasting ops, which
/// report the mismatch).
fn fits(x: &Tensor, bias: &Tensor) -> bool {
    bias.dims().len() == 1 && x.dims().last() == bias.dims().first()
}

fn fusable(x: &Tensor, others: &[&Tensor]) -> bool {
    let ok = |t: &Tensor| {
        t.device().is_cpu()
            && t.dtype() == DType::F32
            && t.layout().is_contiguous()
            && !t.track_op()
    };
    ok(x) && others.iter().all(|t| ok(t))
}

#[derive(Clone, Copy)]
enum Kind {
    Identity,
    Gelu,
    QuickGelu,
}

struct BiasAct(Kind);
struct BiasResidual;
struct SoftmaxLast;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("fused kernel: not f32"),
    }
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match s {
        CpuStorage::F32(v) => {
            Ok(&mut v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
        }
        _ => candle_core::bail!("fused kernel: not f32"),
    }
}

/// Runs `f` on consecutive whole rows of `x` (rows of `n`) on the CPU's threads; `f` gets the
/// rows and the index of the first.
fn par_rows(x: &mut [f32], n: usize, f: impl Fn(&mut [f32], usize) + Sync) {
    let rows = x.len() / n.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    // below ~64k values a thread costs more than it saves
    if threads == 1 || x.len() < 1 << 16 {
        return f(x, 0);
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in x.chunks_mut(per * n).enumerate() {
            let f = &f;
            s.spawn(move || f(chunk, i * per));
        }
    });
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let bias = f32s(b, bl)?;
        let x = f32s_mut(dst, dl)?;
        let n = bias.len();
        // one monomorphised loop per activation, so that each vectorises
        match self.0 {
            Kind::Identity => par_rows(x, n, |rows, _| run(rows, bias, |v| v)),
            Kind::Gelu => par_rows(x, n, |rows, _| run(rows, bias, gelu)),
            Kind::QuickGelu => par_rows(x, n, |rows, _| run(rows, bias, quick_gelu)),
        }
        Ok(())
    }
}

impl InplaceOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias-residual"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        let bias = f32s(b, bl)?;
        let residual = f32s(r, rl)?;
        let x = f32s_mut(dst, dl)?;
        let n = bias.len();
        par_rows(x, n, |rows, first| {
            let res = &residual[first * n..first * n + rows.len()];
            for (row, rrow) in rows.chunks_exact_mut(n).zip(res.chunks_exact(n)) {
                for ((v, &b), &r) in row.iter_mut().zip(bias).zip(rrow) {
                    *v = (*v + b) + r;
                }
            }
        });
        Ok(())
    }
}

impl InplaceOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout) -> Result<()> {
        let n = dl.dims().last().copied().unwrap_or(1);
        let x = f32s_mut(dst, dl)?;
        par_rows(x, n, |rows, _| softmax_rows(rows, n));
        Ok(())
    }
}

/// `exp(x - max) / sum` per row of `n`, compiled for AVX2/FMA when the CPU has them.
fn softmax_rows(rows: &mut [f32], n: usize) {
    /// Eight running lanes, so that the reductions vectorise.
    const LANES: usize = 8;
    #[inline(always)]
    fn body(rows: &mut [f32], n: usize) {
        for row in rows.chunks_exact_mut(n) {
            let mut lanes = [f32::NEG_INFINITY; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for (m, &v) in lanes.iter_mut().zip(c) {
                    *m = m.max(v);
                }
            }
            let max = lanes
                .iter()
                .chain(tail)
                .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let mut lanes = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for (s, &v) in lanes.iter_mut().zip(c) {
                    *s += v;
                }
            }
            let sum: f32 = lanes.iter().chain(tail).sum();
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(rows: &mut [f32], n: usize) {
            body(rows, n)
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2(rows, n) };
        }
    }
    body(rows, n)
}

/// `v = f(v + bias)` over rows, compiled for AVX2/FMA when the CPU has them.
fn run(rows: &mut [f32], bias: &[f32], f: impl Fn(f32) -> f32) {
    #[inline(always)]
    fn body(rows: &mut [f32], bias: &[f32], f: &impl Fn(f32) -> f32) {
        for row in rows.chunks_exact_mut(bias.len()) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v = f(*v + b);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(rows: &mut [f32], bias: &[f32], f: &impl Fn(f32) -> f32) {
            body(rows, bias, f)
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2(rows, bias, &f) };
        }
    }
    body(rows, bias, &f)
}

/// `torch.nn.functional.gelu` (exact, erf form).
#[inline(always)]
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// CLIP's `quick_gelu`: `v * sigmoid(1.702 v)`.
#[inline(always)]
fn quick_gelu(v: f32) -> f32 {
    v / (1.0 + exp(-1.702 * v))
}

/// `e^x` in f32 (Cephes' `expf`: `2^k · p(r)` with `r = x - k ln 2`), within 2 ulp; 0 below -87
/// (where f32 turns subnormal; a masked score of -inf gives exactly 0). Branch-free, so that
/// loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // all ones where the result is representable, else zeros (a select without a branch)
    let keep = u32::from(x >= -87.0).wrapping_neg();
    let x = x.clamp(-87.0, 88.0);
    // round(x / ln 2) by the 1.5 * 2^23 trick (round to nearest even)
    const SHIFT: f32 = 12_582_912.0;
    let t = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let k = t - SHIFT;
    // ln 2 in two parts: 0.693359375 (this literal's f32 value, exact) and -2.12194440e-4
    let r = k.mul_add(-0.693_359_4, x);
    let r = k.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits(((t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23) as u32);
    f32::from_bits((y * scale).to_bits() & keep)
}

/// The error function in f32 (a rational approximation on [-4, 4], as Eigen's
/// `generic_fast_erf_float`), within 5e-7 of the exact value; branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906_3e-4);
    p = p.mul_add(x2, -2.954_6e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5_f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in -86_000..88_000 {
            let x = i as f32 * 1e-3;
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp(x)) - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
    }

    #[test]
    fn erf_is_within_5e_7() {
        let xs: Vec<f32> = (-600_000..600_000).map(|i| i as f32 * 1e-5).collect();
        let exact = Tensor::new(
            xs.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .and_then(|t| t.erf())
        .and_then(|t| t.to_vec1::<f64>())
        .unwrap();
        let worst = xs
            .iter()
            .zip(&exact)
            .map(|(&x, &e)| (f64::from(erf(x)) - e).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "absolute error {worst}");
    }

    fn composed(x: &Tensor, b: &Tensor, act: Activation) -> Tensor {
        act.apply(&x.broadcast_add(b).unwrap()).unwrap()
    }

    #[test]
    fn fused_kernels_match_the_composed_ops() {
        let dev = Device::Cpu;
        // big enough to be split across threads
        let x = Tensor::randn(0f32, 2.0, (300, 257), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 257, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (300, 257), &dev).unwrap();
        for act in [Activation::Gelu, Activation::QuickGelu, Activation::Silu] {
            let want = composed(&x, &b, act);
            let got = bias_act(x.copy().unwrap(), Some(&b), act).unwrap();
            let err = (want - got).unwrap().abs().unwrap().max_all().unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 3e-6, "{act:?}");
        }
        let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let got = softmax_last(x.copy().unwrap()).unwrap();
        let err = (want - got).unwrap().abs().unwrap().max_all().unwrap();
        let err = err.to_scalar::<f32>().unwrap();
        assert!(err < 1e-6, "softmax {err}");
        let want = (x.broadcast_add(&b).unwrap() + &r).unwrap();
        let got = bias_residual(x.copy().unwrap(), Some(&b), &r).unwrap();
        let err = (want - got).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(err.to_scalar::<f32>().unwrap(), 0.0);
    }
}
