"""``mtnlg data list`` (built-in corpora) and ``mtnlg data inspect PREFIX`` (a preprocessed token file)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,inspect}")
    p = sub.add_parser("list", help="built-in corpora with their document and character counts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("inspect", help="counts, dtype and vocabulary of PREFIX.bin/.idx; --decode I shows a document")
    p.add_argument("prefix", metavar="PREFIX", help="output prefix given to `mtnlg preprocess`")
    p.add_argument("--decode", type=int, metavar="I", help="print the exact text of document I")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer for --decode (default: PREFIX.tokenizer.json)")
    p.add_argument("--no-verify", action="store_true", help="skip reading the whole .bin (checksum, token range)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    return _list(args) if args.action == "list" else _inspect(args)


def _list(args: argparse.Namespace) -> int:
    from mtnlg.data.corpora import list_corpora

    rows = list_corpora()
    if args.json:
        print(json.dumps({"corpora": [r.__dict__ for r in rows]}, ensure_ascii=False, indent=2))
        return 0
    print(f"{'name':<8} {'documents':>10} {'characters':>12}  description")
    for r in rows:
        if r.available:
            print(f"{r.name:<8} {r.documents:>10,} {r.characters:>12,}  {r.description}")
        else:
            print(f"{r.name:<8} {'-':>10} {'-':>12}  {r.description} [unavailable: {r.error}]")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from mtnlg.data.indexed import IndexedDataset, tokenizer_path
    from mtnlg.data.tokenizer import Tokenizer
    from mtnlg.errors import DataError

    ds = IndexedDataset(args.prefix)
    if not args.no_verify:
        ds.verify()
    info = ds.summary()
    info["verified"] = not args.no_verify
    if len(ds):
        info.update(min_doc_tokens=int(ds.lengths.min()), max_doc_tokens=int(ds.lengths.max()),
                    mean_doc_tokens=round(float(np.mean(ds.lengths)), 2))
    if args.decode is not None:
        if not 0 <= args.decode < len(ds):
            raise DataError(f"--decode {args.decode}: {ds.prefix} has documents 0..{len(ds) - 1}")
        tok = Tokenizer.load(args.tokenizer or tokenizer_path(ds.prefix))
        ids = ds[args.decode]
        if ds.eod_id is not None and ids.size and ids[-1] == ds.eod_id:
            ids = ids[:-1]
        info["document"] = {"index": args.decode, "tokens": int(ids.size), "text": tok.decode(ids.tolist())}
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    labels = [("prefix", info["prefix"]), ("format", f"mtnlg v{info['format_version']}"),
              ("documents", f"{info['documents']:,}"), ("tokens", f"{info['tokens']:,} (EOD after every document)"),
              ("dtype", info["dtype"]), ("vocab size", f"{info['vocab_size']:,}"), ("eod id", str(info["eod_id"])),
              ("checksum", "ok" if info["verified"] else "not checked")]
    if len(ds):
        labels.append(("doc tokens", f"mean {info['mean_doc_tokens']}, min {info['min_doc_tokens']}, "
                                     f"max {info['max_doc_tokens']}"))
    for k, v in labels:
        print(f"{k:<11} {v}")
    if "document" in info:
        doc = info["document"]
        print(f"--- document {doc['index']} ({doc['tokens']} tokens) ---")
        sys.stdout.write(doc["text"])
        if not doc["text"].endswith("\n"):
            sys.stdout.write("\n")
    return 0
