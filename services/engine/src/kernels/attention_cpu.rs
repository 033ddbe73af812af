//! Attention on the CPU in f32, straight from the projections' layout: `q` `[B, N, H·D]`, `k`
//! and `v` `[B, M, H·D]`, the output `[B, N, H·D]`.
//!
//! The candle-op version (`kernels::attention`) runs every step of the softmax as its own pass
//! over a chunk of scores: at 512² a self-attention layer's scores are 4096² floats per head,
//! and a dozen passes over them (forward and backward) make the layer memory-bound. Here a
//! block of query rows of one head is taken at a time, small enough that its scores stay in
//! the core's cache: one product gives the scores, one pass the probabilities (and the row's
//! log-sum-exp, for the backward), one product the output rows. The backward recomputes the
//! block's probabilities from the log-sum-exp, then `dV += Pᵀ·dO`, `dP = dO·Vᵀ`,
//! `dS = P ∘ (dP − rowsum(dO ∘ O))·scale`, `dQ = dS·K`, `dK += dSᵀ·Q`, each product one gemm
//! call on strided views of the token layout (no per-head copies). Blocks of different heads
//! run in parallel; each head's query blocks are split in two groups whose key and value
//! gradients are summed at the end, so that there is work for every core.

use rayon::prelude::*;

use super::gemm_strided;

/// Bytes of scores per block (per buffer): 128 query rows against 4096 keys. Products of
/// fewer rows run far below gemm's best (measured: 84 GFLOP/s per core at 32 rows, 145 at 128).
const BLOCK_BYTES: usize = 2 << 20;
/// Query-block groups per head in the backward pass.
const GROUPS: usize = 2;

#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub d: usize,
}

impl Dims {
    fn hd(&self) -> usize {
        self.heads * self.d
    }

    /// Query rows per block.
    fn block_rows(&self) -> usize {
        (BLOCK_BYTES / (4 * self.m.max(1)))
            .max(16)
            .min(self.n)
            .max(1)
    }

    /// `(start, rows)` of every query block.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + Clone {
        let (n, r) = (self.n, self.block_rows());
        (0..n.div_ceil(r)).map(move |i| (i * r, r.min(n - i * r)))
    }
}

/// [`gemm_strided`] on the calling thread (the blocks already run in parallel).
#[allow(clippy::too_many_arguments)]
fn gemm_view(
    dst: &mut [f32],
    dst_rs: usize,
    read: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    mnk: (usize, usize, usize),
    scale: f32,
) {
    let (lhs, rhs) = ((lhs, lhs_strides), (rhs, rhs_strides));
    gemm_strided(
        dst,
        dst_rs,
        read,
        lhs,
        rhs,
        mnk,
        scale,
        gemm::Parallelism::None,
    )
}

/// `e^x` to about 2 ulp, in a form the compiler vectorises (the softmax's exponentials are a
/// large share of attention's work at 4096 positions).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // e^x = 2^i · e^r, i = round(x / ln 2), |r| <= ln 2 / 2
    let i = (x * std::f32::consts::LOG2_E).round();
    // ln 2 in two parts, the first with trailing zeros so that `i · LN2_HI` is exact
    // (Cody and Waite); plain products, not `mul_add`, which without FMA in the target is a
    // library call per element
    let r = x - i * 0.693_145_75 - i * 1.428_606_8e-6;
    // Taylor to r^7 (error below 1e-8 relative on the interval)
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    f32::from_bits((((i as i32) + 127) as u32) << 23) * p
}

/// The query rows `[q0, q0 + rows)` of head `hi` of image `bi`, as a view into `q`.
fn rows_of(t: &[f32], dims: Dims, len: usize, bi: usize, hi: usize, r0: usize) -> &[f32] {
    &t[(bi * len + r0) * dims.hd() + hi * dims.d..]
}

/// The output `[B, N, H·D]` and each query row's log-sum-exp `[B, H, N]`.
pub(super) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, n, m, heads, d } = dims;
    let hd = dims.hd();
    let tasks: Vec<(usize, usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..heads).map(move |hi| (bi, hi)))
        .flat_map(|(bi, hi)| dims.blocks().map(move |(r0, rows)| (bi, hi, r0, rows)))
        .collect();
    let parts: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(bi, hi, r0, rows)| {
            let mut s = vec![0f32; rows * m];
            let (qv, kv, vv) = (
                rows_of(q, dims, n, bi, hi, r0),
                rows_of(k, dims, m, bi, hi, 0),
                rows_of(v, dims, m, bi, hi, 0),
            );
            // S = scale · Q Kᵀ
            gemm_view(
                &mut s,
                m,
                false,
                qv,
                (hd, 1),
                kv,
                (1, hd),
                (rows, m, d),
                scale,
            );
            let mut lse = vec![0f32; rows];
            for (row, l) in s.chunks_exact_mut(m).zip(&mut lse) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = exp(*x - max);
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                *l = max + sum.ln();
            }
            // O = P V
            let mut o = vec![0f32; rows * d];
            gemm_view(&mut o, d, false, &s, (m, 1), vv, (hd, 1), (rows, d, m), 1.0);
            (o, lse)
        })
        .collect();
    let mut out = vec![0f32; b * n * hd];
    let mut lse = vec![0f32; b * heads * n];
    for (&(bi, hi, r0, rows), (o, l)) in tasks.iter().zip(parts) {
        for (i, row) in o.chunks_exact(d).enumerate() {
            let at = (bi * n + r0 + i) * hd + hi * d;
            out[at..at + d].copy_from_slice(row);
        }
        let at = (bi * heads + hi) * n + r0;
        lse[at..at + rows].copy_from_slice(&l);
    }
    (out, lse)
}

