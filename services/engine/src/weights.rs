//! Weight sources for the models: safetensors files, deterministic seeded random weights (the tiny
//! model and benchmarks), and a recorder that remembers every tensor a model was built from
//! (`named_weights`).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Names and tensors a model was built from, in load order.
pub type NamedWeights = Vec<(String, Tensor)>;

/// Shared list filled by a [`Recording`] backend.
#[derive(Clone, Default)]
pub struct Record(pub Arc<Mutex<NamedWeights>>);

impl Record {
    pub fn take(&self) -> NamedWeights {
        std::mem::take(&mut *self.0.lock().expect("record lock"))
    }
}

struct Recording<B: SimpleBackend> {
    inner: B,
    record: Record,
}

impl<B: SimpleBackend> Recording<B> {
    /// A tensor the source lacks is named in the error whatever the source: candle's safetensors
    /// backend would report the safetensors crate's own error type instead.
    fn present(&self, name: &str) -> Result<()> {
        if self.inner.contains_tensor(name) {
            Ok(())
        } else {
            Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
        }
    }
}

impl<B: SimpleBackend> SimpleBackend for Recording<B> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.present(name)?;
        let t = self.inner.get(s, name, h, dtype, dev)?;
        self.record
            .0
            .lock()
            .expect("record lock")
            .push((name.to_string(), t.clone()));
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.present(name)?;
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.record
            .0
            .lock()
            .expect("record lock")
            .push((name.to_string(), t.clone()));
        Ok(t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

struct Boxed(Box<dyn SimpleBackend>);
impl SimpleBackend for Boxed {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Wraps any backend so that every tensor fetched through the returned builder is recorded.
pub fn recording<'a>(
    backend: Box<dyn SimpleBackend>,
    dtype: DType,
    dev: &Device,
) -> (VarBuilder<'a>, Record) {
    let record = Record::default();
    let b = Recording {
        inner: Boxed(backend),
        record: record.clone(),
    };
    (
        VarBuilder::from_backend(Box::new(b), dtype, dev.clone()),
        record,
    )
}

/// Tensors of the given map (e.g. `Var`s of a `VarMap`, or weights read from a file), recorded.
pub fn from_tensors<'a>(
    ts: std::collections::HashMap<String, Tensor>,
    dtype: DType,
    dev: &Device,
) -> (VarBuilder<'a>, Record) {
    recording(Box::new(MapBackend(ts)), dtype, dev)
}

struct MapBackend(std::collections::HashMap<String, Tensor>);
impl SimpleBackend for MapBackend {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: expected {s:?}, got {:?}",
                t.shape()
            )
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.0.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        t.to_device(dev)?.to_dtype(dtype)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// Memory-maps a safetensors file; tensors are converted to `dtype` on `dev`.
pub fn from_safetensors<'a>(
    path: &Path,
    dtype: DType,
    dev: &Device,
) -> Result<(VarBuilder<'a>, Record)> {
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
    Ok(recording(Box::new(st), dtype, dev))
}

/// Deterministic random weights: each tensor is drawn from a generator seeded by `(seed, name)`,
/// so the same seed gives the same model whatever the order of construction. Rank-1 tensors named
/// `*.weight` (norm scales) are drawn around 1, other biases around 0, matrices and kernels with
/// standard deviation `1/sqrt(fan_in)`; embeddings with standard deviation 0.02 * 10.
pub struct SeededRandom {
    pub seed: u64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    // DefaultHasher with no keys is deterministic (SipHash-1-3 with zero keys).
    h.finish() ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Standard normal samples from a seeded `StdRng` (Box-Muller), in f32.
pub fn randn_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.gen::<f64>().max(1e-300);
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl SimpleBackend for SeededRandom {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(name_seed(self.seed, name));
        let n = s.elem_count();
        let z = randn_vec(&mut rng, n);
        let dims = s.dims();
        let vals: Vec<f32> = if dims.len() == 1 {
            let is_norm_scale = name.ends_with(".weight");
            if is_norm_scale {
                z.iter().map(|v| 1.0 + 0.1 * v).collect()
            } else {
                z.iter().map(|v| 0.05 * v).collect()
            }
        } else if name.contains("embedding") {
            z.iter().map(|v| 0.2 * v).collect()
        } else {
            let fan_in: usize = dims[1..].iter().product();
            let std = 1.0 / (fan_in as f64).sqrt();
            z.iter().map(|v| (std * *v as f64) as f32).collect()
        };
        Tensor::from_vec(vals, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded random weights need a shape for {name}")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A recorded builder of seeded random weights.
pub fn seeded<'a>(seed: u64, dtype: DType, dev: &Device) -> (VarBuilder<'a>, Record) {
    recording(Box::new(SeededRandom { seed }), dtype, dev)
}

/// Writes named tensors as a safetensors file (converted to f32 unless `dtype` says otherwise).
pub fn save_safetensors(weights: &NamedWeights, dtype: DType, path: &Path) -> Result<()> {
    let mut map = std::collections::HashMap::new();
    for (n, t) in weights {
        map.insert(n.clone(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?);
    }
    candle_core::safetensors::save(&map, path)
}
