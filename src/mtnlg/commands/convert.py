"""``mtnlg convert``: move models between mtnlg and Hugging Face (GPT-2 architecture); export GGUF.

::

    mtnlg convert --to hf   --checkpoint RUN_OR_DIR --output HF_DIR [--dtype float32|bfloat16|float16]
    mtnlg convert --from hf --input HF_DIR          --output MODEL_DIR # MegatronLmModel.from_pretrained loads it
    mtnlg convert --to gguf --checkpoint RUN_OR_DIR --output FILE.gguf [--gguf-type f32|f16|q8_0]  # llama.cpp

``--to hf`` / ``--from hf``: ``--output`` is a directory that must not exist or be empty: an existing one
is replaced only with ``--force``, and never when it is (or contains, or lies inside) the input.
``--to gguf``: ``--output`` is a file; an existing one is replaced only with ``--force``. An option that
belongs to another direction or format (``--dtype`` with ``--to gguf``, ``--gguf-type`` with hf,
``--input`` with ``--to``, ``--checkpoint`` with ``--from``) is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import json

from mtnlg.errors import ConfigError

FORMATS = ("hf",)
EXPORT_FORMATS = ("hf", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=EXPORT_FORMATS, help="export an mtnlg checkpoint to this format")
    direction.add_argument("--from", dest="from_", choices=FORMATS, help="import a checkpoint from this format")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="(--to) a run dir, a checkpoint dir or a save_pretrained dir")
    parser.add_argument("--input", metavar="DIR", help="(--from hf) a Hugging Face model directory (safetensors)")
    parser.add_argument("--output", metavar="PATH", required=True,
                        help="(--to hf, --from hf) directory to write, which must not exist or be empty; "
                        "(--to gguf) the .gguf file to write, which must not exist (see --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --output directory, or (--to gguf) an existing --output file "
                        "(never the input itself)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="(--to hf only) weight dtype of the export (default float32)")
    parser.add_argument("--gguf-type", choices=("f32", "f16", "q8_0"),
                        help="(--to gguf only) tensor type of the matrices (default f32)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def check_options(args: argparse.Namespace) -> None:
    """A one-line ConfigError for an option that does not apply to the chosen direction and format."""
    mode = f"--to {args.to}" if args.to else f"--from {args.from_}"
    if args.dtype is not None and args.to != "hf":
        fix = "pick the tensor type with --gguf-type f32|f16|q8_0" if args.to == "gguf" else \
            "the import is written in float32; drop --dtype"
        raise ConfigError(f"--dtype goes with --to hf only, not {mode}; {fix}")
    if args.gguf_type is not None and args.to != "gguf":
        fix = "pick the weight dtype with --dtype" if args.to == "hf" else "drop --gguf-type"
        raise ConfigError(f"--gguf-type goes with --to gguf only, not {mode}; {fix}")
    if args.input is not None and args.to:
        raise ConfigError(f"--input goes with --from hf, not {mode}; give the model to export as --checkpoint PATH")
    if args.checkpoint is not None and args.from_:
        raise ConfigError(f"--checkpoint goes with --to, not {mode}; give the Hugging Face directory as --input DIR")


def run(args: argparse.Namespace) -> int:
    from mtnlg.checkpoint import check_output_dir
    from mtnlg.interop import hf

    check_options(args)
    if args.to != "gguf":
        check_output_dir(args.output, args.force, inputs=(args.checkpoint if args.to else args.input,))
    if args.to == "gguf":
        from mtnlg.interop import gguf

        if not args.checkpoint:
            raise ConfigError("--to gguf needs --checkpoint PATH (a run dir, checkpoint dir or save_pretrained dir)")
        out = gguf.export_checkpoint(args.checkpoint, args.output, args.gguf_type or "f32", force=args.force)
        summary = {"format": "gguf", "direction": "export", "source": args.checkpoint, "output": str(out),
                   "gguf_type": args.gguf_type or "f32", "bytes": out.stat().st_size}
    elif args.to:
        if not args.checkpoint:
            raise ConfigError("--to hf needs --checkpoint PATH (a run dir, checkpoint dir or save_pretrained dir)")
        out = hf.export_checkpoint(args.checkpoint, args.output, args.dtype or "float32")
        summary = {"format": "hf", "direction": "export", "source": args.checkpoint, "output": str(out),
                   "files": sorted(p.name for p in out.iterdir())}
    else:
        if not args.input:
            raise ConfigError("--from hf needs --input DIR (a Hugging Face GPT-2 model directory)")
        model = hf.import_hf(args.input, args.output)
        summary = {"format": "hf", "direction": "import", "source": args.input, "output": args.output,
                   "parameters": model.num_parameters()}
    if args.json:
        print(json.dumps(summary))
    else:
        verb = "exported" if args.to else "imported"
        print(f"{verb} {summary['source']} -> {summary['output']}")
    return 0
