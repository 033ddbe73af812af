//! Operations written as one custom op instead of a composition of candle ops, for speed or
//! for memory: attention that never keeps its probability matrix, fused normalisations, the
//! CPU convolution, the convolution and linear layers with what is added to their outputs, and
//! the feed-forward's GEGLU with its second linear.
//!
//! They share one trick: the forward result is computed before the op is recorded (with
//! candle ops on detached tensors, or a CPU kernel), and the op's forward only hands that
//! result to candle, so that the graph holds what the op's own backward needs and nothing else.

/// The `cpu_fwd` and `cuda_fwd` of a custom op of 1, 2 or 3 arguments whose forward was computed
/// before it was recorded and sits in its `y: Output` field: they hand that result to candle.
macro_rules! precomputed_forward {
    (1) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::kernels::storage_of_cpu(&self.y.take()?)
        }
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $crate::kernels::storage_of_cuda(&self.y.take()?)
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::kernels::storage_of_cpu(&self.y.take()?)
        }
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $crate::kernels::storage_of_cuda(&self.y.take()?)
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::kernels::storage_of_cpu(&self.y.take()?)
        }
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $crate::kernels::storage_of_cuda(&self.y.take()?)
        }
    };
}

pub mod attention;
mod attention_cpu;
pub mod conv;
pub mod geglu;
pub mod layers;
pub mod linear;
pub mod norm;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, Device, Layout, Result, Shape, Storage, Tensor};

/// Returns `y`'s storage as an op's output (forward already computed).
pub(crate) fn storage_of_cpu(y: &Tensor) -> Result<(CpuStorage, Shape)> {
    let (s, l) = y.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) if l.is_contiguous() && l.start_offset() == 0 => {
            Ok((cs.clone(), y.shape().clone()))
        }
        Storage::Cpu(_) => candle_core::bail!("custom op: output not contiguous"),
        _ => candle_core::bail!("custom op: output not on the CPU"),
    }
}

pub(crate) fn storage_of_cuda(y: &Tensor) -> Result<(CudaStorage, Shape)> {
    let (s, l) = y.storage_and_layout();
    match &*s {
        Storage::Cuda(cs) => Ok((cs.try_clone(l)?, y.shape().clone())),
        _ => candle_core::bail!("custom op: output not on a CUDA device"),
    }
}

/// The forward result, handed to candle once and then dropped: the op stays in the graph until
/// the backward pass, and keeping the result there too would hold every layer's output twice.
pub(crate) struct Output(std::sync::Mutex<Option<Tensor>>);

impl Output {
    pub(crate) fn new(y: Tensor) -> Self {
        Self(std::sync::Mutex::new(Some(y)))
    }

    pub(crate) fn take(&self) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("custom op: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom op: forward ran twice".into()))
    }
}

/// The values of a contiguous f32 CPU storage.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("CPU kernel: input not contiguous"),
        _ => candle_core::bail!("CPU kernel: expected f32, got {:?}", s.dtype()),
    }
}

