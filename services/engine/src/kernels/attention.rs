//! Scaled dot-product attention that never holds the whole `N x M` probability matrix.
//!
//! The plain composition (`softmax(q kᵀ · scale) v`) keeps, per layer, the scores and the
//! probabilities of every head for the backward pass: at 512² (4096 latent positions) that is
//! 4096² floats per head, hundreds of MB per self-attention layer. Here the queries are taken
//! in chunks: the forward computes each chunk's probabilities, its output rows and the rows'
//! log-sum-exp, and drops the probabilities; the backward computes them again from `q`, `k` and
//! the saved log-sum-exp, chunk by chunk (FlashAttention's recomputation, with candle's matrix
//! products as the inner loop). The op keeps `q`, `k`, `v`, the output and one float per query
//! row. Values and gradients equal the plain composition's to rounding (tests below).

use candle_core::{CustomOp3, DType, Result, Tensor, D};

use super::attention_cpu;
use super::{cpu_f32, with_f32, Output};

/// Most score elements (`chunk x M` per batch and head, all heads together) computed at once:
/// 16 Mi floats, 64 MB in f32.
const CHUNK_ELEMENTS: usize = 1 << 24;

/// Query rows per chunk for `[b, h, n, _]` queries against `m` keys.
fn chunk_rows(b: usize, h: usize, n: usize, m: usize) -> usize {
    (CHUNK_ELEMENTS / (b * h * m).max(1)).clamp(1, n.max(1))
}

/// `softmax(q kᵀ · scale) v` for `q` `[B, H, N, D]`, `k` and `v` `[B, H, M, D]`. The scores are
/// computed in the dtype of `q` and `k` (upcast them first for f32 scores) and the softmax in
/// f32; the probabilities multiply `v` in its dtype. Differentiable in all three inputs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (o, lse) = forward_chunked(&q.detach(), &k.detach(), &v.detach(), scale)?;
    record(q, k, v, o, lse, scale, None)
}

/// The output `o` as the attention op's, when an input is in a graph.
fn record(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: Tensor,
    lse: Tensor,
    scale: f64,
    tokens: Option<TokenLayout>,
) -> Result<Tensor> {
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(o);
    }
    let op = Attention {
        y: Output::new(o),
        lse,
        scale,
        tokens,
    };
    q.apply_op3(k, v, op)
}

/// The same attention for `q` `[B, N, H·D]`, `k` and `v` `[B, M, H·D]` as the projections give
/// them, `heads` heads, the output `[B, N, H·D]` as the output projection takes it. The copies
/// into and out of the per-head layout are made inside the op (again in its backward), so the
/// graph keeps only the projections' outputs and this output, not four more copies of the
/// same size. `upcast`: scores in f32 for half-precision `q` and `k`.
pub fn attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    if cpu_f32(&[q, k, v]) {
        return cpu_attention(q, k, v, heads, scale);
    }
    let (qh, kh) = (
        to_heads(&q.detach(), heads, upcast)?,
        to_heads(&k.detach(), heads, upcast)?,
    );
    let vh = to_heads(&v.detach(), heads, false)?;
    let (o, lse) = forward_chunked(&qh, &kh, &vh, scale)?;
    drop((qh, kh, vh));
    let layout = TokenLayout {
        heads,
        upcast,
        cpu: false,
    };
    record(q, k, v, from_heads(&o)?, lse, scale, Some(layout))
}

/// [`attention_tokens`] by the CPU kernel (`kernels::attention_cpu`).
fn cpu_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let dims = cpu_dims(q, k, heads)?;
    let (o, lse) = with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                Ok(attention_cpu::forward(qs, ks, vs, dims, scale as f32))
            })
        })
    })?;
    let o = Tensor::from_vec(o, q.shape(), q.device())?;
    let lse = Tensor::from_vec(lse, (dims.b, dims.heads, dims.n), q.device())?;
    let layout = TokenLayout {
        heads,
        upcast: false,
        cpu: true,
    };
    record(q, k, v, o, lse, scale, Some(layout))
}

