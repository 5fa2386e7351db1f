#!/usr/bin/env python3
"""The original GPTQ code (IST-DASLab/gptq) on a whole Qwen3 checkpoint, layer by layer on one GPU,
with the recipe of that repository's llama.py (`llama_sequential`), timed per stage: the
reference side of bench/cuda_speed.sh (issue 9's end-to-end speed bar).

gptq.py and quant.py are imported from --gptq-repo (a checkout of https://github.com/IST-DASLab/gptq;
not part of calq, never copied into it). What this driver does, in llama_sequential's order:
  1. load the checkpoint with transformers (Qwen3ForCausalLM, fp16, on the CPU; weight init skipped),
  2. run every calibration sequence through the model with layer 0 replaced by a catcher that keeps
     its input and keyword arguments (attention mask, position ids, and on newer transformers the
     rotary `position_embeddings`) and stops the forward pass,
  3. per decoder layer, moved to the GPU: per group of modules (true-sequential: k/v/q, o, up/gate,
     down; or all seven at once with --no-true-sequential) forward hooks call GPTQ.add_batch while
     every sequence runs through the layer (one sequence per call, as llama.py), then
     fasterquant(blocksize, percdamp, groupsize, actorder=False) per module; then the layer runs
     once more on every sequence for the next layer's inputs (of the quantized layer); back to the CPU,
  4. save the (fake-quantized, fp16) model with save_pretrained (safetensors).
Quantizer: `bits`, per channel, symmetric unless --asym, no MSE search (llama.py's settings).

Stage times use torch.cuda.synchronize around: each add_batch call (Hessian), each Cholesky /
cholesky_inverse call inside fasterquant (factorization; patched in through a proxy of gptq.py's
`torch` name that times those two functions and forwards everything else), each fasterquant call
(the rest of it is the GPTQ loop), the layer passes (forward = pass time minus the Hessian time
inside it), the host<->GPU moves of layers, loading and saving. Peak GPU memory is
torch.cuda.max_memory_allocated (plus max_memory_reserved).

Calibration: --tokens FILE of int32 token ids (`calq tokenize --format bin`), cut into --samples
consecutive windows of --seq-len tokens from the start (what calq's concatenate packing does with a
single-sample dataset such as wikitext2:test).

Usage: gptq_ref_llm.py --gptq-repo DIR --model DIR --tokens ids.bin --out DIR --json stages.json
       [--samples 128] [--seq-len 2048] [--bits 4] [--group 128] [--no-true-sequential] [--no-save]
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn

T = {}  # stage -> seconds
N = {}  # counters


def add(key, dt):
    T[key] = T.get(key, 0.0) + dt


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timed:
    """Wraps fn: synchronizes before and after, adds the time to stage `key`."""

    def __init__(self, fn, key):
        self.fn, self.key = fn, key

    def __call__(self, *a, **kw):
        sync()
        t = time.perf_counter()
        r = self.fn(*a, **kw)
        sync()
        add(self.key, time.perf_counter() - t)
        return r


class LinalgProxy:
    cholesky = Timed(torch.linalg.cholesky, "factorization")

    def __getattr__(self, name):
        return getattr(torch.linalg, name)


class TorchProxy:
    linalg = LinalgProxy()
    cholesky_inverse = Timed(torch.cholesky_inverse, "factorization")

    def __getattr__(self, name):
        return getattr(torch, name)


def find_linears(module, prefix=""):
    return {n: m for n, m in module.named_modules(prefix=prefix) if isinstance(m, nn.Linear)}


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gptq-repo", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", default="")
    ap.add_argument("--json", required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--device", default="cuda:0", help="cpu: a functional test of this driver only")
    ap.add_argument("--dtype", default="float16", help="float32 for --device cpu tests")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    if dev.type == "cpu":  # fasterquant synchronizes and frees GPU memory
        torch.cuda.synchronize = lambda *args, **kw: None
        torch.cuda.empty_cache = lambda *args, **kw: None

    sys.path.insert(0, a.gptq_repo)
    import gptq as ref_gptq  # noqa: E402  (sets allow_tf32 = False, as in the reference)
    import quant as ref_quant  # noqa: E402

    ref_gptq.torch = TorchProxy()  # times the factorization calls inside fasterquant
    orig_add_batch = ref_gptq.GPTQ.add_batch

    def add_batch_timed(self, inp, out):
        sync()
        t = time.perf_counter()
        orig_add_batch(self, inp, out)
        sync()
        add("hessian", time.perf_counter() - t)
        c = self.columns
        rows = inp.numel() // inp.shape[-1]
        N["hessian_flops"] = N.get("hessian_flops", 0) + 2.0 * rows * c * c  # inp.matmul(inp.t()), full square

    ref_gptq.GPTQ.add_batch = add_batch_timed

    ids = np.fromfile(a.tokens, dtype=np.int32)
    need = a.samples * a.seq_len
    if ids.size < need:
        sys.exit(f"{a.tokens}: {ids.size} tokens, fewer than {a.samples} x {a.seq_len}")
    calib = torch.from_numpy(ids[:need].astype(np.int64)).view(a.samples, a.seq_len)

    import transformers
    from transformers import AutoModelForCausalLM

    # As the reference's get_llama: no random init of weights the checkpoint overwrites anyway.
    def skip(*args, **kwargs):
        pass

    torch.nn.init.kaiming_uniform_ = skip
    torch.nn.init.uniform_ = skip
    torch.nn.init.normal_ = skip
    sync()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype)
    model.eval()
    add("load", time.perf_counter() - t)
    cfg = model.config
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {type(model).__name__}, "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, attn {getattr(cfg, '_attn_implementation', '?')}",
          flush=True)

    # --- layer-0 inputs (llama_sequential's Catcher)
    t = time.perf_counter()
    use_cache = cfg.use_cache
    cfg.use_cache = False
    layers = model.model.layers
    model.model.embed_tokens = model.model.embed_tokens.to(dev)
    model.model.norm = model.model.norm.to(dev)
    if hasattr(model.model, "rotary_emb"):
        model.model.rotary_emb = model.model.rotary_emb.to(dev)
    layers[0] = layers[0].to(dev)
    inps = torch.zeros((a.samples, a.seq_len, cfg.hidden_size), dtype=dtype, device=dev)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            # newer transformers pick the mask by the layer's attention type
            self.attention_type = getattr(module, "attention_type", "full_attention")

        def forward(self, inp, *args, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            if cache["kwargs"] is None:
                cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(a.samples):
        try:
            model(calib[j:j + 1].to(dev))
        except ValueError:
            pass
    layers[0] = layers[0].module
    layers[0] = layers[0].cpu()
    model.model.embed_tokens = model.model.embed_tokens.cpu()
    model.model.norm = model.model.norm.cpu()
    torch.cuda.empty_cache()
    sync()
    add("forward", time.perf_counter() - t)
    kw = {k: v for k, v in cache["kwargs"].items()
          if k not in ("past_key_value", "past_key_values", "use_cache", "output_attentions")}
    print("layer kwargs:", {k: (tuple(v.shape) if torch.is_tensor(v) else
                                [tuple(x.shape) for x in v] if isinstance(v, tuple) else v) for k, v in kw.items()},
          flush=True)
    outs = torch.zeros_like(inps)

    def pass_layer(layer):
        for j in range(a.samples):
            outs[j] = first(layer(inps[j].unsqueeze(0), **kw))[0]

    per_layer = []
    for i in range(len(layers)):
        s0 = dict(T)
        sync()
        t = time.perf_counter()
        layer = layers[i].to(dev)
        sync()
        add("transfer", time.perf_counter() - t)
        full = find_linears(layer)
        if a.no_true_sequential:
            sequential = [list(full.keys())]
        else:
            sequential = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                          ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]
        for names in sequential:
            subset = {n: full[n] for n in names}
            g = {}
            for name in subset:
                g[name] = ref_gptq.GPTQ(subset[name])
                g[name].quantizer = ref_quant.Quantizer()
                g[name].quantizer.configure(a.bits, perchannel=True, sym=not a.asym, mse=False)

            def hook(name):
                def tmp(_, inp, out):
                    g[name].add_batch(inp[0].data, out.data)
                return tmp

            handles = [subset[n].register_forward_hook(hook(n)) for n in subset]
            h0 = T.get("hessian", 0.0)
            sync()
            t = time.perf_counter()
            pass_layer(layer)
            sync()
            add("forward", time.perf_counter() - t - (T.get("hessian", 0.0) - h0))
            for h in handles:
                h.remove()
            for name in subset:
                f0 = T.get("factorization", 0.0)
                sync()
                t = time.perf_counter()
                g[name].fasterquant(blocksize=a.blocksize, percdamp=a.percdamp, groupsize=a.group, actorder=False)
                sync()
                add("gptq_loop", time.perf_counter() - t - (T.get("factorization", 0.0) - f0))
                rows, cols = subset[name].weight.shape
                # lazy block updates W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:] (2 flops per multiply-add)
                N["update_flops"] = N.get("update_flops", 0) + sum(
                    2.0 * rows * min(a.blocksize, cols - i1) * (cols - min(i1 + a.blocksize, cols))
                    for i1 in range(0, cols, a.blocksize))
                g[name].free()
        sync()
        t = time.perf_counter()
        pass_layer(layer)
        sync()
        add("forward", time.perf_counter() - t)
        t = time.perf_counter()
        layers[i] = layer.cpu()
        del layer, g
        torch.cuda.empty_cache()
        sync()
        add("transfer", time.perf_counter() - t)
        inps, outs = outs, inps
        per_layer.append({k: T.get(k, 0.0) - s0.get(k, 0.0) for k in T})
        print(f"layer {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in per_layer[-1].items()), flush=True)
    cfg.use_cache = use_cache

    if not a.no_save and a.out:
        t = time.perf_counter()
        model.save_pretrained(a.out, safe_serialization=True)
        add("write", time.perf_counter() - t)

    res = {
        "stages_s": T,
        "per_layer_s": per_layer,
        "hessian_flops": N.get("hessian_flops", 0.0),
        "update_flops": N.get("update_flops", 0.0),
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if dev.type == "cuda" else 0,
        "samples": a.samples, "seq_len": a.seq_len, "layers": len(layers),
        "true_sequential": not a.no_true_sequential, "bits": a.bits, "group": a.group, "sym": not a.asym,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
    }
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "per_layer_s"}), flush=True)


if __name__ == "__main__":
    main()
