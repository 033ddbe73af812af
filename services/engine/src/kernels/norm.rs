//! Group and layer normalisation (with the SiLU that follows every resnet norm folded in) as
//! single CPU kernels with their own backward pass.
//!
//! Composed from candle ops a group norm is about ten passes over the activations, each with
//! its own output that the graph keeps for the backward pass (the centred input, its square,
//! the normalised values, the scaled ones...). Here the forward is two passes (statistics,
//! then output), the op keeps its input plus two floats per group, and the backward recomputes
//! the normalised values from them. Both norms are the same computation over a view
//! `[segments, channels, spatial]`: a group norm's segment is one group of one image, a layer
//! norm's one row (`spatial` = 1). f32 on the CPU; other devices and dtypes use the composed
//! ops (see `nn`).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, with_f32};

/// How the normalised tensor is viewed.
#[derive(Clone, Copy, Debug)]
struct Segments {
    /// Segments per image whose channels are distinct (groups; 1 for a layer norm).
    groups: usize,
    /// Channels per segment.
    channels: usize,
    /// Contiguous elements per channel.
    spatial: usize,
}

impl Segments {
    fn len(&self) -> usize {
        self.channels * self.spatial
    }

    /// The first affine channel of segment `i`.
    fn first_channel(&self, i: usize) -> usize {
        (i % self.groups) * self.channels
    }
}

fn silu_grad(z: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-z).exp());
    (z * s, s * (1.0 + z * (1.0 - s)))
}

/// Mean and 1/std of every segment.
fn statistics(x: &[f32], seg: Segments, eps: f64) -> Vec<(f32, f32)> {
    x.par_chunks(seg.len())
        .map(|s| {
            let n = s.len() as f64;
            let mean = s.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = s
                .iter()
                .map(|&v| {
                    let d = v as f64 - mean;
                    d * d
                })
                .sum::<f64>()
                / n;
            (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
        })
        .collect()
}

fn forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    seg: Segments,
    stats: &[(f32, f32)],
    silu: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(seg.len())
        .zip(x.par_chunks(seg.len()))
        .enumerate()
        .for_each(|(i, (ys, xs))| {
            let (mean, rstd) = stats[i];
            let c0 = seg.first_channel(i);
            for j in 0..seg.channels {
                let (scale, shift) = (w[c0 + j] * rstd, b[c0 + j] - mean * rstd * w[c0 + j]);
                let r = j * seg.spatial..(j + 1) * seg.spatial;
                for (o, &v) in ys[r.clone()].iter_mut().zip(&xs[r]) {
                    let z = v * scale + shift;
                    *o = if silu { z / (1.0 + (-z).exp()) } else { z };
                }
            }
        });
    y
}

/// `(dx, dw, db)` of `y = act(xhat · w + b)`.
fn backward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
    seg: Segments,
    stats: &[(f32, f32)],
    silu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n_channels = seg.groups * seg.channels;
    let mut dx = vec![0f32; x.len()];
    // Per segment: its channels' sums of dz · xhat and dz (reduced over images below).
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(seg.len())
        .zip(x.par_chunks(seg.len()).zip(dy.par_chunks(seg.len())))
        .enumerate()
        .map(|(i, (dxs, (xs, dys)))| {
            let (mean, rstd) = stats[i];
            let c0 = seg.first_channel(i);
            let (mut dw, mut db) = (vec![0f32; seg.channels], vec![0f32; seg.channels]);
            // First pass: dz into dxs, the segment's sums of dxhat and dxhat · xhat.
            let (mut sum1, mut sum2) = (0f64, 0f64);
            for j in 0..seg.channels {
                let (wc, bc) = (w[c0 + j], b[c0 + j]);
                let r = j * seg.spatial..(j + 1) * seg.spatial;
                let (mut sw, mut sb) = (0f64, 0f64);
                for ((d, &v), &g) in dxs[r.clone()].iter_mut().zip(&xs[r.clone()]).zip(&dys[r]) {
                    let xhat = (v - mean) * rstd;
                    let dz = if silu {
                        g * silu_grad(xhat * wc + bc).1
                    } else {
                        g
                    };
                    sw += (dz * xhat) as f64;
                    sb += dz as f64;
                    let dxhat = dz * wc;
                    sum1 += dxhat as f64;
                    sum2 += (dxhat * xhat) as f64;
                    *d = dxhat;
                }
                dw[j] = sw as f32;
                db[j] = sb as f32;
            }
            let n = seg.len() as f64;
            let (m1, m2) = ((sum1 / n) as f32, (sum2 / n) as f32);
            for (d, &v) in dxs.iter_mut().zip(xs) {
                let xhat = (v - mean) * rstd;
                *d = rstd * (*d - m1 - xhat * m2);
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f32; n_channels], vec![0f32; n_channels]);
    for (i, (pw, pb)) in partial.iter().enumerate() {
        let c0 = seg.first_channel(i);
        for j in 0..seg.channels {
            dw[c0 + j] += pw[j];
            db[c0 + j] += pb[j];
        }
    }
    (dx, dw, db)
}

