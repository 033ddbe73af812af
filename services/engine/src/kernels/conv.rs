//! 2-D convolution on the CPU in f32 as im2col and matrix products, a tile of output rows at a
//! time.
//!
//! candle's CPU convolution gathers tiles of 512 output pixels and scatters each tile's product
//! back element by element; a whole-image im2col is one large product but its column matrix is
//! `C·k² x H·W` floats, 300 MB for the VAE's first layers at 256², which the allocator maps and
//! the kernel zero-fills on every call. Here the columns of a few output rows (about 16 MB) are
//! built into one reused buffer, in parallel, and multiplied by gemm straight into the output
//! (or, for the kernel gradient, accumulated into it). Nothing here records a gradient: the
//! differentiable convolution (`kernels::layers::conv2d`) is built on these.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, gemm_raw, matmul_f32, with_f32};

/// Column-buffer floats per tile (16 MB: fewer, larger products pack the kernel fewer times;
/// measured faster than 4 MB and 64 MB on SD 2.1's layers).
const TILE_FLOATS: usize = 1 << 22;

#[derive(Clone, Copy, Debug)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(c: usize, h: usize, w: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
        if h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!(
                "conv2d: a {k}x{k} kernel does not fit a {h}x{w} input padded by {pad}"
            );
        }
        Ok(Self {
            c,
            h,
            w,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
        })
    }

    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Output rows per tile.
    fn tile_rows(&self) -> usize {
        (TILE_FLOATS / (self.rows() * self.wo).max(1)).clamp(1, self.ho)
    }

    /// The tiles of output rows: `(first row, rows)`.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        let (tile, ho) = (self.tile_rows(), self.ho);
        (0..ho).step_by(tile).map(move |r0| (r0, tile.min(ho - r0)))
    }
}

/// The rows `at..at + n` of every channel of one image's output gradient `grad` (`[O, Ho·Wo]`)
/// side by side in `dst` (`[O, n]`).
fn gather_tile(grad: &[f32], hw: usize, at: usize, n: usize, dst: &mut [f32]) {
    for (oi, d) in dst.chunks_mut(n).enumerate() {
        d.copy_from_slice(&grad[oi * hw + at..oi * hw + at + n]);
    }
}

/// Columns `[C·k², rows·Wo]` of output rows `r0..r0 + rows` of one image `src` (`[C, H, W]`).
fn im2col_rows(src: &[f32], g: Geometry, r0: usize, rows: usize, cols: &mut [f32]) {
    let n = rows * g.wo;
    cols.par_chunks_mut(n)
        .enumerate()
        .for_each(|(row, dst)| im2col_row(src, g, r0, rows, row, dst));
}

/// [`im2col_rows`] on the calling thread.
fn im2col_rows_serial(src: &[f32], g: Geometry, r0: usize, rows: usize, cols: &mut [f32]) {
    let n = rows * g.wo;
    cols.chunks_mut(n)
        .enumerate()
        .for_each(|(row, dst)| im2col_row(src, g, r0, rows, row, dst));
}

/// Column row `row` (one input channel and kernel offset) of [`im2col_rows`].
fn im2col_row(src: &[f32], g: Geometry, r0: usize, rows: usize, row: usize, dst: &mut [f32]) {
    let (ci, ky, kx) = (row / (g.k * g.k), (row / g.k) % g.k, row % g.k);
    let plane = &src[ci * g.h * g.w..(ci + 1) * g.h * g.w];
    // output columns whose input column is inside the image
    let ox0 = g.pad.saturating_sub(kx).div_ceil(g.stride);
    let ox1 = (g.w + g.pad)
        .saturating_sub(kx)
        .div_ceil(g.stride)
        .min(g.wo);
    for (t, oy) in (r0..r0 + rows).enumerate() {
        let d = &mut dst[t * g.wo..(t + 1) * g.wo];
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        if iy < 0 || iy >= g.h as isize || ox0 >= ox1 {
            d.fill(0.0);
            continue;
        }
        d[..ox0].fill(0.0);
        d[ox1..].fill(0.0);
        let srow = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        let ix0 = ox0 * g.stride + kx - g.pad;
        if g.stride == 1 {
            d[ox0..ox1].copy_from_slice(&srow[ix0..ix0 + (ox1 - ox0)]);
        } else {
            for (j, v) in d[ox0..ox1].iter_mut().enumerate() {
                *v = srow[ix0 + j * g.stride];
            }
        }
    }
}

