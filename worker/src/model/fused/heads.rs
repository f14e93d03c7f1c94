//! Projections split into attention heads with the RoPE rotation on the way, and merged back.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, D, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::on_gpu;
use super::{In, Kernels, contiguous_f32, forward3, simd_fn};
use crate::model::Rope;

impl Kernels {
    /// The rows of a projection `[batch * seq, heads * head_dim]` as heads `[batch, heads, seq, head_dim]`,
    /// rotated by `rope` at positions `offset..offset + seq` when it is given. Fused where the kernels
    /// serve the dtype (one copy, the rotation on the way); composed elsewhere ([`Rope::apply_at`]).
    pub fn split_heads(
        self,
        x: &Tensor,
        (batch, seq, heads): (usize, usize, usize),
        rope: Option<&Rope>,
        offset: usize,
    ) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)? / heads;
        if self.serves(x) {
            let op = SplitHeads { batch, seq, heads, head_dim };
            let x = x.contiguous()?;
            return match rope {
                Some(rope) => {
                    let (cos, sin) = rope.window(offset, seq)?;
                    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
                }
                None => x.apply_op1(op),
            };
        }
        let x = x.reshape((batch, seq, heads, head_dim))?.transpose(1, 2)?.contiguous()?;
        match rope {
            Some(rope) => rope.apply_at(&x, offset),
            None => Ok(x),
        }
    }
}

#[derive(Clone, Copy)]
struct SplitHeads {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
}

impl SplitHeads {
    #[cfg(feature = "cuda")]
    fn kernel_shape(&self) -> pretrain_kernels::Heads {
        pretrain_kernels::Heads { batch: self.batch, seq: self.seq, heads: self.heads, head_dim: self.head_dim }
    }

    #[cfg(feature = "cuda")]
    fn heads_shape(&self) -> Shape {
        Shape::from((self.batch, self.heads, self.seq, self.head_dim))
    }

    #[cfg(feature = "cuda")]
    fn rows_shape(&self) -> Shape {
        Shape::from((self.batch * self.seq, self.heads * self.head_dim))
    }

    fn check(&self, l: &Layout) -> Result<()> {
        if l.dims() != [self.batch * self.seq, self.heads * self.head_dim] {
            candle_core::bail!(
                "split-heads: input {:?} is not [{} x {}, {} x {}]",
                l.dims(),
                self.batch,
                self.seq,
                self.heads,
                self.head_dim
            );
        }
        Ok(())
    }

    /// The RoPE rows (`cos`, `sin`), checked to hold `seq x head_dim` values each.
    fn tables<'a>(
        &self,
        (cos, cos_layout): (&'a CpuStorage, &Layout),
        (sin, sin_layout): (&'a CpuStorage, &Layout),
        what: &str,
    ) -> Result<(&'a [f32], &'a [f32])> {
        let (cos, sin) = (contiguous_f32(cos, cos_layout, what)?, contiguous_f32(sin, sin_layout, what)?);
        if cos.len() != self.seq * self.head_dim || sin.len() != cos.len() {
            candle_core::bail!("{what}: tables of {} values for {} x {}", cos.len(), self.seq, self.head_dim);
        }
        Ok((cos, sin))
    }

    /// `[b, heads, seq, hd]` from `[b * seq, heads * hd]`, each head row rotated by its position's
    /// row of `tables` (`cos`, `sin`) when there are any.
    fn forward(&self, x: &[f32], tables: Option<(&[f32], &[f32])>) -> Vec<f32> {
        let Self { seq, heads, head_dim: hd, .. } = *self;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(seq * hd).enumerate().for_each(|(bh, out)| {
            let (b, h) = (bh / heads, bh % heads);
            gather_rows(out, x, hd, (b * seq * heads * hd + h * hd, heads * hd), tables, (0, 1), false);
        });
        y
    }

    /// The inverse: `[b * seq, heads * hd]` from `[b, heads, seq, hd]`, rotated back.
    fn backward(&self, g: &[f32], tables: Option<(&[f32], &[f32])>) -> Vec<f32> {
        let Self { seq, heads, head_dim: hd, .. } = *self;
        let mut dx = vec![0f32; g.len()];
        dx.par_chunks_mut(heads * hd).enumerate().for_each(|(bt, out)| {
            let (b, t) = (bt / seq, bt % seq);
            gather_rows(out, g, hd, ((b * heads * seq + t) * hd, seq * hd), tables, (t, 0), true);
        });
        dx
    }
}

simd_fn! {
    /// The rows of `out` (`hd` each) from `x` at `start + i * stride` (`at`), each rotated by row
    /// `row0 + i * step` (`rows`) of the tables when there are any, by the negative angle when
    /// `inverse`.
    fn gather_rows(
        out: &mut [f32],
        x: &[f32],
        hd: usize,
        at: (usize, usize),
        tables: Option<(&[f32], &[f32])>,
        rows: (usize, usize),
        inverse: bool,
    ) {
        let ((start, stride), (row0, step)) = (at, rows);
        for (i, out) in out.chunks_mut(hd).enumerate() {
            let src = &x[start + i * stride..][..hd];
            match tables {
                None => out.copy_from_slice(src),
                Some((cos, sin)) => {
                    let r = (row0 + i * step) * hd;
                    rotate_half(src, &cos[r..r + hd], &sin[r..r + hd], inverse, out);
                }
            }
        }
    }
}

/// Rotate half: `(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`, or by `-angle` (the gradient) when `inverse`.
#[inline(always)]
fn rotate_half(x: &[f32], cos: &[f32], sin: &[f32], inverse: bool, out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (c, s) = (cos[i], if inverse { -sin[i] } else { sin[i] });
        o1[i] = x1[i] * c - x2[i] * s;
        o2[i] = x2[i] * c + x1[i] * s;
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l)?;
        let x = contiguous_f32(s, l, "split-heads")?;
        let y = self.forward(x, None);
        Ok((CpuStorage::F32(y), Shape::from((self.batch, self.heads, self.seq, self.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.check(l)?;
        on_gpu(crate::model::cuda::heads((s, l), None, self.kernel_shape(), true), self.heads_shape())
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&MergeHeads(*self))?))
    }
}

