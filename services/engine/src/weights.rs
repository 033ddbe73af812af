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

/// `t` if it has the shape the model asks for.
fn of_shape(t: Tensor, s: &Shape, name: &str) -> Result<Tensor> {
    if t.shape() != s {
        candle_core::bail!(
            "shape mismatch for {name}: expected {s:?}, got {:?}",
            t.shape()
        )
    }
    Ok(t)
}

struct MapBackend(std::collections::HashMap<String, Tensor>);
impl SimpleBackend for MapBackend {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        of_shape(self.get_unchecked(name, dtype, dev)?, &s, name)
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

/// A safetensors file's tensors; they are converted to `dtype` on `dev` as the model asks for
/// them.
pub fn from_safetensors<'a>(
    path: &Path,
    dtype: DType,
    dev: &Device,
) -> Result<(VarBuilder<'a>, Record)> {
    if cfg!(target_endian = "little") {
        Ok(recording(
            Box::new(SafetensorsFile::open(path)?),
            dtype,
            dev,
        ))
    } else {
        // The file is little-endian: candle's memory-mapped reader converts.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
        Ok(recording(Box::new(st), dtype, dev))
    }
}

/// A safetensors file read one tensor at a time.
///
/// In a process whose allocator is [`crate::mapped::MappedAware`] (the sidbooth binaries) the
/// file is mapped and each tensor is a buffer over its bytes in the mapping: nothing is copied
/// and no fresh memory is touched (see [`crate::mapped`]). Elsewhere a tensor is read straight
/// from the file into its own buffer. (candle's memory-mapped reader does neither: it copies each
/// tensor out of a mapping whose touched pages stay resident until the builder is dropped, so
/// loading an SD 2.1 UNet held 3.5 GB twice.)
struct SafetensorsFile {
    file: std::fs::File,
    mapped: Option<crate::mapped::MappedFile>,
    path: std::path::PathBuf,
    entries: std::collections::HashMap<String, FileTensor>,
}

