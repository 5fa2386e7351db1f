#!/usr/bin/env python3
# Usage (on a machine with transformers + a GPU): hf_perplexity.py MODEL_DIR wiki.test.raw 512
# Reference perplexity with transformers (fp32, no TF32) using llama.cpp's chunking and the
# overlap-correct sliding window, for calq's cross-check. Written for calq's bench (not copied).
import json, math, sys
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

model_dir, text_file, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
stride = ctx // 2
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
text = open(text_file, encoding="utf-8").read()
ids = tok.encode(text, add_special_tokens=True).ids
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()

def rows_logprobs(inp):
    with torch.no_grad():
        lg = model(torch.tensor([inp], device="cuda")).logits[0].double()
    return torch.log_softmax(lg, dim=-1)

out = {"model": model_dir, "tokens_total": len(ids), "ctx": ctx}
# llama.cpp method: non-overlapping chunks, score positions ctx/2 .. ctx-2 (predicting the next)
n_chunk = len(ids) // ctx
first = ctx // 2
s = s2 = 0.0
n = 0
first_chunk_nll = None
for c in range(n_chunk):
    inp = ids[c * ctx:(c + 1) * ctx]
    lp = rows_logprobs(inp)
    tgt = torch.tensor(inp[first + 1:], device="cuda")
    nll = -lp[first:ctx - 1].gather(1, tgt[:, None])[:, 0]
    s += nll.sum().item(); s2 += (nll * nll).sum().item(); n += nll.numel()
    if c == 0:
        first_chunk_nll = nll.sum().item()
m = s / n
out["llama"] = {"ppl": math.exp(m), "ppl_stderr": math.exp(m) * math.sqrt(max(s2 / n - m * m, 0) / (n - 1)),
                "tokens_scored": n, "chunks": n_chunk, "first_chunk_nll_sum": first_chunk_nll}
# sliding window, stride ctx/2: every token t >= 1 scored once
s = 0.0
n = 0
done = 1
begin = 0
while done < len(ids):
    end = min(begin + ctx, len(ids))
    inp = ids[begin:end]
    lp = rows_logprobs(inp)
    t0 = max(done, begin + 1)
    tgt = torch.tensor(ids[t0:end], device="cuda")
    rows = lp[t0 - 1 - begin:end - 1 - begin]
    s += -rows.gather(1, tgt[:, None]).sum().item(); n += end - t0
    done = end
    if end == len(ids):
        break
    begin += stride
out["stride"] = {"ppl": math.exp(s / n), "tokens_scored": n, "stride": stride}
print(json.dumps(out, indent=1))
