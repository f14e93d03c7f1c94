//! Activation recomputation: a block's forward kept without its intermediate activations, run again
//! in the backward.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, Var};

use super::block::{BLOCK_WEIGHTS, Block, Pass};

/// [`Block::forward`] keeping only its input and output for the backward, which runs the block
/// again: activation recomputation, trading a second forward per block for the memory of its
/// intermediate activations. The gradients are the same as without it (the forward is
/// deterministic).
/// `counter` counts the blocks run again.
pub(crate) fn recompute(block: &Block, x: &Tensor, pass: &Pass, counter: &Arc<AtomicUsize>) -> Result<Tensor> {
    // Forward on detached copies: candle keeps no graph of them.
    let out = block.map(|w| Ok(w.detach()))?.forward(&x.detach(), pass, None)?;
    // The weights travel as one flat tensor, so that one op carries all their gradients.
    let weights = block.weights();
    let shapes = weights.map(|w| w.shape().clone());
    let flat = Tensor::cat(&weights.iter().map(|w| w.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let op = Recompute { block: block.clone(), pass: pass.clone(), shapes, out, counter: Arc::clone(counter) };
    x.apply_op2(&flat, op)
}

/// The op [`recompute`] records: its forward hands back the output computed without a graph; its
/// backward runs the block again with one and differentiates it.
struct Recompute {
    block: Block,
    pass: Pass,
    shapes: [Shape; BLOCK_WEIGHTS],
    out: Tensor,
    /// The model's count of blocks run again.
    counter: Arc<AtomicUsize>,
}

impl Recompute {
    fn output<S: candle_core::backend::BackendStorage>(
        &self,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (storage, layout) = self.out.storage_and_layout();
        let storage = pick(&storage)
            .ok_or_else(|| candle_core::Error::Msg("recompute: the output is on another device".into()))?;
        Ok((storage.try_clone(layout)?, self.out.shape().clone()))
    }
}

impl candle_core::CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "recompute-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, flat: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.counter.fetch_add(1, Ordering::Relaxed);
        let x = Var::from_tensor(&x.detach())?;
        let flat = Var::from_tensor(&flat.detach())?;
        let mut at = 0;
        let mut weights = Vec::with_capacity(BLOCK_WEIGHTS);
        for shape in &self.shapes {
            let n = shape.elem_count();
            weights.push(flat.as_tensor().narrow(0, at, n)?.reshape(shape)?);
            at += n;
        }
        let weights: [Tensor; BLOCK_WEIGHTS] = weights.try_into().expect("one tensor per weight");
        let out = self.block.with_weights(weights).forward(x.as_tensor(), &self.pass, None)?;
        // d sum(out * grad) / d out = grad: the block's backward, driven by the incoming gradient.
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        Ok((grads.get(x.as_tensor()).cloned(), grads.get(flat.as_tensor()).cloned()))
    }
}
