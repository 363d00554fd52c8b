"""Preprocessing throughput: ``mtnlg preprocess`` end to end vs raw ``tokenizers`` ``encode_batch``.

Both sides tokenize the same text with the same tokenizer and the same number of workers:
the reference is ``Tokenizer.encode_batch`` on texts already in memory, with Rayon limited to
``--workers`` threads; mtnlg reads a ``.jsonl`` file, parses it, tokenizes with ``--workers``
processes and writes ``.bin``/``.idx`` (process start-up included). Each side runs in a fresh
process, best of ``--repeat``. The goal is a ratio (mtnlg / raw speed) of at least 0.8.
``cpu_ratio`` compares the CPU seconds spent (workers included), which a busy shared machine
disturbs far less than wall-clock time.

    python benchmarks/preprocess.py [--workers N] [--mb 4] [--corpus zh] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RAW = """
import json, resource, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8")]
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
c, t = cpu(), time.perf_counter()
enc = tok.encode_batch(texts, add_special_tokens=False)
dt, dc = time.perf_counter() - t, cpu() - c
print(json.dumps({"seconds": dt, "cpu_seconds": dc, "tokens": sum(len(e.ids) for e in enc) + len(texts)}))
"""

MTNLG = """
import json, resource, sys, time
from mtnlg.data.preprocess import preprocess
from mtnlg.data.tokenizer import Tokenizer
tok = Tokenizer.load(sys.argv[1])
cpu = lambda: sum(sum(resource.getrusage(w)[:2]) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
c, t = cpu(), time.perf_counter()
st = preprocess([sys.argv[2]], tok, sys.argv[3], workers=int(sys.argv[4]))  # workers are reaped on return
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": cpu() - c, "tokens": st.tokens}))
"""


def _run(code: str, args: list[str], workers: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), RAYON_RS_NUM_CPUS=str(workers), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--mb", type=float, default=4.0, help="megabytes of text to tokenize")
    ap.add_argument("--corpus", default="zh", help="built-in corpus the text (and the tokenizer) come from")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    from mtnlg.data.corpora import load_corpus
    from mtnlg.data.datasets import corpus_tokenizer

    tok = corpus_tokenizer(args.corpus, args.vocab_size)
    docs = load_corpus(args.corpus)
    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-") as tmp:
        tmp = Path(tmp)
        tok.save(tmp / "tok")
        text_bytes, i = 0, 0
        with open(tmp / "in.jsonl", "w", encoding="utf-8") as f:
            while text_bytes < args.mb * 1e6:
                d = docs[i % len(docs)]
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
                text_bytes += len(d.encode())
                i += 1
        tok_file, src = str(tmp / "tok" / "tokenizer.json"), str(tmp / "in.jsonl")
        raw, ours = [], []
        for r in range(args.repeat):  # interleaved, so both sides see the same machine load
            raw.append(_run(RAW, [tok_file, src], args.workers))
            ours.append(_run(MTNLG, [str(tmp / "tok"), src, str(tmp / f"out{r}"), str(args.workers)], args.workers))
    raw_s, our_s = min(x["seconds"] for x in raw), min(x["seconds"] for x in ours)
    raw_cpu, our_cpu = min(x["cpu_seconds"] for x in raw), min(x["cpu_seconds"] for x in ours)
    if raw[0]["tokens"] != ours[0]["tokens"]:
        raise SystemExit(f"token counts differ: raw {raw[0]['tokens']} vs mtnlg {ours[0]['tokens']}")
    result = {
        "workers": args.workers, "corpus": args.corpus, "text_mb": round(text_bytes / 1e6, 3), "documents": i,
        "tokens": ours[0]["tokens"], "raw_seconds": round(raw_s, 4), "mtnlg_seconds": round(our_s, 4),
        "raw_mb_per_s": round(text_bytes / 1e6 / raw_s, 3), "mtnlg_mb_per_s": round(text_bytes / 1e6 / our_s, 3),
        "ratio": round(raw_s / our_s, 3), "goal": 0.8,
        "raw_cpu_seconds": round(raw_cpu, 4), "mtnlg_cpu_seconds": round(our_cpu, 4),
        "cpu_ratio": round(raw_cpu / our_cpu, 3), "load_average": round(os.getloadavg()[0], 2), "repeat": args.repeat, "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['text_mb']} MB of '{args.corpus}' text, {i:,} documents, {result['tokens']:,} tokens, "
          f"{args.workers} worker(s), best of {args.repeat}")
    print(f"{'':<36} {'wall s':>8} {'MB/s':>7} {'CPU s':>7}")
    print(f"{'tokenizers encode_batch (in memory)':<36} {raw_s:>8.3f} {result['raw_mb_per_s']:>7.2f} {raw_cpu:>7.3f}")
    print(f"{'mtnlg preprocess (file to .bin)':<36} {our_s:>8.3f} {result['mtnlg_mb_per_s']:>7.2f} {our_cpu:>7.3f}")
    print(f"ratio mtnlg / raw: {result['ratio']:.2f} wall-clock throughput (goal >= {result['goal']}), "
          f"{result['cpu_ratio']:.2f} in CPU time (robust to a busy machine; load average "
          f"{result['load_average']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