/// Which inputs need a gradient.
#[derive(Clone, Copy, Debug)]
pub(super) struct Want {
    pub q: bool,
    pub k: bool,
    pub v: bool,
}

/// The gradients of `q`, `k` and `v` (in their layouts; empty where not wanted) for the output
/// gradient `g`, from the forward's output `o` and log-sum-exp `lse`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    g: &[f32],
    dims: Dims,
    scale: f32,
    want: Want,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, n, m, heads, d } = dims;
    let hd = dims.hd();
    let blocks: Vec<(usize, usize)> = dims.blocks().collect();
    let per_group = blocks.len().div_ceil(GROUPS).max(1);
    let tasks: Vec<(usize, usize, &[(usize, usize)])> = (0..b)
        .flat_map(|bi| (0..heads).map(move |hi| (bi, hi)))
        .flat_map(|(bi, hi)| blocks.chunks(per_group).map(move |c| (bi, hi, c)))
        .collect();
    struct Part {
        dq: Vec<f32>,
        dk: Vec<f32>,
        dv: Vec<f32>,
    }
    let parts: Vec<Part> = tasks
        .par_iter()
        .map(|&(bi, hi, group)| {
            let rows_max = group.iter().map(|&(_, r)| r).max().unwrap_or(0);
            let mut p = vec![0f32; rows_max * m];
            let mut ds = vec![0f32; rows_max * m];
            let group_rows: usize = group.iter().map(|&(_, r)| r).sum();
            let mut dq = vec![0f32; if want.q { group_rows * d } else { 0 }];
            let mut dk = vec![0f32; if want.k { m * d } else { 0 }];
            let mut dv = vec![0f32; if want.v { m * d } else { 0 }];
            let (kv, vv) = (
                rows_of(k, dims, m, bi, hi, 0),
                rows_of(v, dims, m, bi, hi, 0),
            );
            let mut done = 0;
            for &(r0, rows) in group {
                let (p, ds) = (&mut p[..rows * m], &mut ds[..rows * m]);
                let qv = rows_of(q, dims, n, bi, hi, r0);
                let (gv, ov) = (
                    rows_of(g, dims, n, bi, hi, r0),
                    rows_of(o, dims, n, bi, hi, r0),
                );
                // P = exp(scale · Q Kᵀ − lse)
                gemm_view(p, m, false, qv, (hd, 1), kv, (1, hd), (rows, m, d), scale);
                let lse = &lse[(bi * heads + hi) * n + r0..][..rows];
                for (row, &l) in p.chunks_exact_mut(m).zip(lse) {
                    row.iter_mut().for_each(|x| *x = exp(*x - l));
                }
                if want.v {
                    // dV += Pᵀ dO
                    gemm_view(&mut dv, d, true, p, (1, m), gv, (hd, 1), (m, d, rows), 1.0);
                }
                if !(want.q || want.k) {
                    continue;
                }
                // dP = dO Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)) · scale
                gemm_view(ds, m, false, gv, (hd, 1), vv, (1, hd), (rows, m, d), 1.0);
                for (i, (dsr, pr)) in ds.chunks_exact_mut(m).zip(p.chunks_exact(m)).enumerate() {
                    let (gr, or) = (&gv[i * hd..][..d], &ov[i * hd..][..d]);
                    let delta: f32 = gr.iter().zip(or).map(|(a, b)| a * b).sum();
                    for (x, &pp) in dsr.iter_mut().zip(pr) {
                        *x = pp * (*x - delta) * scale;
                    }
                }
                if want.q {
                    // dQ = dS K
                    let dq = &mut dq[done * d..];
                    gemm_view(dq, d, false, ds, (m, 1), kv, (hd, 1), (rows, d, m), 1.0);
                }
                if want.k {
                    // dK += dSᵀ Q
                    gemm_view(&mut dk, d, true, ds, (1, m), qv, (hd, 1), (m, d, rows), 1.0);
                }
                done += rows;
            }
            Part { dq, dk, dv }
        })
        .collect();
    let mut dq = vec![0f32; if want.q { b * n * hd } else { 0 }];
    let mut dk = vec![0f32; if want.k { b * m * hd } else { 0 }];
    let mut dv = vec![0f32; if want.v { b * m * hd } else { 0 }];
    for (&(bi, hi, group), part) in tasks.iter().zip(parts) {
        if want.q {
            let r0 = group.first().map_or(0, |&(r0, _)| r0);
            for (i, row) in part.dq.chunks_exact(d).enumerate() {
                let at = (bi * n + r0 + i) * hd + hi * d;
                dq[at..at + d].copy_from_slice(row);
            }
        }
        for (dst, src) in [(&mut dk, &part.dk), (&mut dv, &part.dv)] {
            for (j, row) in src.chunks_exact(d).enumerate() {
                let at = (bi * m + j) * hd + hi * d;
                dst[at..at + d]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(a, b)| *a += b);
            }
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_accurate_across_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1e-37);
    }
}