fn cpu_dims(q: &Tensor, k: &Tensor, heads: usize) -> Result<attention_cpu::Dims> {
    let (b, n, hd) = q.dims3()?;
    let m = k.dim(1)?;
    if hd % heads != 0 || k.dims3()? != (b, m, hd) {
        candle_core::bail!(
            "attention: q {:?} and k {:?} for {heads} heads",
            q.dims(),
            k.dims()
        );
    }
    Ok(attention_cpu::Dims {
        b,
        n,
        m,
        heads,
        d: hd / heads,
    })
}

/// `[B, N, H·D]` as a contiguous `[B, H, N, D]`, in f32 when `upcast`.
fn to_heads(t: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    let (b, n, hd) = t.dims3()?;
    let t = t.reshape((b, n, heads, hd / heads))?.transpose(1, 2)?;
    if upcast {
        t.to_dtype(DType::F32)?.contiguous()
    } else {
        t.contiguous()
    }
}

/// `[B, H, N, D]` as a contiguous `[B, N, H·D]`.
fn from_heads(t: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = t.dims4()?;
    t.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))
}

/// The output `[B, H, N, D]` and the log-sum-exp of each query row `[B, H, N, 1]` (f32).
fn forward_chunked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let rows = chunk_rows(b, h, n, m);
    let kt = k.t()?;
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let qc = q.narrow(2, start, len)?;
        let s = (qc.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&sum)?;
        outs.push(p.to_dtype(v.dtype())?.matmul(v)?);
        lses.push((max + sum.log()?)?);
        start += len;
    }
    let o = join_chunks(outs)?.expect("at least one query row");
    let lse = join_chunks(lses)?.expect("at least one query row");
    Ok((o.contiguous()?, lse))
}

/// The chunks along the query dimension as one tensor (`None` for no chunk).
fn join_chunks(mut chunks: Vec<Tensor>) -> Result<Option<Tensor>> {
    match chunks.len() {
        0 | 1 => Ok(chunks.pop()),
        _ => Tensor::cat(&chunks, 2).map(Some),
    }
}

struct Attention {
    /// The output, handed to candle by the forward (see [`Output`]).
    y: Output,
    lse: Tensor,
    scale: f64,
    /// Set when the arguments and the output are in the projections' layout.
    tokens: Option<TokenLayout>,
}

#[derive(Clone, Copy)]
struct TokenLayout {
    heads: usize,
    upcast: bool,
    /// Computed by the CPU kernel (whose log-sum-exp is `[B, H, N]`).
    cpu: bool,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    precomputed_forward!(3);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Only the inputs in a graph get a gradient (the keys and values of a cross-attention
        // whose projections are frozen are not).
        let want = (q.track_op(), k.track_op(), v.track_op());
        let Some(TokenLayout { heads, upcast, cpu }) = self.tokens else {
            return self.backward_heads(&q.detach(), &k.detach(), &v.detach(), out, grad, want);
        };
        if cpu {
            return self.backward_cpu(q, k, v, out, grad, heads, want);
        }
        let (dq, dk, dv) = self.backward_heads(
            &to_heads(&q.detach(), heads, upcast)?,
            &to_heads(&k.detach(), heads, upcast)?,
            &to_heads(&v.detach(), heads, false)?,
            &to_heads(out, heads, false)?,
            &to_heads(grad, heads, false)?,
            want,
        )?;
        let back = |g: Option<Tensor>, like: &Tensor| -> Result<Option<Tensor>> {
            g.map(|g| from_heads(&g)?.to_dtype(like.dtype()))
                .transpose()
        };
        Ok((back(dq, q)?, back(dk, k)?, back(dv, v)?))
    }
}

