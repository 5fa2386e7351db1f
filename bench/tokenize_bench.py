#!/usr/bin/env python3
"""Tokenizer speed: calq (single thread, all threads) vs Hugging Face `tokenizers` (encode on the
whole text, encode_batch over lines with its thread pool), same machine, same text. Also checks
that calq's ids equal `tokenizers`' ids for the whole text.

Usage: bench/tokenize_bench.py CALQ_BIN TEXT... -- NAME=TOKENIZER_PATH...
Prints a markdown table and the machine."""
import os, platform, re, subprocess, sys, tempfile, time

def main():
    args = sys.argv[1:]
    calq = args[0]
    sep = args.index("--")
    texts, toks = args[1:sep], [a.split("=", 1) for a in args[sep + 1:]]
    from tokenizers import Tokenizer
    import tokenizers
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip(); break
    ncpu = os.cpu_count()
    print(f"machine: {cpu}, {ncpu} cores; tokenizers {tokenizers.__version__}; Python {platform.python_version()}")
    print()
    print("| tokenizer | text | tokens | calq 1 thread tok/s | calq all threads tok/s | tokenizers encode tok/s | tokenizers encode_batch tok/s | ids equal |")
    print("|---|---|---|---|---|---|---|---|")
    tmp = tempfile.mkdtemp()
    for name, path in toks:
        tjson = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        try:
            hf = Tokenizer.from_file(tjson)
        except Exception:  # Llama-2's string merges with spaces in tokens: split as calq does
            import json
            j = json.load(open(tjson, encoding="utf-8")); v = j["model"]["vocab"]
            def sp(m):
                if isinstance(m, list) or m.count(" ") == 1:
                    return m if isinstance(m, list) else m.split(" ")
                c = [[m[:i], m[i+1:]] for i in range(1, len(m) - 1) if m[i] == " " and m[:i] in v and m[i+1:] in v and m[:i] + m[i+1:] in v]
                assert len(c) == 1, m
                return c[0]
            j["model"]["merges"] = [sp(m) for m in j["model"]["merges"]]
            hf = Tokenizer.from_str(json.dumps(j))
        hf.no_truncation(); hf.no_padding()
        for tp in texts:
            text = open(tp, encoding="utf-8", errors="replace").read()
            def calq_run(threads):
                best = None
                for _ in range(3):
                    out = os.path.join(tmp, "ids.bin")
                    r = subprocess.run([calq, "--threads", str(threads), "tokenize", "--tokenizer", path, "--input", tp,
                                        "--output", out, "--format", "bin"], capture_output=True, text=True, check=True)
                    m = re.search(r"(\d+) tokens from \d+ bytes in ([\d.]+) s", r.stderr)
                    n, s = int(m.group(1)), float(m.group(2))
                    best = s if best is None else min(best, s)
                return n, best, open(out, "rb").read()
            n1, s1, ids_bin = calq_run(1)
            nn, sn, _ = calq_run(ncpu)
            best = None
            for _ in range(3):
                t = time.perf_counter(); enc = hf.encode(text, add_special_tokens=False); d = time.perf_counter() - t
                best = d if best is None else min(best, d)
            hf_ids = enc.ids
            lines = text.splitlines(keepends=True)
            bb = None
            for _ in range(3):
                t = time.perf_counter(); b = hf.encode_batch(lines, add_special_tokens=False); d = time.perf_counter() - t
                bb = d if bb is None else min(bb, d)
            nb = sum(len(e.ids) for e in b)
            import array
            calq_ids = array.array("i"); calq_ids.frombytes(ids_bin)
            eq = list(calq_ids) == hf_ids
            print(f"| {name} | {os.path.basename(tp)} ({len(text.encode())/1e6:.2f} MB) | {n1} | {n1/s1:,.0f} | {nn/sn:,.0f} | "
                  f"{len(hf_ids)/best:,.0f} | {nb/bb:,.0f} | {'yes' if eq else 'NO (%d vs %d)' % (len(calq_ids), len(hf_ids))} |", flush=True)

if __name__ == "__main__":
    main()
