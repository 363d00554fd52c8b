"""``mtnlg plot RUN``: write ``loss.png`` and ``throughput.png`` from a run's ``metrics.jsonl``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory written by `mtnlg train`")
    parser.add_argument("--output", metavar="DIR", help="where to write the PNGs (default: RUN)")


def run(args: argparse.Namespace) -> int:
    from mtnlg.train.plot import plot_run

    for path in plot_run(args.run, args.output):
        print(path)
    return 0
