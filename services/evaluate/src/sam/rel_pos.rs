//! The decomposed relative-position tables of the image encoder (MViTv2's, as SAM's
//! `get_rel_pos` builds them).
//!
//! Each attention layer holds one table per axis, `[L, head_dim]`, one row per relative
//! offset. A table trained for another grid (`L != 2 * size - 1`) is first resampled along `L`
//! with torch's linear interpolation (`align_corners=False`), so a checkpoint whose tables have
//! other lengths runs as segment-anything would run it.

use candle_core::{Device, Result, Tensor};

/// `get_rel_pos(q_size, k_size, rel_pos)`: for every query position `i` and key position `j`
/// along one axis, the table row of their offset; `[q_size, k_size, head_dim]`.
pub fn get_rel_pos(q_size: usize, k_size: usize, rel_pos: &Tensor) -> Result<Tensor> {
    let (len, dim) = rel_pos.dims2()?;
    let max_rel_dist = 2 * q_size.max(k_size) - 1;
    let table = rel_pos.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let table = if len == max_rel_dist {
        table
    } else {
        interpolate_rows(&table, max_rel_dist)
    };
    // torch computes the coordinates in float32 and truncates them (`.long()`)
    let q_scale = (k_size as f32 / q_size as f32).max(1.0);
    let k_scale = (q_size as f32 / k_size as f32).max(1.0);
    let mut out = Vec::with_capacity(q_size * k_size * dim);
    for i in 0..q_size {
        for j in 0..k_size {
            let coord = (i as f32 * q_scale - j as f32 * k_scale) + (k_size - 1) as f32 * k_scale;
            out.extend_from_slice(&table[coord as usize]);
        }
    }
    Tensor::from_vec(out, (q_size, k_size, dim), rel_pos.device())
}

/// Rows of `table` resampled to `n` rows as `F.interpolate(mode="linear")` does it.
fn interpolate_rows(table: &[Vec<f32>], n: usize) -> Vec<Vec<f32>> {
    let len = table.len();
    let scale = len as f32 / n as f32;
    (0..n)
        .map(|i| {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(len - 1);
            let i1 = if i0 < len - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let l0 = 1.0 - l1;
            table[i0]
                .iter()
                .zip(&table[i1])
                .map(|(a, b)| a * l0 + b * l1)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_sizes_index_by_offset() {
        // rows 0..5 hold their own index: entry (i, j) is the row of offset i - j + 2
        let t = Tensor::arange(0f32, 5.0, &Device::Cpu)
            .unwrap()
            .reshape((5, 1))
            .unwrap();
        let r = get_rel_pos(3, 3, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(r, vec![2.0, 1.0, 0.0, 3.0, 2.0, 1.0, 4.0, 3.0, 2.0]);
    }

    #[test]
    fn other_lengths_are_interpolated_linearly() {
        // 3 rows [0, 10, 20] to 5: scale 0.6, sources -0.2(->0), 0.4, 1.0, 1.6, 2.2(->row 2)
        let t = Tensor::new(&[[0f32], [10.0], [20.0]], &Device::Cpu).unwrap();
        let r = get_rel_pos(3, 3, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rows = [0.0f32, 4.0, 10.0, 16.0, 20.0];
        let want: Vec<f32> = [2, 1, 0, 3, 2, 1, 4, 3, 2]
            .iter()
            .map(|&k| rows[k])
            .collect();
        for (a, b) in r.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{r:?} vs {want:?}");
        }
    }
}