/// Runs `f` on the values of an f32 CPU tensor, borrowed from its storage (copied only when
/// the tensor is not contiguous).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(f32_slice(c, l)?),
        _ => candle_core::bail!("CPU kernel: tensor not on the CPU"),
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst[m, n] (row stride dst_rs) = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n]`, each
/// operand row-major or, where its flag says so, stored transposed (`lhs` as `[k, m]`, `rhs` as
/// `[n, k]`, the layout of a linear layer's weight).
pub(crate) fn matmul_f32(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], bool),
    rhs: (&[f32], bool),
    mnk: (usize, usize, usize),
) {
    matmul_with(dst, dst_rs, accumulate, lhs, rhs, mnk, parallelism())
}

fn matmul_with(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_t): (&[f32], bool),
    (rhs, rhs_t): (&[f32], bool),
    (m, n, k): (usize, usize, usize),
    parallelism: gemm::Parallelism,
) {
    let lhs_strides = if lhs_t { (1, m) } else { (k, 1) };
    let rhs_strides = if rhs_t { (1, k) } else { (n, 1) };
    let (lhs, rhs) = ((lhs, lhs_strides), (rhs, rhs_strides));
    gemm_strided(
        dst,
        dst_rs,
        accumulate,
        lhs,
        rhs,
        (m, n, k),
        1.0,
        parallelism,
    )
}

/// `dst[m, n] (row stride dst_rs) = (read ? dst : 0) + scale · lhs[m, k] · rhs[k, n]`, each
/// operand a strided view `(values, (row stride, column stride))`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    dst: &mut [f32],
    dst_rs: usize,
    read: bool,
    (lhs, (lhs_rs, lhs_cs)): (&[f32], (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (&[f32], (usize, usize)),
    (m, n, k): (usize, usize, usize),
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() > last(dst_rs, 1, m, n));
    assert!(k == 0 || lhs.len() > last(lhs_rs, lhs_cs, m, k));
    assert!(k == 0 || rhs.len() > last(rhs_rs, rhs_cs, k, n));
    // SAFETY: the asserts keep every element the strides reach inside its slice.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            dst_rs,
            read,
            (lhs.as_ptr(), (lhs_rs, lhs_cs)),
            (rhs.as_ptr(), (rhs_rs, rhs_cs)),
            (m, n, k),
            scale,
            parallelism,
        )
    }
}

/// [`gemm_strided`] on pointers, for a destination that other threads write around (tiles of
/// one output); with `read` false the destination is only written.
///
/// # Safety
/// Every element the strides reach from each pointer must be valid (for writing, at `dst`) and
/// no other thread may touch the destination's elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    read: bool,
    (lhs, (lhs_rs, lhs_cs)): (*const f32, (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (*const f32, (usize, usize)),
    (m, n, k): (usize, usize, usize),
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            read,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Whether the CPU kernels serve these tensors: all on the CPU, all f32.
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// Keeps the memory of freed large tensors in the process for the next ones, instead of
/// giving it back to the kernel and faulting it in again zero-filled: glibc hands allocations
/// above its (adaptive, at most 32 MB) mmap threshold straight to `mmap`/`munmap` and trims the
/// heap top above 128 KB, so every activation of a diffusion model's early layers costs page
/// faults (measured: a fifth of a CPU training step's time in the kernel). Call once at start
/// in a process that runs the engine on the CPU; elsewhere it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the engine allocates.
    unsafe {
        // 32 MB is the largest threshold glibc accepts (half its heap size; a larger value is
        // refused and the adaptive threshold stays): a fixed one stops it from starting low.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Runs `f` on one of the CPU kernels' own threads (candle's pool) rather than the caller's.
///
/// Every parallel CPU op started from a thread outside that pool is handed to the pool and the
/// caller sleeps on a latch until it is done: a futex wake and wait per op, hundreds per UNet
/// pass. Started from inside the pool, an op runs on the calling worker and the others join in.
/// Measured on the tiny model (2 cores, 50-step CFG sample): 0.55-0.62 s without, 0.36-0.38 s
/// with (`examples/bench.rs`). The caller waits for `f`; on other devices `f` runs in place.
pub fn on_compute_threads<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    device.with_context(f)
}

/// `max |a - b| / max |b|`, for the kernels' parity tests.
#[cfg(test)]
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The work runs on a thread of the pool that the CPU ops split their work over, so that
    /// their parallel parts start without a hand-off; the caller's thread is not one of them.
    #[test]
    fn compute_runs_on_the_kernels_threads() {
        assert_eq!(rayon::current_thread_index(), None);
        let caller = std::thread::current().id();
        let (index, thread, ops) = on_compute_threads(&Device::Cpu, || {
            let t = Tensor::arange(0f32, 64., &Device::Cpu).unwrap();
            let sum = (&t * &t).unwrap().sum_all().unwrap();
            (
                rayon::current_thread_index(),
                std::thread::current().id(),
                sum.to_scalar::<f32>().unwrap(),
            )
        });
        assert!(index.is_some(), "not on a pool thread");
        assert_ne!(thread, caller);
        assert_eq!(ops, (0..64).map(|i| (i * i) as f32).sum::<f32>());
    }
}
