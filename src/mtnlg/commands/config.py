"""``mtnlg config``: show the resolved configuration (defaults < YAML < overrides) and the model size."""

from __future__ import annotations

import argparse
import dataclasses
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
    note = ""
    model = cfg.model
    if model.vocab_size is None:  # the run's tokenizer decides: count the rest, say what each token adds
        model = dataclasses.replace(model, vocab_size=0)
        note = f" + {model.hidden_size:,} per vocabulary entry (model.vocab_size comes from the run's tokenizer)"
    params = count_parameters(model)
    if args.json:
        out = {"config": data, "params": params, **({"params_note": note.strip(" +")} if note else {})}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
        print(f"# model parameters: {params:,}{note}")
    return 0
