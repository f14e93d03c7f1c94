//! Causal grouped-query attention that never forms the `[batch, heads, seq, seq]` scores.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{In, Kernels, contiguous_f32, exp, forward3, simd_fn};
use crate::model::gemm::{self, Mat};

/// `softmax(scale * s + causal mask)` over the last dimension of `[.., t, keys]` scores (in fp32,
/// returned in the scores' dtype), composed from candle operations: [`Kernels::causal_attention`]'s
/// path where the fused kernel does not serve. Query row `i` is at position `keys - t + i` and sees
/// the keys up to it (with `keys > t`, the keys before the queries are a cache of earlier positions).
pub(crate) fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let (t, keys) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let offset = keys.saturating_sub(t);
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..keys).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (t, keys), scores.device())?;
    let x = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(scores.dtype())
}

simd_fn! {
    /// Rows `r0..` of causal attention scores (`keys` per row) into probabilities in place: row `i`
    /// sees keys `0..=r0 + i`, the rest become 0.
    fn causal_softmax_rows(p: &mut [f32], keys: usize, r0: usize, scale: f32) {
        for (i, row) in p.chunks_mut(keys).enumerate() {
            let visible = r0 + i + 1;
            let (seen, masked) = row.split_at_mut(visible);
            let max = seen.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
            for v in seen.iter_mut() {
                *v = exp(*v * scale - max);
            }
            let sum: f32 = seen.iter().sum();
            let inv = 1.0 / sum;
            seen.iter_mut().for_each(|v| *v *= inv);
            masked.fill(0.0);
        }
    }
}

simd_fn! {
    /// The scores' gradient in place of `dp` (`dO V^T`, `keys` per row): `P (dP - rowsum(dO o)) scale`,
    /// with `g` and `o` the block's rows of the output gradient and output (`hd` per row).
    fn scores_grad(dp: &mut [f32], p: &[f32], g: &[f32], o: &[f32], keys: usize, hd: usize, scale: f32) {
        for ((ds, p), (g, o)) in dp.chunks_mut(keys).zip(p.chunks(keys)).zip(g.chunks(hd).zip(o.chunks(hd))) {
            let d: f32 = g.iter().zip(o).map(|(a, b)| a * b).sum();
            for (ds, &p) in ds.iter_mut().zip(p) {
                *ds = p * (*ds - d) * scale;
            }
        }
    }
}

/// Query rows per block of the fused attention: a block multiplies only the keys its rows can see.
const QUERY_BLOCK: usize = 64;

impl Kernels {
    /// Causal attention `softmax(scale q k^T + mask) v` with grouped-query heads: `q` `[batch, heads, seq,
    /// head_dim]`, `k` and `v` `[batch, kv_heads, keys, head_dim]`, query head `i` reading key/value head
    /// `i / (heads / kv_heads)`. With as many keys as queries, query `i` sees keys `0..=i`; with more
    /// (generation with a cache of earlier positions' keys and values), the queries are the last
    /// positions and each sees every key up to its own. On the CPU in fp32, and on CUDA devices in fp32 or bf16 for the head
    /// sizes of [`pretrain_kernels::ATTENTION_HEAD_DIMS`], it is one fused kernel (FlashAttention's shape:
    /// no `seq x seq` tensor is ever stored; the backward recomputes the probabilities block by block, and
    /// blocks above the diagonal are never computed); elsewhere it is composed from candle operations.
    pub fn causal_attention(self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, h, t, hd) = q.dims4()?;
        let (kb, kv, kt, khd) = k.dims4()?;
        if (kb, khd) != (b, hd) || kt < t || v.dims() != k.dims() || kv == 0 || !h.is_multiple_of(kv) {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit together", q.dims(), k.dims(), v.dims());
        }
        let kernel_fits = kt == t && (q.device().is_cpu() || pretrain_kernels::ATTENTION_HEAD_DIMS.contains(&hd));
        if self.serves(q) && kernel_fits {
            let op = Attention {
                scale: scale as f32,
                batch: b,
                heads: h,
                kv_heads: kv,
                seq: t,
                head_dim: hd,
                #[cfg(feature = "cuda")]
                lse: std::sync::Mutex::new(None),
            };
            return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
        }
        // The query heads sharing a key/value head stacked into one `[groups x t, hd]` matrix, so keys
        // and values are never repeated.
        let groups = h / kv;
        let scores = q.contiguous()?.reshape((b, kv, groups * t, hd))?.matmul(&k.t()?.contiguous()?)?;
        let probs = causal_softmax(&scores.reshape((b, h, t, kt))?, scale)?;
        probs.reshape((b, kv, groups * t, kt))?.matmul(&v.contiguous()?)?.reshape((b, h, t, hd))
    }
}