struct FileTensor {
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl SafetensorsFile {
    /// Headers larger than this are refused (safetensors itself caps them at 100 MB).
    const MAX_HEADER: u64 = 100 << 20;

    fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        let bad = |why: String| candle_core::Error::Msg(format!("{}: {why}", path.display()));
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| bad("not a safetensors file (shorter than its header size)".into()))?;
        let n = u64::from_le_bytes(n);
        if n > Self::MAX_HEADER || 8 + n > len {
            return Err(bad(format!("header of {n} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)?;
        let mut raw: std::collections::HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        raw.remove("__metadata__");
        let data_start = 8 + n;
        let mut entries = std::collections::HashMap::with_capacity(raw.len());
        for (name, v) in raw {
            let e: HeaderEntry =
                serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let (start, end) = e.data_offsets;
            if start > end || data_start + end > len {
                return Err(bad(format!(
                    "tensor {name}: bytes {start}..{end} outside the file"
                )));
            }
            entries.insert(
                name,
                FileTensor {
                    dtype: e.dtype,
                    shape: e.shape,
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        Ok(Self {
            mapped: crate::mapped::map(&file, len, path)?,
            file,
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The tensor as stored, on the CPU.
    fn read(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        match e.dtype.as_str() {
            "F32" => self.read_as::<f32>(name, e),
            "F16" => self.read_as::<half::f16>(name, e),
            "BF16" => self.read_as::<half::bf16>(name, e),
            "F64" => self.read_as::<f64>(name, e),
            "I64" => self.read_as::<i64>(name, e),
            "U32" => self.read_as::<u32>(name, e),
            "U8" => self.read_as::<u8>(name, e),
            other => candle_core::bail!(
                "{}: tensor {name} has dtype {other}, which no model here reads",
                self.path.display()
            ),
        }
    }

    fn read_as<T: candle_core::WithDType + crate::mapped::Plain>(
        &self,
        name: &str,
        e: &FileTensor,
    ) -> Result<Tensor> {
        let count: usize = e.shape.iter().product();
        let bytes = count * std::mem::size_of::<T>();
        if (e.end - e.start) as usize != bytes {
            candle_core::bail!(
                "{}: tensor {name} of shape {:?} and dtype {} holds {} bytes, not {bytes}",
                self.path.display(),
                e.shape,
                e.dtype,
                e.end - e.start
            )
        }
        if let Some(data) = self
            .mapped
            .as_ref()
            .and_then(|m| m.vec::<T>(e.start as usize, count))
        {
            return Tensor::from_vec(data, e.shape.as_slice(), &Device::Cpu);
        }
        let mut data: Vec<T> = Vec::with_capacity(count);
        let buf = data.as_mut_ptr() as *mut u8;
        prefer_huge_pages(buf, bytes);
        // SAFETY: `buf` is the start of `data`'s allocation of `bytes` bytes.
        unsafe { read_exact_at(&self.file, buf, bytes, e.start) }?;
        // SAFETY: all `bytes` bytes were read; every bit pattern is a valid value of the plain
        // numeric types read here, and the file's little-endian layout is the machine's
        // (checked by the caller).
        unsafe { data.set_len(count) };
        Tensor::from_vec(data, e.shape.as_slice(), &Device::Cpu)
    }
}

/// `pread` into `buf` until `len` bytes from `offset` are read. Unlike
/// `FileExt::read_exact_at` the buffer need not be initialised first: zero-filling a tensor's
/// buffer only to overwrite it touched every page of the model twice.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
unsafe fn read_exact_at(
    file: &std::fs::File,
    mut buf: *mut u8,
    mut len: usize,
    mut offset: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while len > 0 {
        // At most 1 GiB a call: Linux reads at most 2 GiB minus a page per call anyway.
        let n = libc::pread(
            file.as_raw_fd(),
            buf.cast(),
            len.min(1 << 30),
            offset as libc::off_t,
        );
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = n as usize;
        buf = buf.add(n);
        len -= n;
        offset += n as u64;
    }
    Ok(())
}

/// Asks for transparent huge pages over the whole 2 MiB pages inside `[ptr, ptr + len)`, so
/// that a weight read into fresh memory faults once per 2 MiB rather than once per 4 KiB (an SD
/// 2.1 UNet is 3.5 GB: 850 000 faults, most of the load time). Advice only: where the kernel's
/// THP setting is `never`, nothing changes.
fn prefer_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: MADV_HUGEPAGE changes how the range is backed, never its contents; the
            // range lies inside the caller's allocation.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

impl SimpleBackend for SafetensorsFile {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        of_shape(self.get_unchecked(name, dtype, dev)?, &s, name)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The file reader gives what candle's memory-mapped reader gives, in every stored dtype,
    /// and names what is wrong with a file that is cut short.
    #[test]
    fn reading_a_safetensors_file_matches_candles_reader() {
        let dir = tempfile_dir();
        let path = dir.join("w.safetensors");
        let base = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let tensors: std::collections::HashMap<String, Tensor> = [
            ("a.f32".to_string(), (&base * 0.5).unwrap()),
            ("b.f16".to_string(), base.to_dtype(DType::F16).unwrap()),
            ("c.bf16".to_string(), base.to_dtype(DType::BF16).unwrap()),
        ]
        .into_iter()
        .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let ours = SafetensorsFile::open(&path).unwrap();
        let theirs = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path).unwrap() };
        for name in tensors.keys() {
            assert!(ours.contains_tensor(name));
            let a = ours.get_unchecked(name, DType::F32, &Device::Cpu).unwrap();
            let b = theirs
                .get_unchecked(name, DType::F32, &Device::Cpu)
                .unwrap();
            assert_eq!(a.dims(), b.dims(), "{name}");
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b, "{name}");
        }
        let wrong = ours.get(
            Shape::from((4, 6)),
            "a.f32",
            Init::Const(0.),
            DType::F32,
            &Device::Cpu,
        );
        assert!(wrong
            .unwrap_err()
            .to_string()
            .contains("shape mismatch for a.f32"));

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = SafetensorsFile::open(&path)
            .err()
            .expect("a cut file is refused")
            .to_string();
        assert!(err.contains("outside the file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sidbooth-weights-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
