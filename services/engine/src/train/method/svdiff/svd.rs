//! Singular value decompositions of a model's weights, computed once per base model.
//!
//! SVDiff trains shifts of the singular values of every weight, so it needs `U`, `S` and `Vᵀ`
//! of each base weight. They are computed on the CPU with `faer` (in f64, stored as f32) and
//! kept in two caches: in memory for the rest of the process, and, when a directory is given,
//! on disk, keyed by a hash of the weights' contents, so that a second job on the same base
//! model (or the sampling stage after training) does not pay for them again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Result, Tensor};
use sha2::{Digest, Sha256};

/// The thin SVD `W = U diag(S) Vᵀ` of a weight seen as a matrix ([`matrix_dims`]).
#[derive(Debug, Clone)]
pub struct Factor {
    /// `[m, k]`, `k = min(m, n)`.
    pub u: Tensor,
    /// `[k]`, non-negative, non-increasing.
    pub s: Tensor,
    /// `[k, n]`.
    pub vt: Tensor,
}

/// The matrix svdiff-pytorch decomposes for a weight of this shape: a linear or embedding
/// weight as it is, a convolution kernel `[out, in, kh, kw]` as `[out, in * kh * kw]`, and a 1-D
/// weight (norm scale) as one row `[1, n]`.
pub fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape {
        [n] => (1, *n),
        [m, rest @ ..] => (*m, rest.iter().product()),
        [] => (1, 1),
    }
}

/// The thin SVD of `w` (any float dtype, any device).
pub fn factorize(w: &Tensor) -> Result<Factor> {
    let (m, n) = matrix_dims(w.dims());
    let vals: Vec<f64> = w
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let a = faer::Mat::<f64>::from_fn(m, n, |i, j| vals[i * n + j]);
    let k = m.min(n);
    let (mut u, mut s, mut v) = (
        faer::Mat::<f64>::zeros(m, k),
        faer::diag::Diag::<f64>::zeros(k),
        faer::Mat::<f64>::zeros(n, k),
    );
    // Threads pay off only for large weights; for the many small ones they cost more than
    // the decomposition.
    let par = if m * n >= 1 << 18 {
        faer::get_global_parallelism()
    } else {
        faer::Par::Seq
    };
    let thin = faer::linalg::svd::ComputeSvdVectors::Thin;
    let scratch = faer::linalg::svd::svd_scratch::<f64>(m, n, thin, thin, par, Default::default());
    faer::linalg::svd::svd(
        a.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        faer::dyn_stack::MemStack::new(&mut faer::dyn_stack::MemBuffer::new(scratch)),
        Default::default(),
    )
    .map_err(|e| candle_core::Error::Msg(format!("SVD of a {m}x{n} weight: {e:?}")))?;
    let s = s.column_vector();
    let mut uu = Vec::with_capacity(m * k);
    for i in 0..m {
        uu.extend((0..k).map(|j| u[(i, j)] as f32));
    }
    let ss: Vec<f32> = (0..k).map(|j| s[j] as f32).collect();
    let mut vt = Vec::with_capacity(k * n);
    for j in 0..k {
        vt.extend((0..n).map(|c| v[(c, j)] as f32));
    }
    Ok(Factor {
        u: Tensor::from_vec(uu, (m, k), &Device::Cpu)?,
        s: Tensor::from_vec(ss, k, &Device::Cpu)?,
        vt: Tensor::from_vec(vt, (k, n), &Device::Cpu)?,
    })
}

/// The factors of a set of weights, by weight name.
#[derive(Debug)]
pub struct Factors {
    /// The content hash of the weights ([`fingerprint`]).
    pub key: String,
    pub by_name: BTreeMap<String, Factor>,
}

/// Bumped whenever the factorization or the file layout changes, so old cache files are not
/// read.
const FORMAT: &str = "sidbooth.svd.v1";

/// A hash of the names, dtypes, shapes and values of `weights` (order-independent).
pub fn fingerprint(weights: &[(String, Tensor)]) -> Result<String> {
    let mut sorted: Vec<&(String, Tensor)> = weights.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    for (name, t) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
        let vals: Vec<f32> = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for chunk in vals.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            h.update(&bytes);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Where a [`SvdCache::factors`] call found its factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Memory,
    Disk,
    Computed,
}

