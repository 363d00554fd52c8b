"""``mtnlg poem``: continue a classical Chinese poem with lines of the same length and punctuation.

    mtnlg poem --checkpoint RUN "床前明月光，疑是地上霜。"      -> 举头望明月，低头思故乡。

The form and the constrained decoding live in :mod:`mtnlg.infer.poem_form`.
"""

from __future__ import annotations

import argparse
import sys

from mtnlg.errors import ConfigError
from mtnlg.infer.poem_form import MAX_POEM_LINES, continue_poem, parse_poem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mtnlg.commands.generate import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("text", help="the opening lines, e.g. 床前明月光，疑是地上霜。 (a line without its ，or 。 gets "
                        "the one its place calls for)")
    parser.add_argument("--lines", type=int, default=2,
                        help=f"how many new lines, 1 to {MAX_POEM_LINES} (default 2: one couplet)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.1, help="> 1 discourages repeats "
                        "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same lines (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from mtnlg.commands.generate import load_model
    from mtnlg.infer.sampling import SamplingParams

    if not 1 <= args.lines <= MAX_POEM_LINES:
        raise ConfigError(f"--lines must be 1 to {MAX_POEM_LINES}, got {args.lines}; continue the result for more")
    parse_poem(args.text)  # fail fast, before loading the model
    lm, rank = load_model(args)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed).validate()
    lines = continue_poem(lm, args.text, args.lines, params)
    if rank == 0:
        print("".join(lines))
        sys.stdout.flush()
    return 0
