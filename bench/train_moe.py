#!/usr/bin/env python3
"""Trains bench-qwen3moe: a small real Qwen3-MoE (8 experts, top-2) that the MoE quality bars are
measured on (issue 7). Runs on the GPU machine with PyTorch + transformers; writes a Hugging Face
directory with experts stored as separate tensors (model.layers.L.mlp.experts.E.{gate,up,down}_proj)
in safetensors shards, the bench-qwen3-28m tokenizer, TRAINING.json, and a parity fixture
(token ids -> transformers logits of the saved model, reloaded from disk).

Corpus (assembled here, none of it WikiText-2 nor the bartowski v3 calibration text):
  ../shared/data/text/war-and-peace.txt, ../shared/data/c4/*.jsonl ("prefix" + "gold_completion"),
  ../shared/data/calibration/exllamav2_standard_cal_data/*, and on the machine that trains:
  the Python standard library's .py files and /usr/include headers (sorted paths, capped), so the
  experts see prose, web text, code and C.
Usage: python3 bench/train_moe.py --shared DIR --out DIR [--seconds 300 | --steps N] [--seed 7]
       [--experts 8 --top-k 2 --moe-intermediate 512 --layers 6]
The model measured in docs/benchmarks.md: --steps 1476 (seed 7), 48.4M tokens, ~2 min on one H200.
GPU training is not bit-reproducible (atomics in the backward pass): two runs of the same command
gave held-out perplexity 2.77 and 2.80, so KLD tables name the run (TRAINING.json) they used.
Regenerate: see docs/moe.md (the same command on the GPU machine; the corpus caps keep it stable).
"""
import argparse, glob, json, math, os, sys, sysconfig, time

import torch
import torch.nn.functional as F


def read(path, limit=None):
    with open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit)
    return data.decode("utf-8", errors="replace")


