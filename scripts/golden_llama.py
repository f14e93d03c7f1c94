#!/usr/bin/env python3
"""Writes worker/tests/fixtures/golden-llama.safetensors: a tiny Llama's weights, an input, and the
logits, loss and gradients PyTorch computes for them. The Rust golden test must match them to 1e-4.

usage: python3 scripts/golden_llama.py   (needs torch, safetensors)

The model is written out here in plain PyTorch, mirroring Hugging Face's LlamaForCausalLM: RMSNorm in
fp32, rotate-half RoPE, grouped-query attention by repeating key/value heads, SwiGLU, tied LM head.
"""
import math
import os

import torch
from safetensors.torch import save_file

CONFIG = dict(vocab=64, dim=32, layers=2, heads=4, kv_heads=2, ffn=48, rope_base=10000.0, eps=1e-5)


def rms_norm(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, base):
    _, _, t, d = x.shape
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def forward(p, ids, c):
    b, t = ids.shape
    hd = c["dim"] // c["heads"]
    x = p["model.embed_tokens.weight"][ids]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for l in range(c["layers"]):
        pre = f"model.layers.{l}"
        h = rms_norm(x, p[f"{pre}.input_layernorm.weight"], c["eps"])

        def heads(name, n):
            return (h @ p[f"{pre}.self_attn.{name}.weight"].T).view(b, t, n, hd).transpose(1, 2)

        q = rope(heads("q_proj", c["heads"]), c["rope_base"])
        k = rope(heads("k_proj", c["kv_heads"]), c["rope_base"])
        v = heads("v_proj", c["kv_heads"])
        rep = c["heads"] // c["kv_heads"]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(b, t, -1) @ p[f"{pre}.self_attn.o_proj.weight"].T
        h = rms_norm(x, p[f"{pre}.post_attention_layernorm.weight"], c["eps"])
        gate = torch.nn.functional.silu(h @ p[f"{pre}.mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ p[f"{pre}.mlp.up_proj.weight"].T)) @ p[f"{pre}.mlp.down_proj.weight"].T
    x = rms_norm(x, p["model.norm.weight"], c["eps"])
    return x @ p["model.embed_tokens.weight"].T


def main():
    c = CONFIG
    g = torch.Generator().manual_seed(1234)
    hd = c["dim"] // c["heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], c["dim"]), "model.norm.weight": (c["dim"],)}
    for l in range(c["layers"]):
        pre = f"model.layers.{l}"
        shapes.update({
            f"{pre}.input_layernorm.weight": (c["dim"],),
            f"{pre}.post_attention_layernorm.weight": (c["dim"],),
            f"{pre}.self_attn.q_proj.weight": (c["heads"] * hd, c["dim"]),
            f"{pre}.self_attn.k_proj.weight": (c["kv_heads"] * hd, c["dim"]),
            f"{pre}.self_attn.v_proj.weight": (c["kv_heads"] * hd, c["dim"]),
            f"{pre}.self_attn.o_proj.weight": (c["dim"], c["heads"] * hd),
            f"{pre}.mlp.gate_proj.weight": (c["ffn"], c["dim"]),
            f"{pre}.mlp.up_proj.weight": (c["ffn"], c["dim"]),
            f"{pre}.mlp.down_proj.weight": (c["dim"], c["ffn"]),
        })
    params = {}
    for name, shape in sorted(shapes.items()):
        if "norm" in name:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = 0.2 * torch.randn(shape, generator=g)
        params[name] = w.requires_grad_(True)
    ids = torch.randint(0, c["vocab"], (2, 9), generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    logits = forward(params, inputs, c)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, c["vocab"]), targets.reshape(-1))
    loss.backward()
    out = {name: w.detach() for name, w in params.items()}
    out.update({f"grad.{name}": w.grad for name, w in params.items()})
    out["inputs"] = inputs.to(torch.int64).contiguous()
    out["targets"] = targets.to(torch.int64).contiguous()
    out["logits"] = logits.detach().contiguous()
    out["loss"] = loss.detach().reshape(1)
    path = os.path.join(os.path.dirname(__file__), "..", "worker", "tests", "fixtures", "golden-llama.safetensors")
    save_file(out, path)
    print(f"wrote {os.path.normpath(path)}: loss {loss.item():.6f}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
