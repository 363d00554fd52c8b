"""``mtnlg serve``: an OpenAI-compatible HTTP server (and chat page) for a trained model."""

from __future__ import annotations

import argparse
import os

from mtnlg.cli import add_config_arguments, load_config


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
    api_key = args.api_key or serve_cfg.api_key or os.environ.get("MTNLG_API_KEY") or None
    serve_cfg.validate()
    # a port in use (or a host not of this machine) is one line now, not after the model has loaded
    check_address(serve_cfg.host, serve_cfg.port)
    device = pick_device(args.device, "--device")
    serve(args.checkpoint, serve_cfg, device, compute_dtype(device), api_key=api_key)
    return 0
