//! Cross-attention capture (the paper's section 5 diagnostic) and heatmap overlays.
//!
//! An [`AttentionRecorder`] is passed to the UNet forward as `Option<&mut AttentionRecorder>`;
//! with `None` nothing is computed or kept. For every cross-attention (`attn2`) layer it takes the
//! attention probabilities of the chosen prompt token positions, sums them over those tokens,
//! averages over heads, upsamples (bilinear) to a common resolution and accumulates; [`maps`]
//! returns the average over all recorded layers and timesteps, one `[H, W]` map per image.
//!
//! [`maps`]: AttentionRecorder::maps

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use image::{Rgb, RgbImage};

#[derive(Debug)]
pub struct AttentionRecorder {
    /// Token positions (in the 77-token prompt) whose attention is summed.
    pub token_indices: Vec<usize>,
    /// Resolution (h, w) of the accumulated maps, usually the latent resolution.
    pub resolution: (usize, usize),
    /// Rows of the UNet batch to record, `(start, len)`; with classifier-free guidance the
    /// pipeline records only the conditional half. `None`: every row.
    pub rows: Option<(usize, usize)>,
    sum: Option<Tensor>,
    count: usize,
}

impl AttentionRecorder {
    pub fn new(token_indices: Vec<usize>, resolution: (usize, usize)) -> Self {
        Self {
            token_indices,
            resolution,
            rows: None,
            sum: None,
            count: 0,
        }
    }

    /// Number of recorded (layer, timestep) contributions.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Records attention probabilities `[B, heads, h*w, T]` of one cross-attention layer whose
    /// spatial size is `(h, w)`.
    pub fn record(&mut self, probs: &Tensor, h: usize, w: usize) -> Result<()> {
        if self.token_indices.is_empty() {
            return Ok(());
        }
        let probs = probs.detach();
        let probs = match self.rows {
            Some((s, l)) => probs.narrow(0, s, l)?,
            None => probs,
        };
        let (b, _heads, hw, t) = probs.dims4()?;
        if hw != h * w {
            candle_core::bail!("attention record: {hw} queries for a {h}x{w} map");
        }
        let idx: Vec<u32> = self
            .token_indices
            .iter()
            .filter(|&&i| i < t)
            .map(|&i| i as u32)
            .collect();
        if idx.is_empty() {
            return Ok(());
        }
        let idx = Tensor::from_vec(idx.clone(), idx.len(), probs.device())?;
        let m = probs
            .to_dtype(DType::F32)?
            .index_select(&idx, 3)?
            .sum(3)? // tokens
            .mean(1)? // heads
            .reshape((b, 1, h, w))?;
        let (rh, rw) = self.resolution;
        let m = if (h, w) == (rh, rw) {
            m
        } else {
            m.upsample_bilinear2d(rh, rw, false)?
        };
        let m = m.reshape((b, rh, rw))?;
        self.sum = Some(match self.sum.take() {
            Some(s) => (s + m)?,
            None => m,
        });
        self.count += 1;
        Ok(())
    }

    /// The averaged maps `[B, H, W]` (f32, on the CPU), or `None` when nothing was recorded.
    pub fn maps(&self) -> Result<Option<Tensor>> {
        match &self.sum {
            Some(s) => Ok(Some((s / self.count as f64)?.to_device(&Device::Cpu)?)),
            None => Ok(None),
        }
    }

    /// Forgets what was recorded.
    pub fn reset(&mut self) {
        self.sum = None;
        self.count = 0;
    }
}

/// A "jet"-like colour map of `v` in `[0, 1]`.
pub fn colormap(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

/// Overlays one map `[h, w]` (any scale; min-max normalised here) on `image` with opacity `alpha`.
pub fn overlay_heatmap(image: &RgbImage, map: &Tensor, alpha: f32) -> Result<RgbImage> {
    let (iw, ih) = image.dimensions();
    let m = map.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (h, w) = m.dims2()?;
    let m = m
        .reshape((1, 1, h, w))?
        .upsample_bilinear2d(ih as usize, iw as usize, false)?
        .i((0, 0))?;
    let v = m.to_vec2::<f32>()?;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for row in &v {
        for &x in row {
            lo = lo.min(x);
            hi = hi.max(x);
        }
    }
    let range = if hi > lo { hi - lo } else { 1.0 };
    let mut out = image.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        let c = colormap((v[y as usize][x as usize] - lo) / range);
        let blend = |a: u8, b: u8| {
            ((1.0 - alpha) * a as f32 + alpha * b as f32)
                .round()
                .clamp(0.0, 255.0) as u8
        };
        *p = Rgb([blend(p[0], c[0]), blend(p[1], c[1]), blend(p[2], c[2])]);
    }
    Ok(out)
}

