//! Reading and writing safetensors files with metadata.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors, View};

use super::TrainError;

struct Raw {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_raw(t: &Tensor) -> candle_core::Result<Raw> {
    use candle_core::{CpuStorage, Storage};
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let shape = t.dims().to_vec();
    let t = match t.dtype() {
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::I64 | DType::U32 => t,
        _ => t.to_dtype(DType::F32)?,
    };
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = (
        layout.start_offset(),
        layout.start_offset() + shape.iter().product::<usize>(),
    );
    let (dtype, data): (StDtype, Vec<u8>) = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => (
            StDtype::F32,
            v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        Storage::Cpu(CpuStorage::F64(v)) => (
            StDtype::F64,
            v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        Storage::Cpu(CpuStorage::F16(v)) => (
            StDtype::F16,
            v[start..end]
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
        ),
        Storage::Cpu(CpuStorage::BF16(v)) => (
            StDtype::BF16,
            v[start..end]
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
        ),
        Storage::Cpu(CpuStorage::I64(v)) => (
            StDtype::I64,
            v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        Storage::Cpu(CpuStorage::U32(v)) => (
            StDtype::U32,
            v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        _ => candle_core::bail!(
            "safetensors export: unsupported storage for {:?}",
            t.dtype()
        ),
    };
    Ok(Raw { dtype, shape, data })
}

/// Writes `tensors` (sorted by name) and `metadata` to a safetensors file.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), TrainError> {
    let raws: Vec<(String, Raw)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), to_raw(t)?)))
        .collect::<candle_core::Result<_>>()?;
    let md: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(raws.iter().map(|(k, r)| (k.as_str(), r)), Some(md), &tmp)
        .map_err(|e| TrainError::Format(format!("{}: {e}", path.display())))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads all tensors and the metadata of a safetensors file.
pub fn load(
    path: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>), TrainError> {
    let bytes = std::fs::read(path)?;
    let fmt =
        |e: safetensors::SafeTensorError| TrainError::Format(format!("{}: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(fmt)?;
    let st = SafeTensors::deserialize(&bytes).map_err(fmt)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            StDtype::I64 => DType::I64,
            StDtype::U32 => DType::U32,
            d => {
                return Err(TrainError::Format(format!(
                    "{name}: unsupported dtype {d:?}"
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?;
        out.insert(name, t);
    }
    let md = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok((out, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_metadata_and_dtypes() {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("sidbooth-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = a.to_dtype(DType::F16).unwrap();
        let c = a.to_dtype(DType::BF16).unwrap().narrow(1, 1, 2).unwrap();
        let tensors = BTreeMap::from([
            ("a".to_string(), a.clone()),
            ("b".to_string(), b),
            ("c".to_string(), c),
        ]);
        let md = BTreeMap::from([("k".to_string(), "v".to_string())]);
        save(&path, &tensors, &md).unwrap();
        let (back, md2) = load(&path, &dev).unwrap();
        assert_eq!(md2.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            back["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(back["b"].dtype(), DType::F16);
        assert_eq!(
            back["b"]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(back["c"].dtype(), DType::BF16);
        assert_eq!(
            back["c"]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![1.0, 2.0], vec![4.0, 5.0]]
        );
        // candle's own reader agrees
        let cand = candle_core::safetensors::load(&path, &dev).unwrap();
        assert_eq!(
            cand["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
