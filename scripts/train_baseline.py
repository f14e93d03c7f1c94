#!/usr/bin/env python3
"""PyTorch peer for `bench-train`: the same Llama shapes, batch and AdamW on the same CPU cores or GPU.

usage: train_baseline.py --preset tiny|llama-125m|llama-1b [--batch 8] [--seq 256] [--vocab 32000]
           [--steps 5] [--device cpu|cuda] [--dtype f32|bf16] [--compile]
On CPU: fp32, plain AdamW. On a GPU the reference setup: bf16 autocast over fp32 weights, fused AdamW,
SDPA attention, optionally torch.compile. Prints `RESULT tokens_per_s=...` (and MFU and peak memory
on a GPU).
"""
import argparse
import math
import time

import torch

PRESETS = {
    "tiny": dict(dim=256, layers=4, heads=8, kv_heads=4, ffn=688, tied=True),
    "llama-125m": dict(dim=768, layers=12, heads=12, kv_heads=4, ffn=2048, tied=False),
    "llama-1b": dict(dim=2048, layers=22, heads=32, kv_heads=4, ffn=5632, tied=False),
}


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h, kv = c["dim"], c["heads"], c["kv_heads"]
        hd = d // h
        self.h, self.kv, self.hd = h, kv, hd
        self.attn_norm = torch.nn.RMSNorm(d, eps=1e-5)
        self.mlp_norm = torch.nn.RMSNorm(d, eps=1e-5)
        self.q = torch.nn.Linear(d, h * hd, bias=False)
        self.k = torch.nn.Linear(d, kv * hd, bias=False)
        self.v = torch.nn.Linear(d, kv * hd, bias=False)
        self.o = torch.nn.Linear(h * hd, d, bias=False)
        self.gate = torch.nn.Linear(d, c["ffn"], bias=False)
        self.up = torch.nn.Linear(d, c["ffn"], bias=False)
        self.down = torch.nn.Linear(c["ffn"], d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = self.attn_norm(x)

        def rope(z):
            z1, z2 = z[..., : self.hd // 2], z[..., self.hd // 2 :]
            return z * cos + torch.cat([-z2, z1], -1) * sin

        q = rope(self.q(h).view(b, t, self.h, self.hd).transpose(1, 2))
        k = rope(self.k(h).view(b, t, self.kv, self.hd).transpose(1, 2))
        v = self.v(h).view(b, t, self.kv, self.hd).transpose(1, 2)
        k = k.repeat_interleave(self.h // self.kv, dim=1)
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class Llama(torch.nn.Module):
    def __init__(self, c, vocab):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, c["dim"])
        self.blocks = torch.nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.norm = torch.nn.RMSNorm(c["dim"], eps=1e-5)
        self.head = None if c["tied"] else torch.nn.Linear(c["dim"], vocab, bias=False)
        self.hd = c["dim"] // c["heads"]

    def forward(self, ids):
        t = ids.shape[1]
        inv = 10000.0 ** (-torch.arange(0, self.hd, 2, dtype=torch.float32, device=ids.device) / self.hd)
        ang = torch.arange(t, dtype=torch.float32, device=ids.device)[:, None] * inv[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)


def flops_per_token(c, vocab, seq):
    """6 per matmul weight (the LM head included) + 12 x layers x dim x seq, as bench-train counts."""
    d, h, kv, f = c["dim"], c["heads"], c["kv_heads"], c["ffn"]
    hd = d // h
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    return 6.0 * (c["layers"] * per_layer + vocab * d) + 12.0 * c["layers"] * d * seq


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    model = Llama(PRESETS[a.preset], a.vocab).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    step_model = torch.compile(model) if a.compile else model
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=dev)
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(dev) if cuda else f"{torch.get_num_threads()} threads"
    print(f"{a.preset}: {params} parameters, batch {a.batch} x {a.seq}, vocab {a.vocab}, {a.dtype}, {where}")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    total = 0.0
    warmup = 3 if a.compile else 1
    for step in range(a.steps + warmup):
        t0 = time.perf_counter()
        with autocast:
            logits = step_model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, a.vocab).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            total += time.perf_counter() - t0
    tps = a.steps * a.batch * a.seq / total
    mode = "torch.compile" if a.compile else "eager"
    print(f"PyTorch {torch.__version__} {mode}: {tps:.0f} tokens/s")
    if cuda:
        mfu = tps * flops_per_token(PRESETS[a.preset], a.vocab, a.seq) / (a.peak_tflops * 1e12)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        print(f"MFU {100 * mfu:.1f}%, peak memory {peak:.1f} GiB")
        print(f"RESULT mfu={mfu:.4f}")
        print(f"RESULT peak_gib={peak:.2f}")
    print(f"RESULT tokens_per_s={tps:.1f}")


if __name__ == "__main__":
    main()
