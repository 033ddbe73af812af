//! Weights mapped from their files (`sidbooth_engine::mapped`), in a process whose allocator is
//! `MappedAware`, as the sidbooth binaries run: the values are the file's, a write stays in the
//! process, a file is unmapped with its last tensor, and a tensor's buffer can still grow or be
//! freed from any thread.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use sidbooth_engine::mapped::{self, MappedAware};
use sidbooth_engine::weights;
use support::flat;

mod support;

#[global_allocator]
static ALLOC: MappedAware = MappedAware;

/// The tests count live mappings, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file of tensors in three dtypes; `a` is f32 `[2, 3, 4]` holding 0.5 * 0..24.
fn write_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("w.safetensors");
    let base = Tensor::arange(0f32, 24.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let tensors: HashMap<String, Tensor> = [
        ("a".to_string(), (&base * 0.5).unwrap()),
        ("b".to_string(), base.to_dtype(DType::F16).unwrap()),
        ("c".to_string(), base.to_dtype(DType::BF16).unwrap()),
        (
            "d".to_string(),
            base.narrow(2, 0, 3).unwrap().contiguous().unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn mapped_tensors_hold_the_files_values_and_keep_writes_to_themselves() {
    let _serial = serial();
    assert!(mapped::available(), "MappedAware is this test's allocator");
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path());
    let on_disk = std::fs::read(&path).unwrap();
    let before = mapped::live_mappings();

    let theirs = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path).unwrap() };
    let (vb, _) = weights::from_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(mapped::live_mappings(), before + 1, "the file is mapped");
    let a = vb.get((2, 3, 4), "a").unwrap();
    for name in ["a", "b", "c", "d"] {
        let want = theirs.load(name, &Device::Cpu).unwrap();
        let got = vb.get(want.dims(), name).unwrap();
        assert_eq!(flat(&got), flat(&want), "{name}");
    }
    // The builder gone, the file stays mapped for the tensor still over it.
    drop(vb);
    assert_eq!(mapped::live_mappings(), before + 1);

    // An in-place write changes the tensor and not the file.
    let ones = Tensor::ones((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
    a.slice_set(&ones, 0, 1).unwrap();
    let got = flat(&a);
    assert_eq!(
        &got[..12],
        &(0..12).map(|i| i as f32 * 0.5).collect::<Vec<_>>()[..]
    );
    assert_eq!(&got[12..], &[1.0; 12]);
    assert_eq!(std::fs::read(&path).unwrap(), on_disk, "the file changed");

    drop(a);
    assert_eq!(
        mapped::live_mappings(),
        before,
        "unmapped with its last tensor"
    );
}

#[test]
fn a_mapped_buffer_grows_out_of_the_mapping_and_misaligned_values_are_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path());
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let before = mapped::live_mappings();
    let m = mapped::map(&file, len, &path).unwrap().expect("mapped");
    // The header: 8 bytes of length, then JSON (a `{`), so byte 8 is `{` as a u8.
    let header: Vec<u8> = m.vec(8, 1).unwrap();
    assert_eq!(header, b"{");
    // An f32 at an odd offset is not aligned: the caller reads it instead.
    assert!(m.vec::<f32>(9, 2).is_none());

    let mut v: Vec<u8> = m.vec(0, 8).unwrap();
    let n = u64::from_le_bytes(v[..8].try_into().unwrap());
    assert_eq!(8 + n + 24 * 4 + 24 * 2 * 2 + 18 * 4, len, "header length");
    v.extend_from_slice(&[7; 100]);
    assert_eq!(&v[..8], &n.to_le_bytes());
    assert_eq!(v.len(), 108);
    drop(m);
    drop(header);
    assert_eq!(
        mapped::live_mappings(),
        before,
        "the grown buffer left the mapping"
    );
    drop(v);
}

#[test]
fn tensors_are_freed_from_other_threads_while_others_allocate() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path());
    let before = mapped::live_mappings();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // Allocating and freeing all along, through the same allocator.
        for _ in 0..2 {
            s.spawn(|| {
                let mut keep = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    keep.push(vec![1u8; 4096]);
                    if keep.len() > 64 {
                        keep.clear();
                    }
                }
            });
        }
        for round in 0..50 {
            let (vb, _) = weights::from_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
            let t = vb.get((2, 3, 4), "a").unwrap();
            drop(vb);
            let sum = std::thread::spawn(move || {
                let s = t.sum_all().unwrap().to_scalar::<f32>().unwrap();
                drop(t);
                s
            })
            .join()
            .unwrap();
            assert_eq!(sum, 138.0, "round {round}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(mapped::live_mappings(), before);
}
