"""``mtnlg sft``: supervised fine-tuning of a trained run on conversations (loss on the assistant's replies).

``--data`` is OpenAI-messages JSONL (one ``{"messages": [...]}`` per line); without it the built-in
poem conversations are used. ``--output`` receives an ordinary run directory that ``mtnlg chat``,
``generate``, ``serve`` and ``MegatronLmModel.from_pretrained`` load; ``--output`` equal to the
source run adds the SFT checkpoint to that run. ``--sft.steps=N`` ... override the ``sft`` section.
``--write-data FILE`` writes the built-in conversation set as JSONL and exits.
"""

from __future__ import annotations

import argparse
import sys

from mtnlg.cli import add_config_arguments, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, output=True)
    parser.add_argument("--checkpoint", metavar="PATH", help="a run directory or a checkpoint directory to fine-tune")
    parser.add_argument("--data", metavar="FILE.jsonl", help="conversations (default: the built-in poem conversations)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--write-data", metavar="FILE", help="write the built-in conversations as JSONL and exit")


def run(args: argparse.Namespace) -> int:
    from mtnlg.errors import ConfigError

    cfg = load_config(args)
    if args.data:
        cfg.sft.data = args.data
    if args.write_data:
        from mtnlg.train.sft_data import builtin_conversations, write_conversations

        path = write_conversations(builtin_conversations(cfg.sft), args.write_data)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    if not args.checkpoint or not args.output:
        raise ConfigError("mtnlg sft needs --checkpoint RUN (the trained model) and --output DIR (the fine-tuned run)")
    from mtnlg.device import pick_device
    from mtnlg.train.sft import finetune

    def progress(step: int, loss: float) -> None:
        if step % 10 == 0 or step == cfg.sft.steps:
            print(f"sft step {step}/{cfg.sft.steps} loss {loss:.4f}", file=sys.stderr, flush=True)

    result = finetune(args.checkpoint, args.output, cfg.sft, device=pick_device(args.device, "--device"),
                      on_step=progress)
    print(f"fine-tuned on {result.conversations} conversations in {result.seconds:.0f}s: assistant loss "
          f"{result.loss_before:.4f} -> {result.loss_after:.4f}; checkpoint {result.checkpoint}", file=sys.stderr)
    return 0
