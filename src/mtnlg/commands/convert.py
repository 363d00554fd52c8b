"""``mtnlg convert``: move models between mtnlg and Hugging Face (GPT-2 architecture).

::

    mtnlg convert --to hf   --checkpoint RUN_OR_DIR --output HF_DIR    # AutoModelForCausalLM loads HF_DIR
    mtnlg convert --from hf --input HF_DIR          --output MODEL_DIR # MegatronLmModel.from_pretrained loads it
    mtnlg convert --to gguf --checkpoint RUN_OR_DIR --output FILE.gguf [--gguf-type f32|f16|q8_0]  # llama.cpp

``--output`` must not exist or be empty: an existing directory is replaced only with ``--force``, and
never when it is (or contains, or lies inside) the input. (``--to gguf``: an existing file, with ``--force``.)
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
    parser.add_argument("--input", metavar="DIR", help="(--from) a Hugging Face model directory (safetensors)")
    parser.add_argument("--output", metavar="DIR", required=True,
                        help="directory to write; it must not exist or be empty (see --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --output directory (never the input itself)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="(--to) weight dtype of the export (default float32)")
    parser.add_argument("--gguf-type", default="f32", choices=("f32", "f16", "q8_0"),
                        help="(--to gguf) tensor type of the matrices (default f32)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    from mtnlg.checkpoint import check_output_dir
    from mtnlg.interop import hf

    if args.to != "gguf":
        check_output_dir(args.output, args.force, inputs=(args.checkpoint if args.to else args.input,))
    if args.to == "gguf":
        from mtnlg.interop import gguf

        if not args.checkpoint:
            raise ConfigError("--to gguf needs --checkpoint PATH (a run dir, checkpoint dir or save_pretrained dir)")
        out = gguf.export_checkpoint(args.checkpoint, args.output, args.gguf_type, force=args.force)
        summary = {"format": "gguf", "direction": "export", "source": args.checkpoint, "output": str(out),
                   "gguf_type": args.gguf_type, "bytes": out.stat().st_size}
    elif args.to:
        if not args.checkpoint:
            raise ConfigError("--to hf needs --checkpoint PATH (a run dir, checkpoint dir or save_pretrained dir)")
        out = hf.export_checkpoint(args.checkpoint, args.output, args.dtype)
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
