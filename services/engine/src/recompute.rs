//! Gradient checkpointing: a network piece whose activations are not kept for the backward
//! pass but computed again there.
//!
//! candle's autograd keeps every intermediate of the forward pass until the loss is dropped. A
//! [`Segment`] applied with [`checkpoint`] runs as one custom op instead: its forward keeps only
//! the inputs and the output, and its backward runs the segment again on the saved inputs, with
//! a graph this time, and backpropagates the incoming gradient through it. The gradients of the
//! inputs go back to the outer graph as the op's own; the gradients of the variables used inside
//! the segment (its trainable weights, or whatever its weights derive from) cannot, since a
//! custom op only has its arguments, so they are added to a [`GradSink`] that the trainer reads
//! after the outer backward pass and adds to what that pass found.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor, TensorId, Var};

/// A piece of a network of two inputs (the activations and a conditioning tensor: the time
/// embedding of a resnet, the text states of a transformer).
pub trait Segment: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor>;
}

/// Gradients of the variables used inside checkpointed segments, accumulated over one backward
/// pass (see the module docs).
#[derive(Debug, Default)]
pub struct GradSink(Mutex<HashMap<TensorId, Tensor>>);

impl GradSink {
    fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut map = self.0.lock().expect("gradient sink poisoned");
        let sum = match map.remove(&id) {
            Some(g) => (g + grad)?,
            None => grad,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Everything collected since the last call, by variable.
    pub fn take(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.0.lock().expect("gradient sink poisoned"))
    }
}

/// `segment(x, cond)`, recomputed in the backward pass.
pub fn checkpoint<S: Segment>(
    segment: S,
    sink: &Arc<GradSink>,
    x: &Tensor,
    cond: &Tensor,
) -> Result<Tensor> {
    // candle records a custom op only when one of its arguments is in a graph. The segment's
    // weights may train while neither input does (a LoRA in the first block: the latents and
    // the time embedding come from frozen layers), so such an input becomes a variable of its
    // own, a leaf whose gradient nobody reads.
    let x = if x.track_op() || cond.track_op() {
        exact(x)?
    } else {
        Var::from_tensor(&exact(x)?)?.into_inner()
    };
    let op = Recompute {
        segment,
        sink: sink.clone(),
    };
    x.apply_op2_arc(&exact(cond)?, Arc::new(Box::new(op)))
}

/// `t` as a fresh contiguous tensor that owns its whole storage (what the op's forward reads).
fn exact(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.contiguous()?.copy()
    }
}

struct Recompute<S> {
    segment: S,
    sink: Arc<GradSink>,
}

/// A tensor outside any graph over a copy of `storage`.
fn detached(storage: Storage, layout: &Layout) -> Result<Tensor> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("recompute: inputs must be contiguous from offset 0");
    }
    Ok(Tensor::from_storage(
        storage,
        layout.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

impl<S: Segment> Recompute<S> {
    /// Runs the segment without keeping its graph and returns a fresh copy of the output's
    /// storage (a unary op first, so that the storage holds exactly the output).
    fn run(&self, x: Tensor, cond: Tensor) -> Result<(Storage, Shape)> {
        let y = self.segment.forward(&x, &cond)?.detach().affine(1.0, 0.0)?;
        let (storage, layout) = y.storage_and_layout();
        let copy = match &*storage {
            Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("recompute: unsupported device"),
        };
        Ok((copy, y.shape().clone()))
    }
}

impl<S: Segment> CustomOp2 for Recompute<S> {
    fn name(&self) -> &'static str {
        self.segment.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = detached(Storage::Cpu(s1.try_clone(l1)?), l1)?;
        let c = detached(Storage::Cpu(s2.try_clone(l2)?), l2)?;
        match self.run(x, c)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("recompute: the output left the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let x = detached(Storage::Cuda(s1.try_clone(l1)?), l1)?;
        let c = detached(Storage::Cuda(s2.try_clone(l2)?), l2)?;
        match self.run(x, c)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("recompute: the output left the GPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        cond: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let cv = Var::from_tensor(&cond.detach())?;
        let y = self.segment.forward(xv.as_tensor(), cv.as_tensor())?;
        // d(sum(y * g))/dy = g: backpropagates the incoming gradient through the recomputed graph.
        let mut grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        let gx = grads.remove(xv.as_tensor());
        let gc = grads.remove(cv.as_tensor());
        let ids: Vec<TensorId> = grads.get_ids().copied().collect();
        for id in ids {
            if let Some(g) = grads.get_id(id) {
                self.sink.add(id, g.clone())?;
            }
        }
        Ok((gx, gc))
    }
}
