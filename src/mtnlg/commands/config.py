"""``mtnlg config``: show the resolved configuration (defaults < YAML < overrides) and the model size."""

from __future__ import annotations

import argparse
import json

import yaml

from mtnlg.cli import add_config_arguments, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")


def run(args: argparse.Namespace) -> int:
    from mtnlg.model.transformer import count_parameters

    cfg = load_config(args)
    data = cfg.to_dict()
    params = count_parameters(cfg.model)
    if args.json:
        print(json.dumps({"config": data, "params": params}, indent=2, ensure_ascii=False))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
        print(f"# model parameters: {params:,}")
    return 0