/// Whether these kernels serve a convolution of `x` by `w`.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    cpu_f32(&[x, w])
}

/// `x.conv2d(w, padding, stride, 1, 1)` (square kernel, no bias) of `x` `[B, C, H, W]` by `w`
/// `[O, C, k, k]`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, _, k, _) = w.dims4()?;
    let (out, ho, wo) = with_f32(x, |xs| {
        with_f32(w, |ws| {
            conv2d_f32(xs, (b, c, h, wd), ws, (o, k), padding, stride)
        })
    })?;
    Tensor::from_vec(out, (b, o, ho, wo), x.device())
}

/// [`conv2d`] on values: `xs` `[B, C, H, W]`, `ws` `[O, C, k, k]`; the output and its size.
pub fn conv2d_f32(
    xs: &[f32],
    (b, c, h, wd): (usize, usize, usize, usize),
    ws: &[f32],
    (o, k): (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<(Vec<f32>, usize, usize)> {
    if ws.len() != o * c * k * k || xs.len() != b * c * h * wd {
        candle_core::bail!("conv2d: a [{o}, ?, {k}, {k}] kernel for a [{b}, {c}, {h}, {wd}] input");
    }
    let g = Geometry::new(c, h, wd, k, stride, padding)?;
    let hw = g.ho * g.wo;
    let mut out = vec![0f32; b * o * hw];
    if out.is_empty() {
        return Ok((out, g.ho, g.wo));
    }
    // Tiles of every image side by side, each built and multiplied on one thread: its columns
    // are read by the product while still in that core's cache, and a single-threaded gemm
    // per tile runs closer to its best than one split over the cores (measured: 380-400
    // against 290-330 GFLOP/s on two cores for SD 2.1's 3x3 layers). There are at least as
    // many tiles as threads, and where there are few, a multiple of the threads of equal
    // size (three tiles on two cores leave one idle a third of the time).
    let threads = rayon::current_num_threads().max(1);
    let mut per_image = g.ho.div_ceil(g.tile_rows());
    if b * per_image < 4 * threads {
        per_image = (b * per_image).div_ceil(threads) * threads / b.min(threads);
    }
    let tile_rows = g.ho.div_ceil(per_image.max(1)).max(1);
    let tiles: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| {
            (0..g.ho)
                .step_by(tile_rows)
                .map(move |r0| (bi, r0, tile_rows.min(g.ho - r0)))
        })
        .collect();
    // Each tile's product is written straight into its columns of the output (rows of
    // stride `Ho·Wo`), and each worker reuses one column buffer: no per-tile buffers to
    // allocate, zero-fill and copy out (a 16 MB column buffer and the product's copy per tile
    // at the VAE encoder's 256x256 layers; 2-4 % of a 256x256 training step).
    let dst = OutputTiles(out.as_mut_ptr(), out.len());
    tiles
        .par_iter()
        .for_each_init(Vec::new, |cols, &(bi, r0, rows)| {
            let src = &xs[bi * c * h * wd..(bi + 1) * c * h * wd];
            let n = rows * g.wo;
            cols.resize(g.rows() * n, 0f32);
            im2col_rows_serial(src, g, r0, rows, cols);
            let at = dst.tile_start(bi * o * hw + r0 * g.wo, o, n, hw);
            // SAFETY: `tile_start` checked that the tile lies inside `out`, tiles cover disjoint
            // output rows of disjoint images (no element is written twice), and the operands are
            // the slices' own row-major `[O, C·k²]` and `[C·k², n]`.
            unsafe {
                gemm_raw(
                    at,
                    hw,
                    false,
                    (ws.as_ptr(), (g.rows(), 1)),
                    (cols.as_ptr(), (n, 1)),
                    (o, n, g.rows()),
                    1.0,
                    gemm::Parallelism::None,
                )
            }
        });
    Ok((out, g.ho, g.wo))
}

/// The output of [`conv2d_f32`] as the workers see it: each writes its own tile's elements,
/// interleaved with the others' (a tile is some columns of every output channel), so no worker
/// may hold a slice of it.
struct OutputTiles(*mut f32, usize);

// SAFETY: the workers write disjoint elements (see `conv2d_f32`).
unsafe impl Sync for OutputTiles {}

impl OutputTiles {
    /// The first element of the `rows x cols` tile at `at` with row stride `stride`, after
    /// checking that the whole tile lies inside the output.
    fn tile_start(&self, at: usize, rows: usize, cols: usize, stride: usize) -> *mut f32 {
        assert!(rows > 0 && cols > 0 && at + (rows - 1) * stride + cols <= self.1);
        // SAFETY: in bounds, just checked.
        unsafe { self.0.add(at) }
    }
}

/// Adds columns `[C·k², rows·Wo]` of output rows `r0..r0 + rows` back into one image `dst`
/// (`[C, H, W]`): the adjoint of [`im2col_rows`].
fn col2im_rows(dst: &mut [f32], g: Geometry, r0: usize, rows: usize, cols: &[f32]) {
    let n = rows * g.wo;
    let kk = g.k * g.k;
    dst.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(ci, plane)| {
            for r in 0..kk {
                let (ky, kx) = (r / g.k, r % g.k);
                let src = &cols[(ci * kk + r) * n..(ci * kk + r + 1) * n];
                let ox0 = g.pad.saturating_sub(kx).div_ceil(g.stride);
                let ox1 = (g.w + g.pad)
                    .saturating_sub(kx)
                    .div_ceil(g.stride)
                    .min(g.wo);
                if ox0 >= ox1 {
                    continue;
                }
                for (t, oy) in (r0..r0 + rows).enumerate() {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let drow = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let srow = &src[t * g.wo..(t + 1) * g.wo];
                    let ix0 = ox0 * g.stride + kx - g.pad;
                    for (j, &v) in srow[ox0..ox1].iter().enumerate() {
                        drow[ix0 + j * g.stride] += v;
                    }
                }
            }
        });
}

