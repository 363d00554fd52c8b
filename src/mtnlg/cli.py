"""``mtnlg <command>``: parse, build the config, call the library. Nothing else lives here.

Commands are listed in :data:`COMMANDS` and imported only when run, so ``mtnlg --help`` is instant.
Every command that takes a config accepts ``--config FILE`` and ``--section.key=value`` (or
``--section.key value``) overrides; every command that writes a run directory accepts ``--output DIR``.
An :class:`~mtnlg.errors.MtnlgError`, an ``OSError`` (a path that is a file, a directory, not writable) or
a distributed-checkpoint failure is printed on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mtnlg.errors import MtnlgError, did_you_mean

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("mtnlg.commands.config", "print the resolved configuration and the model's size"),
    "data": ("mtnlg.commands.data", "list the built-in corpora; inspect a preprocessed PREFIX.bin/.idx"),
    "tokenizer": ("mtnlg.commands.tokenizer", "train a byte-level BPE tokenizer on a corpus or files"),
    "preprocess": ("mtnlg.commands.preprocess", "tokenize .txt/.jsonl(.gz) files or a corpus into PREFIX.bin/.idx"),
    "train": ("mtnlg.commands.train", "train a model (default: a ~1.1M-param model on the built-in Chinese corpora, then SFT, on CPU)"),
    "sft": ("mtnlg.commands.sft", "fine-tune a trained run on conversations (loss on the assistant's replies)"),
    "plot": ("mtnlg.commands.plot", "plot a run's loss and throughput (loss.png, throughput.png)"),
    "plan": ("mtnlg.commands.plan", "memory, FLOPs and time of 3D-parallel layouts; search; schedule timelines"),
    "convert": ("mtnlg.commands.convert", "export to / import from Hugging Face (GPT-2 safetensors); export GGUF for llama.cpp"),
    "eval": ("mtnlg.commands.eval", "held-out loss / perplexity / bits per byte, or lm-evaluation-harness tasks"),
    "serve": ("mtnlg.commands.serve", "serve a model over an OpenAI-compatible HTTP API with a chat page"),
    "generate": ("mtnlg.commands.generate", "continue a prompt, streaming the text (sampling, beams, int8, soft prompts, TP)"),
    "tune-prompt": ("mtnlg.commands.tune_prompt", "train a soft prompt (prompt tuning) on a text file, model frozen"),
    "poem": ("mtnlg.commands.poem", "continue a 5/7-character Chinese poem with lines of the same form"),
    "chat": ("mtnlg.commands.chat", "multi-turn chat in the terminal (history, /reset, /exit), streamed replies"),
}


def add_config_arguments(parser: argparse.ArgumentParser, output: bool = False) -> None:
    """``--config FILE`` (YAML) and, for commands that write a run directory, ``--output DIR``."""
    parser.add_argument("--config", metavar="FILE", help="YAML config; --section.key=value overrides it")
    if output:
        parser.add_argument("--output", metavar="DIR", help="run directory to write")


def load_config(args: argparse.Namespace):
    """The validated :class:`~mtnlg.config.Config` from ``--config`` and the overrides."""
    from mtnlg.config import Config

    return Config.load(getattr(args, "config", None), getattr(args, "overrides", []))


def split_overrides(rest: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--section.key=value`` / ``--section.key value`` overrides from other leftovers."""
    overrides, other = [], []
    i = 0
    while i < len(rest):
        tok = rest[i]
        key = tok[2:].split("=", 1)[0] if tok.startswith("--") else ""
        if "." in key:
            if "=" in tok:
                overrides.append(tok)
            elif i + 1 < len(rest):
                overrides.append(f"{tok}={rest[i + 1]}")
                i += 1
            else:
                other.append(tok)
        else:
            other.append(tok)
        i += 1
    return overrides, other


def check_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Why the ``--section.key=value`` overrides cannot act (None when they can): a command that reads
    no config takes none, and ``model.*`` cannot change the architecture of a model loaded from
    ``--checkpoint``."""
    if not args.overrides:
        return None
    first = args.overrides[0].split("=", 1)[0]
    options = _long_options(parser)
    if "--config" not in options:
        flag = "--" + first[2:].replace(".", "-").replace("_", "-")
        return f"{first}: this command takes no --section.key=value config overrides" + did_you_mean(flag, options)
    fixed = [o.split("=", 1)[0] for o in args.overrides if o.startswith("--model.")]
    if fixed and getattr(args, "checkpoint", None):
        return (f"{fixed[0]}: the model's architecture comes from --checkpoint; model.* overrides apply when "
                f"training (mtnlg train)")
    return None


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` of ``parser`` and of its sub-commands' parsers."""
    out = []
    for action in parser._actions:
        out += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _long_options(sub)
    return out


def _usage() -> str:
    from mtnlg import __version__

    width = max(len(n) for n in COMMANDS)
    lines = [f"mtnlg {__version__}: pre-train, evaluate and serve MT-NLG-style language models",
             "", "usage: mtnlg <command> [options] [--section.key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'mtnlg <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mtnlg import __version__

        print(f"mtnlg {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"mtnlg: unknown command '{name}'{did_you_mean(name, COMMANDS)} (see 'mtnlg --help')", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mtnlg {name}", description=help_[0].upper() + help_[1:] + ".")
    module.add_arguments(parser)
    args, rest = parser.parse_known_args(argv[1:])
    args.overrides, other = split_overrides(rest)
    if other:
        parser.error(f"unrecognized arguments: {' '.join(other)}")
    problem = check_overrides(parser, args)
    if problem:
        print(f"mtnlg {name}: error: {problem}", file=sys.stderr)
        return 2
    level = os.environ.get("MTNLG_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from mtnlg.device import denormals_flushed, reuse_freed_memory

    reuse_freed_memory()
    try:
        with denormals_flushed():  # before any parallel CPU work, so that every intra-op thread inherits it
            return int(module.run(args) or 0)
    except MtnlgError as e:
        print(f"mtnlg {name}: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtnlg {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path that exists as a file, is a directory, is not writable, a full disk ...
        where = f": {e.filename}" if e.filename else ""
        print(f"mtnlg {name}: error: {e.strerror or e}{where}".replace("\n", " "), file=sys.stderr)
        return 2
    except BaseException as e:
        # torch.distributed.checkpoint raises CheckpointException, a BaseException that wraps each
        # rank's error; name its first cause on one line (matched by name: the CLI does not import torch).
        if type(e).__name__ != "CheckpointException":
            raise
        causes = [pair[0] if isinstance(pair, tuple) else pair for pair in getattr(e, "failures", {}).values()]
        cause = causes[0] if causes else e
        text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        print(f"mtnlg {name}: error: checkpoint I/O failed ({type(cause).__name__}: {text})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