/// How many factor sets the memory cache keeps: a UNet's and a text encoder's (for Stable
/// Diffusion 2.1 about 5 and 2 GB; the disk cache gives older ones back in seconds).
const MEMORY_ENTRIES: usize = 2;

/// Factor sets in memory and, optionally, on disk.
pub struct SvdCache {
    dir: Mutex<Option<PathBuf>>,
    /// Most recently used last.
    memory: Mutex<Vec<Arc<Factors>>>,
}

impl SvdCache {
    /// A cache that also keeps its factors in `dir` (created when first written).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir: Mutex::new(dir),
            memory: Mutex::new(Vec::new()),
        }
    }

    /// The cache of the process, used by training and by the output loader. Without
    /// [`SvdCache::set_dir`] it keeps factors in memory only.
    pub fn shared() -> &'static SvdCache {
        static SHARED: OnceLock<SvdCache> = OnceLock::new();
        SHARED.get_or_init(|| SvdCache::new(None))
    }

    /// Sets the directory that factors are read from and written to (e.g. a worker's cache
    /// directory, shared by all its jobs).
    pub fn set_dir(&self, dir: Option<PathBuf>) {
        *self.dir.lock().expect("svd cache lock") = dir;
    }

    pub fn dir(&self) -> Option<PathBuf> {
        self.dir.lock().expect("svd cache lock").clone()
    }

    /// The factors of `weights` (on the CPU): from memory, else from the cache directory, else
    /// computed and stored in both.
    pub fn factors(&self, weights: &[(String, Tensor)]) -> Result<(Arc<Factors>, Origin)> {
        let key = fingerprint(weights)?;
        if let Some(f) = self.remember(&key, None) {
            return Ok((f, Origin::Memory));
        }
        let path = self.dir().map(|d| d.join(format!("svd-{key}.safetensors")));
        if let Some(p) = path.as_deref().filter(|p| p.is_file()) {
            if let Some(by_name) = read(p, weights)? {
                let f = Arc::new(Factors { key, by_name });
                self.remember(&f.key, Some(f.clone()));
                return Ok((f, Origin::Disk));
            }
        }
        let mut by_name = BTreeMap::new();
        for (name, w) in weights {
            by_name.insert(name.clone(), factorize(w)?);
        }
        let f = Arc::new(Factors { key, by_name });
        if let Some(p) = &path {
            write(p, &f)?;
        }
        self.remember(&f.key, Some(f.clone()));
        Ok((f, Origin::Computed))
    }

    /// Looks `key` up (and marks it recently used), or inserts `add`.
    fn remember(&self, key: &str, add: Option<Arc<Factors>>) -> Option<Arc<Factors>> {
        let mut mem = self.memory.lock().expect("svd cache lock");
        let found = mem.iter().position(|f| f.key == key).map(|i| mem.remove(i));
        let entry = found.or(add)?;
        mem.push(entry.clone());
        if mem.len() > MEMORY_ENTRIES {
            mem.remove(0);
        }
        Some(entry)
    }
}

/// Reads a cache file; `None` when it cannot be read, lacks a weight or has a factor of the
/// wrong shape (the factors are then recomputed and the file rewritten).
fn read(path: &Path, weights: &[(String, Tensor)]) -> Result<Option<BTreeMap<String, Factor>>> {
    let Ok(mut all) = candle_core::safetensors::load(path, &Device::Cpu) else {
        return Ok(None);
    };
    let mut by_name = BTreeMap::new();
    for (name, w) in weights {
        let (m, n) = matrix_dims(w.dims());
        let k = m.min(n);
        let mut take = |part: &str, dims: &[usize]| {
            all.remove(&format!("{name}.{part}"))
                .filter(|t| t.dims() == dims && t.dtype() == DType::F32)
        };
        match (take("U", &[m, k]), take("S", &[k]), take("Vh", &[k, n])) {
            (Some(u), Some(s), Some(vt)) => {
                by_name.insert(name.clone(), Factor { u, s, vt });
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(by_name))
}

/// Writes a cache file atomically (a temporary file renamed), so a concurrent reader never sees
/// half of it.
fn write(path: &Path, f: &Factors) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tensors = Vec::with_capacity(3 * f.by_name.len());
    for (name, fac) in &f.by_name {
        tensors.push((format!("{name}.U"), fac.u.clone()));
        tensors.push((format!("{name}.S"), fac.s.clone()));
        tensors.push((format!("{name}.Vh"), fac.vt.clone()));
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let tensors: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
