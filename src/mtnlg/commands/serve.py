"""``mtnlg serve``: an OpenAI-compatible HTTP server (and chat page) for a trained model."""

from __future__ import annotations

import argparse
import os

from mtnlg.cli import add_config_arguments, load_config
from mtnlg.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run directory, a checkpoint directory or a save_pretrained directory")
    parser.add_argument("--host", help="address to listen on (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default serve.port, 8000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and "
                        "the chat page (or env MTNLG_API_KEY)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model")


def run(args: argparse.Namespace) -> int:
    from mtnlg.device import compute_dtype, pick_device
    from mtnlg.infer.httpd import check_address
    from mtnlg.infer.server import serve

    cfg = load_config(args)
    serve_cfg = cfg.serve
    if args.host is not None:
        serve_cfg.host = args.host
    if args.port is not None:
        serve_cfg.port = args.port
    sources = (("--api-key", args.api_key), ("serve.api_key", serve_cfg.api_key),
               ("MTNLG_API_KEY", os.environ.get("MTNLG_API_KEY")))
    name, api_key = next(((n, k) for n, k in sources if k is not None), ("", None))
    if api_key is not None and not api_key.strip():  # e.g. --api-key "$KEY" with KEY unset: not an open server
        raise ConfigError(f"{name} is empty, which would leave the server open to anyone; give a key, or leave "
                          f"{name} out to serve without one")
    serve_cfg.validate()
    # a port in use (or a host not of this machine) is one line now, not after the model has loaded
    check_address(serve_cfg.host, serve_cfg.port)
    device = pick_device(args.device, "--device")
    serve(args.checkpoint, serve_cfg, device, compute_dtype(device), api_key=api_key)
    return 0
