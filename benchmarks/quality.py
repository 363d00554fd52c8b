"""Quality of the default job's model, side by side with a character Kneser-Ney n-gram and a unigram.

    python benchmarks/quality.py [--run runs/poems] [--orders 2 3 4 5] [--poems 20] [--json]

The run is a directory written by ``mtnlg train`` on a built-in corpus (the default job's is
``runs/poems``; train it first with ``mtnlg train --output runs/poems``). Its corpus is split by
documents exactly as training split it; the n-gram and the unigram learn from the same training
split (the n-gram's order is the one with the lowest bits per character on the valid split). Then
20 continuations of 床前明月光，疑是地上霜。 are sampled (the form-constrained decoding of ``mtnlg poem``)
and checked. Goals (issue #15): bits per character at least 10% below the n-gram's, 100% right
form, at least 98% of characters from the corpus, at least 18 of 20 distinct first lines, and (the
chat row, measured when the run ends with the SFT stage) 8 of 10 replies to 写一首关于…的诗 in poem form,
sampled as ``mtnlg chat`` answers them (a poem request is decoded under the poem form); the row also
gives the count decoded freely (``--form free``), what the model writes by itself.
Writes ``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/poems", help="run directory of the default job")
    ap.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4, 5], help="n-gram orders to try on valid")
    ap.add_argument("--poems", type=int, default=20, help="poem continuations to sample")
    ap.add_argument("--prompt", default="床前明月光，疑是地上霜。")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    args = ap.parse_args()

    from mtnlg.eval.quality import goals_met, quality_report

    t0 = time.perf_counter()
    report = quality_report(args.run, prompt=args.prompt, num_poems=args.poems, orders=args.orders)
    report["seconds"] = time.perf_counter() - t0
    report["load_average"] = os.getloadavg()
    report["goals"] = goals_met(report)
    out = ROOT / "benchmarks" / "results" / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    bpc = report["bits_per_char"]
    print(f"run {report['run']} (corpus {report['corpus']}); n-gram order {report['ngram_order']} "
          f"(chosen on valid: {', '.join(f'{k}: {v:.3f}' for k, v in report['ngram_valid_bpc_by_order'].items())})")
    print("\nbits per character  (last column: the model's bits relative to the n-gram's; the goal is <= -10%)")
    print(f"(model: windows of seq_len overlapping by {report['eval_context']} tokens, each character with context "
          f"as the n-gram has; disjoint: the training loop's disjoint windows)")
    print(f"{'test split':<12}{'chars':>8}{'model':>9}{'disjoint':>10}{'KN n-gram':>11}{'unigram':>9}{'vs n-gram':>11}")
    for name, r in bpc.items():
        print(f"{name:<12}{r['chars']:>8}{r['model']:>9.3f}{r['model_disjoint']:>10.3f}{r['ngram']:>11.3f}"
              f"{r['unigram']:>9.3f}{-100 * r['gain_vs_ngram']:>+10.1f}%")
    p = report["poems"]
    print(f"\n{p['n']} continuations of {report['prompt']}: right form {p['right_form']}/{p['n']}, characters from "
          f"the corpus {100 * p['chars_in_corpus_fraction']:.1f}%, distinct first lines {p['distinct_first_lines']}/{p['n']}")
    for s in p["samples"][:5]:
        print(f"  {report['prompt']}{s}")
    chat = report.get("chat")
    if chat:
        print(f"\nchat: {chat['poem_form']}/{chat['n']} replies to 写一首关于…的诗 in poem form as `mtnlg chat` "
              f"answers (poem requests under the poem form); decoded freely (--form free): "
              f"{chat.get('poem_form_free', '?')}/{chat['n']}")
        for s in chat["samples"][:4]:
            print("  " + s.replace("\n", " / "))
        for s in chat.get("samples_free", [])[:2]:
            print("  free: " + s.replace("\n", " / "))
    else:
        print("chat: not measured (the run has no SFT stage: no sft.json)")
    print("\ngoals: " + "; ".join(f"{k}: {'met' if v else ('missed' if v is False else 'n/a')}"
                                  for k, v in report["goals"].items()))
    print(f"({report['seconds']:.0f} s, load average {report['load_average'][0]:.1f}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