/// The gradient of the input of `x.conv2d(w, padding, stride, 1, 1)` (`x` `[B, C, H, W]`) for
/// the output gradient `dy`: per tile of output rows, `wᵀ · dy` gives the columns' gradient,
/// which [`col2im_rows`] adds into the input's. No flipped copy of the kernel is made.
pub fn conv2d_input_grad(
    dy: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, o, ho, wo) = dy.dims4()?;
    let (_, c, k, _) = w.dims4()?;
    let g = Geometry::new(c, h, wd, k, stride, padding)?;
    if (g.ho, g.wo) != (ho, wo) {
        candle_core::bail!("conv2d input gradient: a {ho}x{wo} gradient for a {h}x{wd} input");
    }
    let dy = dy.to_dtype(DType::F32)?;
    let dx = with_f32(&dy, |dys| {
        with_f32(w, |ws| {
            let hw = ho * wo;
            let mut dx = vec![0f32; b * c * h * wd];
            let mut cols = vec![0f32; g.rows() * g.tile_rows() * wo];
            let mut dyt = vec![0f32; o * g.tile_rows() * wo];
            for bi in 0..b {
                let grad = &dys[bi * o * hw..(bi + 1) * o * hw];
                let dst = &mut dx[bi * c * h * wd..(bi + 1) * c * h * wd];
                for (r0, rows) in g.tiles() {
                    let n = rows * wo;
                    let dyt = &mut dyt[..o * n];
                    gather_tile(grad, hw, r0 * wo, n, dyt);
                    let cols = &mut cols[..g.rows() * n];
                    // cols[C·k², n] = wᵀ[C·k², O] · dyt[O, n]
                    matmul_f32(cols, n, false, (ws, true), (dyt, false), (g.rows(), n, o));
                    col2im_rows(dst, g, r0, rows, cols);
                }
            }
            Ok(dx)
        })
    })?;
    Tensor::from_vec(dx, (b, c, h, wd), dy.device())
}

