"""``mtnlg tune-prompt``: train a soft prompt on a text file with the model frozen; save it small.

    mtnlg tune-prompt --checkpoint RUN --data pairs.txt --output poem.prompt.safetensors \
        [--num-tokens 8] [--init-text "..."] [--style prefix_suffix --prefix "Q:" --suffix "A:"]
    mtnlg generate --checkpoint RUN --prompt-tuning poem.prompt.safetensors --prompt "..."

``--data``: ``input<TAB>target`` lines, plain lines (target only), or JSONL ``{"input", "target"}``.
Flags left unset take the checkpoint config's ``prompt_tuning_*`` values. ``--quantize`` tunes over
the int8 model (less memory; the prompt is then best used with ``--quantize`` too);
``--prompt-tuning FILE`` continues tuning a saved soft prompt (its style and texts kept).
"""

from __future__ import annotations

import argparse
import math

from mtnlg.errors import ConfigError

DATA_FORMATS = """--data formats (one example a line; blank lines skipped):
  input<TAB>target     the loss is on the target, given the input
  target               a plain line: an empty input
  FILE.jsonl           one JSON object a line: {"input": ..., "target": ...} (or {"text": ...})"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mtnlg.commands.generate import add_model_arguments

    parser.epilog = DATA_FORMATS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="training examples (formats below: TAB-separated pairs, plain lines or JSONL)")
    parser.add_argument("--output", required=True, metavar="FILE", help="where to save the soft prompt (.safetensors)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (>= 1)")
    parser.add_argument("--lr", type=float, default=0.05, help="base lr, > 0 (times prompt_tuning_lr_multiplier)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-tokens", type=int, help="prompt_tuning_num_tokens, >= 1 (default: the "
                        "checkpoint's, else 8)")
    parser.add_argument("--init-text", help="prompt_tuning_init_text")
    parser.add_argument("--style", choices=["prepend", "prefix_suffix"], help="prompt_tuning_prompt_style")
    parser.add_argument("--prefix", help="prefix text (before the input; after the soft tokens with prepend)")
    parser.add_argument("--suffix", help="suffix text (after the input)")
    parser.add_argument("--lr-multiplier", type=float, help="prompt_tuning_lr_multiplier")
    parser.add_argument("--update-every", type=int, help="prompt_tuning_update_every_n_steps")
    parser.add_argument("--no-progress", action="store_true")


def check_arguments(args: argparse.Namespace) -> None:
    """One-line ConfigErrors, naming the option, for values that would crash or silently do nothing."""
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                          ("--num-tokens", args.num_tokens), ("--update-every", args.update_every)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    for option, value in (("--lr", args.lr), ("--lr-multiplier", args.lr_multiplier)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{option} must be a finite number > 0, got {value}")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from mtnlg.api import MegatronLmModel
    from mtnlg.device import pick_device
    from mtnlg.model.prompt_tuning import SoftPrompt, load_soft_prompt, read_examples, tune_prompt

    examples = read_examples(args.data)
    lm = MegatronLmModel.from_pretrained(args.checkpoint, device=pick_device(args.device, "--device"),
                                         quantize=True if args.quantize else None)
    c = lm.config
    c.prompt_tuning = True
    if args.num_tokens is not None:
        c.prompt_tuning_num_tokens = args.num_tokens
    else:
        c.prompt_tuning_num_tokens = c.prompt_tuning_num_tokens or 8
    if args.init_text is not None:
        c.prompt_tuning_init_text = args.init_text
    if args.style:
        c.prompt_tuning_prompt_style = args.style
    if args.prefix is not None or args.suffix is not None:
        args_map = c.prompt_style_args
        keys = ["prefix", "suffix"]
        vals = [args.prefix if args.prefix is not None else str(args_map.get("prefix", "")),
                args.suffix if args.suffix is not None else str(args_map.get("suffix", ""))]
        c.prompt_tuning_prompt_style_args_keys, c.prompt_tuning_prompt_style_args_values = keys, vals
        c.prompt_tuning_prompt_style_args, c.prompt_tuning_prompt_style_args_type = {}, "dict"
    if args.lr_multiplier is not None:
        c.prompt_tuning_lr_multiplier = args.lr_multiplier
    if args.update_every is not None:
        c.prompt_tuning_update_every_n_steps = args.update_every
    c.validate()
    if args.prompt_tuning:  # continue from a saved soft prompt
        soft = load_soft_prompt(lm, args.prompt_tuning)
        if args.num_tokens is not None and args.num_tokens != soft.num_tokens:
            raise ConfigError(f"--num-tokens {args.num_tokens} differs from the {soft.num_tokens} tokens of "
                              f"--prompt-tuning {args.prompt_tuning}; drop --num-tokens to continue tuning it")
    else:
        soft = SoftPrompt.from_config(lm, args.seed).to(lm.model.tok_embeddings.weight.device)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="tune-prompt", unit="step")

    def progress(step: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    _, losses = tune_prompt(lm, examples, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, soft=soft, callback=progress)
    if bar is not None:
        bar.close()
    path = soft.save(args.output)
    k = max(1, len(losses) // 10)
    print(f"loss {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f}; saved {soft.num_tokens} soft tokens "
          f"({path.stat().st_size:,} bytes) to {path}")
    return 0