impl Attention {
    /// The gradients by the CPU kernel, in the token layout.
    #[allow(clippy::too_many_arguments)]
    fn backward_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
        heads: usize,
        (wq, wk, wv): (bool, bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = cpu_dims(q, k, heads)?;
        let want = attention_cpu::Want {
            q: wq,
            k: wk,
            v: wv,
        };
        let grad = grad.to_dtype(DType::F32)?;
        let (dq, dk, dv) = with_f32(q, |qs| {
            with_f32(k, |ks| {
                with_f32(v, |vs| {
                    with_f32(out, |os| {
                        with_f32(&self.lse, |ls| {
                            with_f32(&grad, |gs| {
                                Ok(attention_cpu::backward(
                                    qs,
                                    ks,
                                    vs,
                                    os,
                                    ls,
                                    gs,
                                    dims,
                                    self.scale as f32,
                                    want,
                                ))
                            })
                        })
                    })
                })
            })
        })?;
        let wrap = |g: Vec<f32>, wanted: bool, like: &Tensor| -> Result<Option<Tensor>> {
            wanted
                .then(|| Tensor::from_vec(g, like.shape(), like.device()))
                .transpose()
        };
        Ok((wrap(dq, wq, q)?, wrap(dk, wk, k)?, wrap(dv, wv, v)?))
    }