def corpus(shared, code_cap):
    docs = []
    docs.append(("war-and-peace", read(f"{shared}/data/text/war-and-peace.txt")))
    for p in sorted(glob.glob(f"{shared}/data/c4/*.jsonl")):
        for line in open(p, encoding="utf-8"):
            try:
                j = json.loads(line)
            except json.JSONDecodeError:
                continue
            docs.append(("c4", j.get("prefix", "") + j.get("gold_completion", "")))
    for p in sorted(glob.glob(f"{shared}/data/calibration/exllamav2_standard_cal_data/*")):
        if os.path.isfile(p):
            docs.append(("exl2-cal", read(p)))
    total = 0
    for root, pat in ((sysconfig.get_paths()["stdlib"], "**/*.py"), ("/usr/include", "**/*.h")):
        n = 0
        for p in sorted(glob.glob(f"{root}/{pat}", recursive=True)):
            if "/test" in p or not os.path.isfile(p):
                continue
            t = read(p, 200_000)
            docs.append(("python" if p.endswith(".py") else "c-headers", t))
            n += len(t)
            if n > code_cap:
                break
        total += n
    return docs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (0: as many as fit in --seconds)")
    ap.add_argument("--code-cap", type=int, default=12_000_000, help="characters of code per source")
    # Shape (defaults: bench-qwen3moe). More, narrower experts (Qwen3-30B-A3B routes 8 of 128)
    # see narrower slices of the tokens, which is where a per-expert Hessian differs most from
    # the layer's pooled one.
    ap.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token")
    ap.add_argument("--moe-intermediate", type=int, default=512, help="each expert's intermediate size")
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    import transformers
    from safetensors.torch import save_file

    tok_dir = f"{args.shared}/data/models/bench-qwen3-28m"
    tok = Tokenizer.from_file(f"{tok_dir}/tokenizer.json")
    docs = corpus(args.shared, args.code_cap)
    mix = {}
    for k, t in docs:
        mix[k] = mix.get(k, 0) + len(t)
    print("corpus chars by source:", mix, flush=True)
    t0 = time.time()
    enc = tok.encode_batch([t for _, t in docs])
    ids = []
    for e in enc:
        ids.append(0)  # <|endoftext|> between documents
        ids.extend(e.ids)
    ids = torch.tensor(ids, dtype=torch.long)
    print(f"tokens {len(ids)} (tokenized in {time.time() - t0:.1f}s)", flush=True)

    cfg = Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=1024,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, num_experts=args.experts, num_experts_per_tok=args.top_k,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, router_aux_loss_coef=0.01,
        output_router_logits=True, bos_token_id=0, eos_token_id=0, attention_bias=False)
    dev = "cuda"
    model = Qwen3MoeForCausalLM(cfg).to(dev)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params {nparams}", flush=True)

    seq, batch, lr = 512, 64, 2e-3
    # hold out the last 1% of tokens for a perplexity check
    split = int(len(ids) * 0.99)
    train, held = ids[:split].to(dev), ids[split:].to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator(device="cpu").manual_seed(args.seed)

    def get_batch():
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
        x = torch.stack([train[s:s + seq + 1] for s in starts.tolist()])
        return x[:, :-1], x[:, 1:]

    def step(i, total):
        warm = 100
        f = (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))
        for pg in opt.param_groups:
            pg["lr"] = lr * max(f, 0.05)
        x, y = get_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=None)
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
            aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else 0.0
        opt.zero_grad(set_to_none=True)
        (loss + cfg.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    model.train()
    t0 = time.time()
    probe = 40
    for i in range(probe):
        l = step(i, 10_000)
        if i == 9:
            torch.cuda.synchronize()
            t1 = time.time()  # steps 10..39 time the steady state (the first ones warm up)
    torch.cuda.synchronize()
    per = (time.time() - t1) / (probe - 10)
    total = args.steps if args.steps else max(probe + 50, int(args.seconds / per))
    print(f"{per * 1000:.1f} ms/step -> {total} steps ({total * batch * seq / 1e6:.1f}M tokens)", flush=True)
    for i in range(probe, total):
        l = step(i, total)
        if i % 200 == 0:
            print(f"step {i} loss {l:.3f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        nll, n = 0.0, 0
        for s in range(0, len(held) - seq - 1, seq):
            x = held[s:s + seq + 1]
            lo = model(input_ids=x[None, :-1]).logits.float()
            nll += F.cross_entropy(lo[0], x[1:], reduction="sum").item()
            n += seq
    held_ppl = math.exp(nll / max(n, 1))
    print(f"held-out ppl {held_ppl:.3f} over {n} tokens", flush=True)

    # Save with experts as separate tensors, whatever module layout this transformers version uses.
    sd = {}
    inter, hid, E = cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_experts
    for k, v in model.state_dict().items():
        v = v.detach().to(torch.bfloat16).cpu().contiguous()
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            # transformers' banks are [out, in] per expert; transpose only a bank that is
            # unambiguously [in, out] (a square one, 2 * inter == hid, is taken as [out, in])
            if tuple(v.shape) == (E, hid, 2 * inter) and hid != 2 * inter:
                v = v.transpose(1, 2)
            assert tuple(v.shape) == (E, 2 * inter, hid), (k, v.shape)
            for e in range(E):
                sd[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                sd[f"{pre}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            if tuple(v.shape) == (E, inter, hid) and hid != inter:
                v = v.transpose(1, 2)
            assert tuple(v.shape) == (E, hid, inter), (k, v.shape)
            for e in range(E):
                sd[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            sd[k] = v
    os.makedirs(args.out, exist_ok=True)
    names = sorted(sd)
    shards, cur, size = [], [], 0
    for k in names:
        b = sd[k].numel() * 2
        if cur and size + b > 12 * 2**20:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += b
    shards.append(cur)
    wmap = {}
    for i, ks in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k] for k in ks}, f"{args.out}/{fn}", metadata={"format": "pt"})
        wmap.update({k: fn for k in ks})
    json.dump({"metadata": {"total_size": sum(v.numel() * 2 for v in sd.values())}, "weight_map": wmap},
              open(f"{args.out}/model.safetensors.index.json", "w"), indent=1)
    c = cfg.to_dict()
    c["architectures"] = ["Qwen3MoeForCausalLM"]
    c["dtype"] = "bfloat16"
    c["output_router_logits"] = False
    json.dump(c, open(f"{args.out}/config.json", "w"), indent=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(f"{tok_dir}/{f}", "rb") as a, open(f"{args.out}/{f}", "wb") as b:
            b.write(a.read())
    json.dump({"kind": "moe", "params": nparams, "steps": total, "tokens": total * batch * seq, "seq": seq,
               "batch": batch, "lr": lr, "seed": args.seed, "heldout_ppl": held_ppl, "corpus_chars": mix,
               "experts": args.experts, "top_k": args.top_k, "moe_intermediate": args.moe_intermediate,
               "layers": args.layers, "command": " ".join(sys.argv),
               "transformers": transformers.__version__, "torch": torch.__version__},
              open(f"{args.out}/TRAINING.json", "w"), indent=1)

    # Reload from disk with transformers (checks the per-expert layout) and write a parity fixture.
    # Both models run on the CPU in fp32 from the same bf16 weights: no TF32, so a layout error
    # (O(1) differences) is not hidden by GPU matmul precision (~1e-3 with TF32).
    re = Qwen3MoeForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    mine = model.to(torch.bfloat16).float().cpu().eval()
    x = held[:128][None].cpu()
    with torch.no_grad():
        ref = mine(input_ids=x).logits
        got = re(input_ids=x).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    same = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    lo = got[0]
    json.dump({"ids": x[0].tolist(), "logits_first4": lo[:4].tolist(), "logits_last": lo[-1].tolist(),
               "argmax": lo.argmax(-1).tolist()}, open(f"{args.out}/parity_fixture.json", "w"))
    print(f"reloaded-vs-trained max rel logit diff (CPU fp32, same bf16 weights): {rel:.3e}, "
          f"same argmax {100 * same:.1f}%")
    # A layout error (gate/up swapped, experts permuted, a transposed bank) changes logits by O(1)
    # and most argmaxes. The two models differ in how transformers builds them (the trained one
    # keeps the GPU-side expert implementation chosen at construction), which moved logits by up
    # to ~4e-3 relative in the run of 2026-12-04 (a top-2 near-tie flipping), so the bound is 5e-2.
    if rel > 5e-2 or same < 0.95:
        sys.exit(f"the saved per-expert layout does not reproduce the trained model (rel {rel:.3e})")
    print("saved", args.out, [len(s) for s in shards])


if __name__ == "__main__":
    main()
