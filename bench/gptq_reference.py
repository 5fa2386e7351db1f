#!/usr/bin/env python3
"""Runs the original GPTQ code (IST-DASLab/gptq, gptq.py + quant.py) on a random problem and saves
W, H and its result, for bench/gptq_compare_tool to run calq on the same W and H.

The reference is imported from --gptq-repo (a checkout of https://github.com/IST-DASLab/gptq; it is
not part of calq; its `import transformers`, used only for GPT-2's Conv1D, gets a stand-in when
transformers is not installed). One change is patched in at run time: the quantizer's scales are rounded to fp16
right after find_params (and an asymmetric zero point recomputed from that scale), because calq stores fp16 scales (docs/format.md) and picks codes with the
stored scale; everything else is the reference code as published.

Usage: gptq_reference.py --gptq-repo DIR --rows 4096 --cols 4096 --tokens 8192 --out case.npz
       [--bits 4] [--group 128] [--sym] [--act-order] [--static-groups] [--seed 0] [--threads N]
"""
import argparse
import sys
import time
import types

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gptq-repo", required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--cols", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, a.gptq_repo)
    # gptq.py imports transformers only to recognise GPT-2's Conv1D layers; the problem here is an
    # nn.Linear, so a stand-in module (with a Conv1D class nothing is an instance of) is enough.
    if "transformers" not in sys.modules:
        try:
            import transformers  # noqa: F401
        except ImportError:
            stub = types.ModuleType("transformers")
            stub.Conv1D = type("Conv1D", (), {})
            sys.modules["transformers"] = stub
    if not torch.cuda.is_available():  # fasterquant calls these to time itself and free memory
        torch.cuda.synchronize = lambda *args, **kw: None
        torch.cuda.empty_cache = lambda *args, **kw: None
    import gptq as ref_gptq  # noqa: E402
    import quant as ref_quant  # noqa: E402

    orig_find = ref_quant.Quantizer.find_params

    def find_params_fp16(self, x, weight=False):
        orig_find(self, x, weight)
        self.scale = self.scale.half().float()
        if not self.sym and self.maxq > 0:
            # The zero point follows the stored (fp16) scale, as calq computes it.
            xmin = torch.minimum(x.flatten(1).min(1)[0], torch.zeros(x.shape[0]))
            xmax = torch.maximum(x.flatten(1).max(1)[0], torch.zeros(x.shape[0]))
            both0 = (xmin == 0) & (xmax == 0)
            xmin[both0] = -1
            zero = torch.round(-xmin / self.scale.flatten())
            self.zero = zero.reshape(self.zero.shape)

    ref_quant.Quantizer.find_params = find_params_fp16

    g = torch.Generator().manual_seed(a.seed)
    # Correlated inputs with a few strong channels, like LLM activations.
    mix = torch.randn(a.cols, a.cols, generator=g) * 0.3 / a.cols**0.5
    mix += torch.eye(a.cols)
    X = torch.randn(a.tokens, a.cols, generator=g) @ mix
    X[:, :: max(1, a.cols // 32)] *= 8
    W = torch.randn(a.rows, a.cols, generator=g) * 0.02
    H = (X.T.double() @ X.double() / a.tokens)

    layer = torch.nn.Linear(a.cols, a.rows, bias=False)
    layer.weight.data = W.clone()
    gp = ref_gptq.GPTQ(layer)
    gp.H = H.float().clone()  # the reference works on fp32 H
    gp.nsamples = a.tokens
    gp.quantizer = ref_quant.Quantizer()
    gp.quantizer.configure(a.bits, perchannel=True, sym=a.sym, mse=False)
    t0 = time.perf_counter()
    gp.fasterquant(blocksize=128, percdamp=0.01, groupsize=a.group, actorder=a.act_order,
                   static_groups=a.static_groups)
    seconds = time.perf_counter() - t0
    Q = layer.weight.data.float().numpy()
    np.savez(a.out, W=W.numpy(), H=H.numpy(), Q=Q, seconds=np.array(seconds),
             bits=np.array(a.bits), group=np.array(a.group), sym=np.array(int(a.sym)),
             act_order=np.array(int(a.act_order)), static_groups=np.array(int(a.static_groups)),
             threads=np.array(torch.get_num_threads()))
    print(f"reference: {a.rows}x{a.cols} {seconds:.3f} s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