struct Norm {
    seg: Segments,
    eps: f64,
    silu: bool,
    /// Mean and 1/std of every segment, from the forward for the backward.
    stats: std::sync::Mutex<Vec<(f32, f32)>>,
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "fused-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(x, xl)?;
        let stats = statistics(xs, self.seg, self.eps);
        let y = forward(
            xs,
            f32_slice(w, wl)?,
            f32_slice(b, bl)?,
            self.seg,
            &stats,
            self.silu,
        );
        *self.stats.lock().expect("norm statistics") = stats;
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?;
        let stats = self.stats.lock().expect("norm statistics");
        let (dx, dw, db) = with_f32(&x, |xs| {
            with_f32(&w, |ws| {
                with_f32(&b, |bs| {
                    with_f32(&grad, |dys| {
                        Ok(backward(xs, ws, bs, dys, self.seg, &stats, self.silu))
                    })
                })
            })
        })?;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        // Only what is in a graph gets a gradient (SVDiff trains a norm's weight, not its
        // bias; LoRA neither).
        let dw = match w.track_op() {
            true => Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(Tensor::from_vec(db, b.shape(), b.device())?),
            false => None,
        };
        Ok((x.track_op().then_some(dx), dw, db))
    }
}

/// Whether the fused kernels serve these tensors.
pub fn supported(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    super::cpu_f32(&[x, w, b])
}

fn normalize(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    seg: Segments,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = Norm {
        seg,
        eps,
        silu,
        stats: Default::default(),
    };
    // candle records the op only when an argument is in a graph.
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// `torch.nn.GroupNorm(groups, C, eps)` on `[B, C, ...]`, followed by SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    let c = dims[1];
    let seg = Segments {
        groups,
        channels: c / groups,
        spatial: dims[2..].iter().product(),
    };
    normalize(x, w, b, seg, eps, silu)
}

/// `torch.nn.LayerNorm(D, eps)` over the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let seg = Segments {
        groups: 1,
        channels: d,
        spatial: 1,
    };
    normalize(x, w, b, seg, eps, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{silu, GroupNorm, LayerNorm};
    use candle_core::{Device, Var};

    use crate::kernels::rel_err as rel;

    fn vars(shape: &[usize], c: usize) -> Result<(Var, Var, Var)> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev)? + 0.5)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, c, &dev)?)?;
        Ok((x, w, b))
    }

    fn compare(ours: &Tensor, plain: &Tensor, vs: [&Var; 3]) -> Result<()> {
        assert!(rel(ours, plain) < 1e-5, "values {}", rel(ours, plain));
        let m = Tensor::randn(0f32, 1.0, ours.shape(), ours.device())?;
        let g_ours = (ours * &m)?.sum_all()?.backward()?;
        let g_plain = (plain * &m)?.sum_all()?.backward()?;
        for (name, v) in ["x", "weight", "bias"].iter().zip(vs) {
            let (a, r) = (g_ours.get(v).unwrap(), g_plain.get(v).unwrap());
            assert!(rel(a, r) < 1e-4, "{name} grad {}", rel(a, r));
        }
        Ok(())
    }

    #[test]
    fn group_norm_with_and_without_silu_matches_the_composed_ops() -> Result<()> {
        for silu_after in [false, true] {
            let (x, w, b) = vars(&[2, 8, 5, 3], 8)?;
            let gn = GroupNorm {
                weight: w.as_tensor().clone(),
                bias: b.as_tensor().clone(),
                groups: 4,
                eps: 1e-5,
            };
            let plain = gn.forward_composed(&x)?;
            let plain = if silu_after { silu(&plain)? } else { plain };
            let ours = group_norm(&x, &w, &b, 4, 1e-5, silu_after)?;
            compare(&ours, &plain, [&x, &w, &b])?;
        }
        Ok(())
    }

    #[test]
    fn layer_norm_matches_the_composed_ops() -> Result<()> {
        let (x, w, b) = vars(&[2, 7, 24], 24)?;
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-5,
        };
        let plain = ln.forward_differentiable(&x)?;
        let ours = layer_norm(&x, &w, &b, 1e-5)?;
        compare(&ours, &plain, [&x, &w, &b])
    }

    #[test]
    fn frozen_weights_get_no_gradient_and_inference_records_nothing() -> Result<()> {
        let (x, _, _) = vars(&[1, 4, 6], 4)?;
        let (w, b) = (
            Tensor::ones(4, DType::F32, &Device::Cpu)?,
            Tensor::zeros(4, DType::F32, &Device::Cpu)?,
        );
        let y = group_norm(&x, &w, &b, 2, 1e-5, true)?;
        let g = y.sum_all()?.backward()?;
        assert!(g.get(&x).is_some() && g.get(&w).is_none());
        let y = group_norm(&x.as_tensor().detach(), &w, &b, 2, 1e-5, true)?;
        assert!(!y.track_op());
        Ok(())
    }
}