    /// The gradients in the per-head layout (`want`: which of q, k, v need one).
    fn backward_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
        want: (bool, bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, n, _) = q.dims4()?;
        let m = k.dim(2)?;
        let rows = chunk_rows(b, h, n, m);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        // rowsum(dO ∘ O): the softmax backward's correction, one float per query row.
        let delta = (f32(grad)? * f32(out)?)?.sum_keepdim(D::Minus1)?;
        let (kt, vt) = (k.t()?, v.t()?);
        let mut dq = Vec::new();
        let mut dk: Option<Tensor> = None;
        let mut dv: Option<Tensor> = None;
        let add = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + t)?,
                None => t,
            }))
        };
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let qc = q.narrow(2, start, len)?;
            let go = grad.narrow(2, start, len)?;
            let s = (qc.matmul(&kt)? * self.scale)?.to_dtype(DType::F32)?;
            let p = s.broadcast_sub(&self.lse.narrow(2, start, len)?)?.exp()?;
            if want.2 {
                dv = add(
                    dv,
                    p.to_dtype(v.dtype())?
                        .t()?
                        .matmul(&go.to_dtype(v.dtype())?)?,
                )?;
            }
            let dp = f32(&go.to_dtype(v.dtype())?.matmul(&vt)?)?;
            let ds = (p * dp.broadcast_sub(&delta.narrow(2, start, len)?)?)?
                .affine(self.scale, 0.0)?
                .to_dtype(q.dtype())?;
            if want.0 {
                dq.push(ds.matmul(&k)?);
            }
            if want.1 {
                dk = add(dk, ds.t()?.matmul(&qc)?)?;
            }
            start += len;
        }
        Ok((join_chunks(dq)?, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The plain composition this op replaces.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let s = (q.matmul(&k.t()?)? * scale)?;
        crate::nn::softmax_last_differentiable(&s)?.matmul(v)
    }

    use crate::kernels::rel_err as rel;

    fn check(shape_q: (usize, usize, usize, usize), m: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, n, d) = shape_q;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, m, d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, m, d), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
        let scale = (d as f64).powf(-0.5);
        let ours = attention(&q, &k, &v, scale)?;
        let plain = reference(&q, &k, &v, scale)?;
        assert!(rel(&ours, &plain) < 1e-5, "values {}", rel(&ours, &plain));
        let g_ours = (ours * &w)?.sum_all()?.backward()?;
        let g_plain = (plain * &w)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, r) = (g_ours.get(var).unwrap(), g_plain.get(var).unwrap());
            assert!(rel(a, r) < 1e-5, "{name} grad {}", rel(a, r));
        }
        Ok(())
    }

    #[test]
    fn matches_the_plain_composition_in_values_and_gradients() -> Result<()> {
        check((2, 3, 40, 8), 40)?; // self-attention, one chunk
        check((1, 2, 33, 16), 7) // cross-attention
    }

    #[test]
    fn chunked_queries_give_the_same_values_and_gradients() -> Result<()> {
        // 2 * 4 * 4096 scores per query row: chunks of 512 rows, the last one short.
        assert_eq!(chunk_rows(2, 4, 1100, 4096), 512);
        check((2, 4, 1100, 4), 4096)
    }

    /// The token-layout op against the per-head one on the same values: in f32 on the CPU
    /// the CPU kernel, in f64 the candle ops other devices run.
    fn check_tokens(b: usize, heads: usize, n: usize, m: usize, d: usize, dt: DType) -> Result<()> {
        let dev = Device::Cpu;
        let tok = |len: usize| -> Result<Var> {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, len, heads * d), &dev)?.to_dtype(dt)?)
        };
        let (q, k, v) = (tok(n)?, tok(m)?, tok(m)?);
        let w = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev)?.to_dtype(dt)?;
        let scale = (d as f64).powf(-0.5);
        let ours = attention_tokens(&q, &k, &v, heads, scale, false)?;
        let split = |t: &Tensor| -> Result<Tensor> {
            let len = t.dim(1)?;
            t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let plain = reference(&split(&q)?, &split(&k)?, &split(&v)?, scale)?
            .transpose(1, 2)?
            .reshape((b, n, heads * d))?;
        let rel = |a: &Tensor, b: &Tensor| {
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            rel(&f(a), &f(b))
        };
        assert!(rel(&ours, &plain) < 1e-5, "values {}", rel(&ours, &plain));
        let g_ours = (ours * &w)?.sum_all()?.backward()?;
        let g_plain = (plain * &w)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, r) = (g_ours.get(var).unwrap(), g_plain.get(var).unwrap());
            assert_eq!(a.dims(), var.dims());
            assert!(rel(a, r) < 1e-5, "{name} grad {} ({dt:?})", rel(a, r));
        }
        Ok(())
    }

    #[test]
    fn token_layout_matches_the_per_head_op() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            check_tokens(2, 3, 40, 40, 8, dt)?; // self-attention
            check_tokens(1, 2, 33, 7, 16, dt)?; // cross-attention
            check_tokens(1, 2, 5, 9, 4, dt)?; // fewer query rows than a block's least
        }
        // query blocks of 32 rows against 4096 keys, in two groups per head, the last short
        check_tokens(1, 4, 1100, 4096, 2, DType::F32)
    }

    /// Frozen keys and values (a cross-attention whose projections do not train) get no
    /// gradient, and half-precision inputs with `upcast` give the f32 result to f16 rounding.
    #[test]
    fn token_layout_upcasts_and_skips_frozen_inputs() -> Result<()> {
        let dev = Device::Cpu;
        let q = Var::randn(0f32, 1.0, (1, 9, 8), &dev)?;
        let kv = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev)?;
        let o = attention_tokens(&q, &kv, &kv, 2, 0.5, false)?;
        let g = o.sum_all()?.backward()?;
        assert!(g.get(&q).is_some());
        assert!(g.get(&kv).is_none());
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let o16 = attention_tokens(&half(&q)?, &half(&kv)?, &half(&kv)?, 2, 0.5, true)?;
        assert_eq!(o16.dtype(), DType::F16);
        assert!(rel(&o16.to_dtype(DType::F32)?, &o) < 2e-3);
        Ok(())
    }

    #[test]
    fn without_a_graph_it_records_nothing() -> Result<()> {
        let q = Tensor::randn(0f32, 1.0, (1, 1, 5, 4), &Device::Cpu)?;
        let o = attention(&q, &q, &q, 0.5)?;
        assert!(!o.track_op());
        assert!(rel(&o, &reference(&q, &q, &q, 0.5)?) < 1e-6);
        Ok(())
    }
}