impl CustomOp3 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads-rope"
    }

    forward3!();

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &MergeHeads(*self))?;
        Ok((Some(grad), None, None))
    }
}

impl SplitHeads {
    fn cpu3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        self.check(l1)?;
        let x = contiguous_f32(s1, l1, "split-heads-rope")?;
        let tables = self.tables((s2, l2), (s3, l3), "split-heads-rope")?;
        let y = self.forward(x, Some(tables));
        Ok((CpuStorage::F32(y), Shape::from((self.batch, self.heads, self.seq, self.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CudaStorage>; 3]) -> Result<(CudaStorage, Shape)> {
        self.check(l1)?;
        let tables = Some(((s2, l2), (s3, l3)));
        on_gpu(crate::model::cuda::heads((s1, l1), tables, self.kernel_shape(), true), self.heads_shape())
    }
}

impl Kernels {
    /// Heads `[batch, heads, seq, head_dim]` back into rows `[batch * seq, heads * head_dim]` (attention's
    /// output for the output projection). Fused where the kernels serve the dtype; composed elsewhere.
    pub fn merge_heads(self, x: &Tensor) -> Result<Tensor> {
        let (batch, heads, seq, head_dim) = x.dims4()?;
        if self.serves(x) {
            return x.contiguous()?.apply_op1(MergeHeads(SplitHeads { batch, seq, heads, head_dim }));
        }
        x.transpose(1, 2)?.reshape((batch * seq, heads * head_dim))
    }
}

/// Heads back into rows, rotated back by the tables when there are any: split-heads' gradient, and
/// [`merge_heads`].
struct MergeHeads(SplitHeads);

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let split = self.0;
        let g = contiguous_f32(s, l, "merge-heads")?;
        if g.len() != split.batch * split.seq * split.heads * split.head_dim {
            candle_core::bail!("merge-heads: {} values for {:?}", g.len(), l.dims());
        }
        let dx = split.backward(g, None);
        Ok((CpuStorage::F32(dx), Shape::from((split.batch * split.seq, split.heads * split.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let split = self.0;
        if l.dims() != [split.batch, split.heads, split.seq, split.head_dim] {
            candle_core::bail!("merge-heads: input {:?} for {:?}", l.dims(), split.heads_shape());
        }
        on_gpu(crate::model::cuda::heads((s, l), None, split.kernel_shape(), false), split.rows_shape())
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.0)?))
    }
}

impl CustomOp3 for MergeHeads {
    fn name(&self) -> &'static str {
        "merge-heads-rope"
    }

    forward3!();
}

impl MergeHeads {
    fn cpu3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        let split = self.0;
        let g = contiguous_f32(s1, l1, "merge-heads-rope")?;
        let tables = split.tables((s2, l2), (s3, l3), "merge-heads-rope")?;
        let dx = split.backward(g, Some(tables));
        Ok((CpuStorage::F32(dx), Shape::from((split.batch * split.seq, split.heads * split.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CudaStorage>; 3]) -> Result<(CudaStorage, Shape)> {
        let split = self.0;
        if l1.dims() != [split.batch, split.heads, split.seq, split.head_dim] {
            candle_core::bail!("merge-heads-rope: input {:?} for {:?}", l1.dims(), split.heads_shape());
        }
        let tables = Some(((s2, l2), (s3, l3)));
        on_gpu(crate::model::cuda::heads((s1, l1), tables, split.kernel_shape(), false), split.rows_shape())
    }
}