#[derive(Debug)]
struct Attention {
    scale: f32,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    /// On a CUDA device: the forward's log-sum-exp per query row, which the backward reads.
    #[cfg(feature = "cuda")]
    lse: std::sync::Mutex<Option<CudaStorage>>,
}

impl Attention {
    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<()> {
        let Self { batch: b, heads: h, kv_heads: kv, seq: t, head_dim: hd, .. } = *self;
        if q.dims() != [b, h, t, hd] || k.dims() != [b, kv, t, hd] || v.dims() != [b, kv, t, hd] {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} for {self:?}", q.dims(), k.dims(), v.dims());
        }
        Ok(())
    }

    /// Probabilities of query rows `r0..r0 + rows` of one head over keys `0..r0 + rows` into `p` (row
    /// stride `r0 + rows`): scaled scores, masked above the diagonal, softmax per row.
    fn probabilities(&self, q: &[f32], k: &[f32], r0: usize, rows: usize, p: &mut [f32]) {
        let (hd, keys) = (self.head_dim, r0 + rows);
        gemm::matmul(p, keys, Mat::rows(&q[r0 * hd..], rows, hd, hd), Mat::rows(k, keys, hd, hd).t(), false);
        causal_softmax_rows(&mut p[..rows * keys], keys, r0, self.scale);
    }

    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let t = self.seq;
        (0..t).step_by(QUERY_BLOCK).map(move |r0| (r0, QUERY_BLOCK.min(t - r0)))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    forward3!();

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner());
            let lse = lse.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("causal-attention-grad: the forward kept no log-sum-exp".into())
            })?;
            let op = AttentionGrad { attention: self, o: &o.contiguous()?, g: &grad, lse };
            let all = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
            let (nq, nk) = (q.elem_count(), k.elem_count());
            return Ok((
                Some(all.narrow(0, 0, nq)?.reshape(q.shape())?),
                Some(all.narrow(0, nq, nk)?.reshape(k.shape())?),
                Some(all.narrow(0, nq + nk, nk)?.reshape(k.shape())?),
            ));
        }
        let tensors = [q, k, v, o, &grad];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(5);
        for (storage, layout) in &guards {
            let candle_core::Storage::Cpu(cpu) = &**storage else {
                candle_core::bail!("causal-attention-grad: a tensor left the CPU");
            };
            slices.push(contiguous_f32(cpu, layout, "causal-attention-grad")?);
        }
        let (dq, dk, dv) = self.backward(slices[0], slices[1], slices[2], slices[3], slices[4]);
        drop(guards);
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

impl Attention {
    fn cpu3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let (q, k, v) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
            contiguous_f32(s3, l3, self.name())?,
        );
        let (t, hd, groups) = (self.seq, self.head_dim, self.heads / self.kv_heads);
        let head = t * hd;
        let mut o = vec![0f32; q.len()];
        // One task per key/value head: its query heads one after the other.
        o.par_chunks_mut(groups * head).enumerate().for_each(|(task, o)| {
            let (k, v) = (&k[task * head..(task + 1) * head], &v[task * head..(task + 1) * head]);
            let mut p = vec![0f32; QUERY_BLOCK.min(t) * t];
            for j in 0..groups {
                let q = &q[(task * groups + j) * head..][..head];
                let o = &mut o[j * head..(j + 1) * head];
                for (r0, rows) in self.blocks() {
                    let keys = r0 + rows;
                    self.probabilities(q, k, r0, rows, &mut p);
                    gemm::matmul(
                        &mut o[r0 * hd..],
                        hd,
                        Mat::rows(&p, rows, keys, keys),
                        Mat::rows(v, keys, hd, hd),
                        false,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CudaStorage>; 3]) -> Result<(CudaStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let (o, lse) = crate::model::cuda::attention((s1, l1), (s2, l2), (s3, l3), &self.kernel_shape())?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((o, l1.shape().clone()))
    }
}

/// Attention's gradients on a CUDA device, `[dq, dk, dv]` flattened into one buffer, from q, k and v
/// (the op's inputs) and the forward's output, its gradient and its log-sum-exp.
#[cfg(feature = "cuda")]
struct AttentionGrad<'a> {
    attention: &'a Attention,
    o: &'a Tensor,
    g: &'a Tensor,
    lse: &'a CudaStorage,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "causal-attention-grad"
    }

    forward3!();
}

