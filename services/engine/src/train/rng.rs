//! Deterministic random numbers for training.
//!
//! Every random draw of a training step comes from a generator derived from
//! `(seed, stream, index)`, so a run resumed at step `k` draws exactly what an
//! uninterrupted run draws at step `k`; no generator state has to be saved.

use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Independent streams of randomness used by the trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Order of the training examples (index: epoch).
    Shuffle = 1,
    /// Noise, timesteps, flips and latent sampling of one micro-batch (index: micro-batch).
    Step = 2,
    /// Parameter initialisation (index: parameter ordinal).
    Init = 3,
    /// Class images sampled from the base model (index: image).
    ClassImages = 4,
    /// Fixed evaluation set (index: example).
    Eval = 5,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes a seed, a stream and an index into one 64-bit seed.
pub fn derive_seed(seed: u64, stream: Stream, index: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ (stream as u64)) ^ index)
}

/// A seeded generator for `(seed, stream, index)`.
pub fn rng_for(seed: u64, stream: Stream, index: u64) -> StdRng {
    StdRng::seed_from_u64(derive_seed(seed, stream, index))
}

/// One standard normal draw (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f64 {
    // u1 in (0, 1] so that ln(u1) is finite.
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `n` standard normal draws.
pub fn normal_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| normal(rng) as f32).collect()
}

/// A standard normal f32 tensor drawn from `rng`.
pub fn randn(rng: &mut StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(normal_vec(rng, n), shape, device)
}

/// A uniform f32 tensor on `[lo, hi)` drawn from `rng`.
pub fn rand_uniform(
    rng: &mut StdRng,
    lo: f64,
    hi: f64,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi) as f32).collect();
    Tensor::from_vec(v, shape, device)
}

/// A permutation of `0..n` (Fisher-Yates).
pub fn permutation(rng: &mut StdRng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = normal_vec(&mut rng_for(7, Stream::Step, 3), 8);
        let b = normal_vec(&mut rng_for(7, Stream::Step, 3), 8);
        let c = normal_vec(&mut rng_for(7, Stream::Step, 4), 8);
        let d = normal_vec(&mut rng_for(7, Stream::Shuffle, 3), 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn normal_has_unit_moments() {
        let v = normal_vec(&mut rng_for(1, Stream::Step, 0), 20000);
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(&mut rng_for(3, Stream::Shuffle, 0), 10);
        p.sort();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
    }
}
