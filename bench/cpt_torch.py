#!/usr/bin/python3
"""PyTorch reference speed for bench/cpt.sh: the same LoRA fine-tuning step as `calq train` (qwen3
forward in fp32, LoRA on every projection, weights fake-quantized per output channel and inputs per
tensor with a straight-through estimator, next-token cross-entropy, backward, clipping, AdamW) on
the CPU with Debian's python3-torch; prints tokens/s. Token values do not affect speed, so random
tokens are used (no tokenizer needed).

Usage: bench/cpt_torch.py --model DIR [--steps 20] [--seq 256] [--batch 4] [--rank 16] [--wbits 4]
       [--abits 8] [--threads N]
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "fixtures"))
from make_cpt_fixtures import st_read_dir  # noqa: E402


def fq(x, bits, per_row):
    q = 2 ** (bits - 1) - 1
    am = x.detach().abs().amax(dim=-1, keepdim=True) if per_row else x.detach().abs().max()
    s = (am / q).clamp_min(1e-30)
    return x + ((x / s).round().clamp(-q, q) * s - x).detach()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    w = {k: v.float() for k, v in st_read_dir(a.model).items()}
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    NQ, NKV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", H // cfg["num_attention_heads"])
    eps = cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    lora = {}
    g = torch.Generator().manual_seed(0)
    for n, t in w.items():
        if n.endswith("proj.weight"):
            o, i = t.shape
            lora[n[:-7]] = (torch.empty(a.rank, i).uniform_(-1 / math.sqrt(i), 1 / math.sqrt(i), generator=g).requires_grad_(),
                            torch.zeros(o, a.rank).requires_grad_())
    params = [p for ab in lora.values() for p in ab]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    wq = {n: fq(t, a.wbits, True) for n, t in w.items() if n.endswith("proj.weight")}
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.arange(a.seq, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    scale = 32.0 / a.rank
    causal = ~torch.ones(a.seq, a.seq, dtype=torch.bool).tril()

    def rms(x, wt):
        return wt * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def lin(x, p):
        xq = fq(x, a.abits, False)
        A, B = lora[p]
        return xq @ wq[p + ".weight"].T + (xq @ A.T) @ B.T * scale

    def forward(tok):
        Bn, T = tok.shape
        h = w["model.embed_tokens.weight"][tok]
        for l in range(L):
            p = f"model.layers.{l}."
            x = rms(h, w[p + "input_layernorm.weight"])
            s = p + "self_attn."
            q = lin(x, s + "q_proj").view(Bn, T, NQ, D)
            k = lin(x, s + "k_proj").view(Bn, T, NKV, D)
            v = lin(x, s + "v_proj").view(Bn, T, NKV, D)
            if s + "q_norm.weight" in w:
                q, k = rms(q, w[s + "q_norm.weight"]), rms(k, w[s + "k_norm.weight"])
            q, k, v = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)), v.transpose(1, 2)
            k = k.repeat_interleave(NQ // NKV, 1)
            v = v.repeat_interleave(NQ // NKV, 1)
            sc = (q @ k.transpose(-1, -2)) / math.sqrt(D)
            sc = sc.masked_fill(causal, float("-inf"))
            o = torch.softmax(sc, -1) @ v
            h = h + lin(o.transpose(1, 2).reshape(Bn, T, NQ * D), s + "o_proj")
            x = rms(h, w[p + "post_attention_layernorm.weight"])
            m = p + "mlp."
            h = h + lin(torch.nn.functional.silu(lin(x, m + "gate_proj")) * lin(x, m + "up_proj"), m + "down_proj")
        return rms(h, w["model.norm.weight"]) @ head.T

    def step():
        tok = torch.randint(0, V, (a.batch, a.seq), generator=g)
        logits = forward(tok)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    step()  # warm-up
    t0 = time.time()
    for _ in range(a.steps):
        step()
    dt = time.time() - t0
    tps = a.steps * a.batch * a.seq / dt
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {a.steps} steps of {a.batch}x{a.seq} "
          f"in {dt:.1f} s = {tps:.1f} tokens/s")
    print(json.dumps({"tokens_per_second": tps, "steps": a.steps, "batch": a.batch, "seq": a.seq,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