#[cfg(feature = "cuda")]
impl AttentionGrad<'_> {
    fn cpu3(&self, _: [In<'_, CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("causal-attention-grad runs on CUDA devices (the CPU's is Attention::backward)")
    }

    fn cuda3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CudaStorage>; 3]) -> Result<(CudaStorage, Shape)> {
        self.attention.check(l1, l2, l3)?;
        let (o, o_layout) = self.o.storage_and_layout();
        let (g, g_layout) = self.g.storage_and_layout();
        let (candle_core::Storage::Cuda(o), candle_core::Storage::Cuda(g)) = (&*o, &*g) else {
            candle_core::bail!("causal-attention-grad: the output or its gradient left the GPU");
        };
        let shape = self.attention.kernel_shape();
        let lse_layout = Layout::contiguous(shape.rows());
        let out = crate::model::cuda::attention_grad(
            ((s1, l1), (s2, l2), (s3, l3)),
            ((o, o_layout), (g, g_layout), (self.lse, &lse_layout)),
            &shape,
        )?;
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * l2.shape().elem_count())))
    }
}

impl Attention {
    #[cfg(feature = "cuda")]
    fn kernel_shape(&self) -> pretrain_kernels::Attention {
        pretrain_kernels::Attention {
            batch: self.batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            seq: self.seq,
            head_dim: self.head_dim,
            scale: self.scale,
            cuda_cores: false,
        }
    }

    /// Gradients of q, k and v from the output `o` and its gradient `g`, per key/value head: with
    /// `P` recomputed block by block, `dV += P^T dO`, `dS = P (dO V^T - rowsum(dO o)) scale`,
    /// `dQ = dS K` and `dK += dS^T Q`.
    fn backward(&self, q: &[f32], k: &[f32], v: &[f32], o: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, hd, groups) = (self.seq, self.head_dim, self.heads / self.kv_heads);
        let head = t * hd;
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; k.len()]);
        dq.par_chunks_mut(groups * head)
            .zip(dk.par_chunks_mut(head).zip(dv.par_chunks_mut(head)))
            .enumerate()
            .for_each(|(task, (dq, (dk, dv)))| {
                let (k, v) = (&k[task * head..(task + 1) * head], &v[task * head..(task + 1) * head]);
                let block = QUERY_BLOCK.min(t) * t;
                let (mut p, mut dp) = (vec![0f32; block], vec![0f32; block]);
                for j in 0..groups {
                    let at = (task * groups + j) * head;
                    let (q, o, g) = (&q[at..at + head], &o[at..at + head], &g[at..at + head]);
                    let dq = &mut dq[j * head..(j + 1) * head];
                    for (r0, rows) in self.blocks() {
                        let keys = r0 + rows;
                        self.probabilities(q, k, r0, rows, &mut p);
                        let g_rows = Mat::rows(&g[r0 * hd..], rows, hd, hd);
                        gemm::matmul(dv, hd, Mat::rows(&p, rows, keys, keys).t(), g_rows, true);
                        gemm::matmul(&mut dp, keys, g_rows, Mat::rows(v, keys, hd, hd).t(), false);
                        let block = r0 * hd..(r0 + rows) * hd;
                        let (g_block, o_block) = (&g[block.clone()], &o[block]);
                        scores_grad(&mut dp[..rows * keys], &p[..rows * keys], g_block, o_block, keys, hd, self.scale);
                        let ds = Mat::rows(&dp, rows, keys, keys);
                        gemm::matmul(&mut dq[r0 * hd..], hd, ds, Mat::rows(k, keys, hd, hd), false);
                        gemm::matmul(dk, hd, ds.t(), Mat::rows(&q[r0 * hd..], rows, hd, hd), true);
                    }
                }
            });
        (dq, dk, dv)
    }
}
