"""``mtnlg eval``: held-out loss, perplexity and bits per byte; or lm-evaluation-harness tasks.

::

    mtnlg eval --checkpoint RUN                      # the run's test split (data config from RUN/config.yaml)
    mtnlg eval --checkpoint RUN --split valid --json
    mtnlg eval --checkpoint DIR --data PREFIX        # every document of a preprocessed PREFIX.{bin,idx}
    mtnlg eval --checkpoint RUN --harness --tasks mtnlg_poems --limit 20   # lm-eval (args passed through)
    mtnlg eval --install-lm-eval-hook                # make plain `lm_eval --model mtnlg` work

Without ``--config`` the data config comes from the run directory (``RUN/config.yaml``, also found
from ``RUN/checkpoints/step_N``), else the defaults; ``--section.key=value`` overrides apply on top.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mtnlg.cli import add_config_arguments
from mtnlg.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", metavar="PATH", help="run dir, checkpoint dir or save_pretrained dir")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=("valid", "test"), default=None, help="held-out split (default: test)")
    source.add_argument("--data", metavar="PREFIX", help="preprocessed token files PREFIX.bin/.idx")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--context", type=int, default=0, metavar="N",
                        help="overlapping evaluation: every target after the first N sees at least N tokens before "
                             "it (windows of seq_len advance by seq_len - N; e.g. seq_len/2, twice the work); "
                             "0 = disjoint windows, as the training loop scores a split")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="evaluate at most this many sequences (>= 1; default: all)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--install-lm-eval-hook", action="store_true",
                        help="write a .pth hook into site-packages so plain `lm_eval --model mtnlg` works")
    parser.add_argument("--uninstall-lm-eval-hook", action="store_true", help="remove that hook")
    parser.add_argument("--harness", nargs=argparse.REMAINDER, default=None, metavar="LM_EVAL_ARGS",
                        help="run lm-evaluation-harness with the remaining arguments (mtnlg tasks included)")


def find_run_config(checkpoint) -> Path | None:
    """``config.yaml`` of the run a checkpoint belongs to (RUN/, RUN/checkpoints/step_N/), if any; the
    path (or an already resolved one) is interpreted by :func:`mtnlg.checkpoint.resolve_checkpoint`."""
    from mtnlg.checkpoint import resolve_checkpoint

    return resolve_checkpoint(checkpoint).find("config.yaml")


def run(args: argparse.Namespace) -> int:
    if args.install_lm_eval_hook or args.uninstall_lm_eval_hook:
        from mtnlg.eval import lm_eval_hook

        if args.install_lm_eval_hook:
            print(f"installed {lm_eval_hook.install_pth()}: `lm_eval --model mtnlg` now works")
        else:
            removed = lm_eval_hook.uninstall_pth()
            print(f"{'removed' if removed else 'no hook at'} {lm_eval_hook.pth_path()}")
        return 0
    if args.harness is not None:
        from mtnlg.eval.harness import run_harness

        return run_harness(args.harness, args.checkpoint)
    if not args.checkpoint:
        raise ConfigError("mtnlg eval needs --checkpoint PATH (a run dir, checkpoint dir or save_pretrained dir)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max-samples must be >= 1, got {args.max_samples} (leave it out to evaluate the whole "
                          "split)")
    return _perplexity(args)


def _perplexity(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from mtnlg.api import MegatronLmModel
    from mtnlg.checkpoint import resolve_checkpoint
    from mtnlg.config import Config
    from mtnlg.device import pick_device
    from mtnlg.eval.perplexity import eval_pieces, evaluate, prefix_dataset, token_byte_lengths, token_char_lengths

    resolved = resolve_checkpoint(args.checkpoint)  # once: the same directory for the config and the weights
    config_path = args.config or find_run_config(resolved)
    cfg = Config.load(config_path, args.overrides)
    device = pick_device(args.device, "--device")
    model = MegatronLmModel.from_pretrained(resolved, device=device, dtype=torch.float32)
    tok = model.tokenizer
    seq_len = min(cfg.train.seq_len, model.config.max_position_embeddings)
    if args.data:
        dataset, source = prefix_dataset(args.data, tok, seq_len), {"data": args.data}
    else:
        from mtnlg.data.datasets import build_datasets

        cfg.train.seq_len = seq_len
        split = args.split or "test"
        dataset, source = build_datasets(cfg, tok)[split], {"split": split}
    if not 0 <= args.context < seq_len:
        raise ConfigError(f"--context must be in [0, {seq_len}) (the evaluation's seq_len), got {args.context}; "
                          f"e.g. {seq_len // 2}")
    pieces = eval_pieces(dataset, args.context)  # every target token once (context 0: as the training loop does)
    if args.max_samples is not None:
        pieces = pieces[:args.max_samples]
    with tqdm(total=len(pieces), desc="eval", unit="seq", disable=args.json, leave=False) as bar:
        result = evaluate(model.model, pieces, token_byte_lengths(tok), batch_size=args.batch_size,
                          progress=lambda done: bar.update(done - bar.n), char_lengths=token_char_lengths(tok))
    out = {"checkpoint": args.checkpoint, **source, "seq_len": seq_len, "context": args.context, **result.to_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        where = f"split {source['split']}" if "split" in source else f"data {source['data']}"
        print(f"{where}: loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  bits/byte "
              f"{result.bits_per_byte:.4f}  bits/char {result.bits_per_char:.4f}  ({result.tokens:,} tokens, "
              f"{result.samples} sequences of <= {seq_len + 1}{f', {args.context} of context' if args.context else ''})")
    return 0
