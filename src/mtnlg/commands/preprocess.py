"""``mtnlg preprocess``: tokenize text files or a built-in corpus into ``PREFIX.bin`` / ``PREFIX.idx``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="SRC",
                        help=".txt / .jsonl / .jsonl.gz files, directories, or corpus:NAME")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", metavar="KEY", help="field holding the text in .jsonl (text)")
    parser.add_argument("--separator", metavar="LINE",
                        help=".txt: a line equal to LINE separates documents ('' = blank lines); default: one per file")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16), metavar="N",
                        help="worker processes (default: the CPU count, at most 16)")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                        help="bad lines (invalid UTF-8 / JSON): skip and report them, or stop (skip)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _total_bytes(inputs: list[str]) -> int | None:
    from mtnlg.data.preprocess import expand_inputs

    total = 0
    for src in expand_inputs(inputs):
        if src.startswith("corpus:") or src.endswith(".gz"):
            return None  # uncompressed size unknown up front
        total += Path(src).stat().st_size
    return total


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mtnlg.data.preprocess import MAX_REPORTED, preprocess
    from mtnlg.data.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    tqdm.monitor_interval = 0  # no monitor thread: workers can then be forked (fast start-up)
    bar = tqdm(total=_total_bytes(args.input), unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
               disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    with bar:
        stats = preprocess(args.input, tok, args.output, json_key=args.json_key, separator=args.separator,
                           workers=args.workers, on_error=args.on_error, progress=bar.update)
    dtype = "uint16" if tok.vocab_size < 65536 else "uint32"
    print(f"wrote {args.output}.bin/.idx: {stats.documents:,} documents, {stats.tokens:,} {dtype} tokens from "
          f"{stats.input_bytes / 1e6:.2f} MB in {stats.seconds:.1f} s ({stats.mb_per_s:.2f} MB/s, "
          f"{args.workers} worker{'s' if args.workers > 1 else ''})")
    if stats.bad_lines:
        print(f"skipped {stats.bad_lines} bad line(s)" +
              (f"; the first {MAX_REPORTED}:" if stats.bad_lines > MAX_REPORTED else ":"), file=sys.stderr)
        for e in stats.errors:
            print(f"  {e}", file=sys.stderr)
    return 0
