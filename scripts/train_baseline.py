#!/usr/bin/env python3
"""PyTorch peer for `bench-train`: the same Llama shapes, batch, fp32 and AdamW on the same CPU cores.

usage: train_baseline.py --preset tiny|llama-125m [--batch 8] [--seq 256] [--vocab 32000] [--steps 5]
Prints tokens/s as `RESULT tokens_per_s=...`.
"""
import argparse
import math
import time

import torch

PRESETS = {
    "tiny": dict(dim=256, layers=4, heads=8, kv_heads=4, ffn=688, tied=True),
    "llama-125m": dict(dim=768, layers=12, heads=12, kv_heads=4, ffn=2048, tied=False),
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
        inv = 10000.0 ** (-torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
        ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model = Llama(PRESETS[a.preset], a.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
    params = sum(p.numel() for p in model.parameters())
    print(f"{a.preset}: {params} parameters, batch {a.batch} x {a.seq}, vocab {a.vocab}, {torch.get_num_threads()} threads")
    total = 0.0
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step > 0:
            total += time.perf_counter() - t0
    tps = a.steps * a.batch * a.seq / total
    print(f"PyTorch {torch.__version__}: {tps:.0f} tokens/s")
    print(f"RESULT tokens_per_s={tps:.1f}")


if __name__ == "__main__":
    main()