/// The gradient of the kernel of `x.conv2d(w, padding, stride, 1, 1)` for the output gradient
/// `dy` `[B, O, Ho, Wo]`: `Σ_b dy_b · cols(x_b)ᵀ`, as `[O, C, k, k]`.
pub fn conv2d_weight_grad(
    x: &Tensor,
    dy: &Tensor,
    k: usize,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = dy.dim(1)?;
    let g = Geometry::new(c, h, wd, k, stride, padding)?;
    let dy = dy.to_dtype(DType::F32)?;
    let dw = with_f32(x, |xs| {
        with_f32(&dy, |dys| {
            let hw = g.ho * g.wo;
            let mut dw = vec![0f32; o * g.rows()];
            let mut cols = vec![0f32; g.rows() * g.tile_rows() * g.wo];
            let mut dyt = vec![0f32; o * g.tile_rows() * g.wo];
            let mut first = true;
            for bi in 0..b {
                let src = &xs[bi * c * h * wd..(bi + 1) * c * h * wd];
                let grad = &dys[bi * o * hw..(bi + 1) * o * hw];
                for (r0, rows) in g.tiles() {
                    let n = rows * g.wo;
                    let cols = &mut cols[..g.rows() * n];
                    im2col_rows(src, g, r0, rows, cols);
                    let dyt = &mut dyt[..o * n];
                    gather_tile(grad, hw, r0 * g.wo, n, dyt);
                    // dw[O, C·k²] += dyt[O, n] · colsᵀ (cols is [C·k², n]: the product's rhs
                    // stored transposed)
                    let shape = (o, g.rows(), n);
                    matmul_f32(&mut dw, g.rows(), !first, (dyt, false), (cols, true), shape);
                    first = false;
                }
            }
            Ok(dw)
        })
    })?;
    Tensor::from_vec(dw, (o, c, k, k), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::kernels::rel_err as max_rel;

    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 6] = [
        // (c, o, h, w, k, stride, pad)
        (3, 5, 7, 6, 3, 1, 1),
        (4, 2, 8, 8, 3, 2, 1),
        (4, 3, 9, 9, 3, 2, 0),
        (2, 3, 5, 5, 3, 1, 0),
        (6, 4, 5, 7, 1, 1, 0),
        (3, 2, 4, 4, 3, 1, 2),
    ];

    #[test]
    fn convolution_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, h, w, k, s, p) in CASES {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let kern = Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let ours = conv2d(&x, &kern, p, s)?;
            let want = x.conv2d(&kern, p, s, 1, 1)?;
            assert_eq!(ours.dims(), want.dims());
            assert!(max_rel(&ours, &want) < 1e-5, "{c} {o} {h} {w} {k} {s} {p}");
        }
        Ok(())
    }

    #[test]
    fn several_tiles_give_the_same_result() -> Result<()> {
        // 256 input channels x 9 = 2304 column rows, 40 output columns: 45 rows per tile, so
        // a 100-row output takes three tiles, the last one short.
        let g = Geometry::new(256, 100, 40, 3, 1, 1)?;
        assert_eq!(g.tile_rows(), 45);
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 256, 100, 40), &dev)?;
        let kern = Tensor::randn(0f32, 1.0, (3, 256, 3, 3), &dev)?;
        assert!(max_rel(&conv2d(&x, &kern, 1, 1)?, &x.conv2d(&kern, 1, 1, 1, 1)?) < 1e-5);
        let dy = Tensor::randn(0f32, 1.0, (1, 3, 100, 40), &dev)?;
        let w = Var::from_tensor(&kern)?;
        let want = (x.conv2d(&w, 1, 1, 1, 1)? * &dy)?.sum_all()?.backward()?;
        let ours = conv2d_weight_grad(&x, &dy, 3, 1, 1)?;
        assert!(max_rel(&ours, want.get(&w).unwrap()) < 1e-5);
        Ok(())
    }

    #[test]
    fn input_gradient_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, h, w, k, s, p) in CASES {
            let x = Var::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let kern = Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let y = x.conv2d(&kern, p, s, 1, 1)?;
            let dy = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
            let want = (y * &dy)?.sum_all()?.backward()?;
            let ours = conv2d_input_grad(&dy, &kern, (h, w), p, s)?;
            let r = max_rel(&ours, want.get(&x).unwrap());
            assert!(r < 1e-5, "{c} {o} {h} {w} {k} {s} {p}: {r}");
        }
        Ok(())
    }

    #[test]
    fn kernel_gradient_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, h, w, k, s, p) in CASES {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let kern = Var::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let y = x.conv2d(&kern, p, s, 1, 1)?;
            let dy = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
            let want = (y * &dy)?.sum_all()?.backward()?;
            let ours = conv2d_weight_grad(&x, &dy, k, p, s)?;
            let r = max_rel(&ours, want.get(&kern).unwrap());
            assert!(r < 1e-5, "{c} {o} {h} {w} {k} {s} {p}: {r}");
        }
        Ok(())
    }
}