/// Writes the overlay of `map` on `image` as a PNG.
pub fn save_heatmap_png(
    image: &RgbImage,
    map: &Tensor,
    alpha: f32,
    path: &std::path::Path,
) -> crate::Result<()> {
    overlay_heatmap(image, map, alpha)?.save(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_averages_selected_tokens() -> Result<()> {
        let dev = Device::Cpu;
        // B=1, heads=2, 2x2 queries, 3 tokens; token 1 gets all attention at query 0
        let mut p = vec![0f32; 2 * 4 * 3];
        for h in 0..2 {
            for q in 0..4 {
                let t = if q == 0 { 1 } else { 2 };
                p[h * 12 + q * 3 + t] = 1.0;
            }
        }
        let probs = Tensor::from_vec(p, (1, 2, 4, 3), &dev)?;
        let mut r = AttentionRecorder::new(vec![1], (2, 2));
        r.record(&probs, 2, 2)?;
        r.record(&probs, 2, 2)?;
        let m = r.maps()?.unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(m, vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(r.count(), 2);
        // a coarser layer is upsampled to the common resolution
        let coarse = Tensor::from_vec(vec![0f32, 1.0], (1, 1, 1, 2), &dev)?;
        let mut r = AttentionRecorder::new(vec![1], (4, 4));
        r.record(&coarse, 1, 1)?;
        let m = r.maps()?.unwrap();
        assert_eq!(m.dims(), &[1, 4, 4]);
        assert!(m
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| (v - 1.0).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn overlay_marks_hot_region() -> Result<()> {
        let img = RgbImage::from_pixel(8, 8, Rgb([128, 128, 128]));
        let map = Tensor::from_vec(vec![0f32, 0.0, 0.0, 1.0], (2, 2), &Device::Cpu)?;
        let out = overlay_heatmap(&img, &map, 0.6)?;
        let cold = out.get_pixel(0, 0);
        let hot = out.get_pixel(7, 7);
        assert!(hot[0] > cold[0] && cold[2] > hot[2], "{cold:?} {hot:?}");
        Ok(())
    }
}

/// One map `[h, w]` as a `.npy` file (NumPy format 1.0, little-endian float32, C order), the
/// form the generate stage stores so anyone can read it (`numpy.load`).
pub fn map_to_npy(map: &Tensor) -> Result<Vec<u8>> {
    let (h, w) = map.dims2()?;
    let values = map
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({h}, {w}), }}");
    // Magic (6) + version (2) + header length (2) + header, padded to a multiple of 64 and
    // ending in a newline, as NumPy writes it.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Reads a map written by [`map_to_npy`] (or any 2-D little-endian float32 C-order `.npy`):
/// `(h, w, values)` in row-major order.
pub fn map_from_npy(bytes: &[u8]) -> Result<(usize, usize, Vec<f32>)> {
    let bad = |why: &str| candle_core::Error::Msg(format!("not a 2-D float32 .npy map: {why}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" || bytes[6] != 1 {
        return Err(bad("no NumPy 1.x magic"));
    }
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes
        .get(10..10 + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(bad("only little-endian float32 in C order is read"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("a dimension is not a number")))
        .collect::<Result<_>>()?;
    let &[h, w] = dims.as_slice() else {
        return Err(bad("not two-dimensional"));
    };
    let data = &bytes[10 + header_len..];
    if data.len() != h * w * 4 {
        return Err(bad("data does not match the shape"));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((h, w, values))
}

#[cfg(test)]
mod npy_tests {
    use super::*;

    #[test]
    fn maps_round_trip_through_npy() {
        let map = Tensor::from_vec(
            vec![0.0f32, 1.5, -2.0, 3.25, 4.0, 5.0],
            (2, 3),
            &Device::Cpu,
        )
        .unwrap();
        let bytes = map_to_npy(&map).unwrap();
        // The header is padded so the data starts on a 64-byte boundary, as NumPy writes it.
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let (h, w, values) = map_from_npy(&bytes).unwrap();
        assert_eq!((h, w), (2, 3));
        assert_eq!(values, vec![0.0, 1.5, -2.0, 3.25, 4.0, 5.0]);
        assert!(map_from_npy(&bytes[..bytes.len() - 1]).is_err());
        assert!(map_from_npy(b"not npy at all").is_err());
    }
}
