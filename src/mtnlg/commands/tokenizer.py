"""``mtnlg tokenizer train``: learn a byte-level BPE (Hugging Face ``tokenizers``) from a corpus or files:
a token for every character of the text first, then merges; sized by the text unless --vocab-size is given."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{train}")
    p = sub.add_parser("train", help="train a byte-level BPE with mtnlg's special and chat-role tokens")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", metavar="NAME", help="built-in corpus (see `mtnlg data list`)")
    src.add_argument("--input", nargs="+", metavar="FILE", help=".txt / .jsonl / .jsonl.gz files or directories")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="tokens, special tokens included (default: every character of the text plus its frequent merges)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write tokenizer.json into")
    p.add_argument("--json-key", default="text", metavar="KEY", help="field holding the text in .jsonl (text)")
    p.add_argument("--separator", metavar="LINE", help=".txt: a line equal to LINE separates documents")
    p.add_argument("--min-frequency", type=int, default=None, metavar="N",
                   help="least count of a merged pair (default: 2 with --vocab-size, else one per 2,000 characters)")


def run(args: argparse.Namespace) -> int:
    from mtnlg.data.preprocess import PreprocessStats, iter_documents
    from mtnlg.data.tokenizer import train_bpe

    t0 = time.perf_counter()
    stats = PreprocessStats(prefix="")
    inputs = [f"corpus:{args.corpus}"] if args.corpus else args.input
    docs = iter_documents(inputs, json_key=args.json_key, separator=args.separator, on_error="skip", stats=stats)
    tok = train_bpe(docs, args.vocab_size, min_frequency=args.min_frequency)
    path = tok.save(args.output)
    note = "" if args.vocab_size in (None, tok.vocab_size) else f" (the corpus supports only {tok.vocab_size})"
    print(f"trained a {tok.vocab_size:,}-token byte-level BPE{note} on {stats.documents:,} documents "
          f"({stats.input_bytes / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s -> {path}")
    if stats.bad_lines:
        print(f"skipped {stats.bad_lines} bad line(s): " + "; ".join(map(str, stats.errors)))
    return 0
