"""Peak memory of loading a trained run with ``quantize=True``: streamed into int8 vs fp32 first.

1. Writes a training run (sharded DCP checkpoint + config.yaml + tokenizer/) of a mid-size model,
   fp32, in a child process.
2. In a fresh child: ``MegatronLmModel.from_pretrained(run, quantize=True)`` (each Linear read alone
   from the checkpoint, quantized and freed) and reports its peak RSS.
3. In a fresh child: the reference, ``from_pretrained(run).quantize()`` (the fp32 model first).

Both loads greedily decode the same 8 tokens (checked equal). The 6B projection scales the
streamed peak by (int8 + embeddings + one fp32 Linear) of the spec's config.

    python benchmarks/quantized_load.py [--hidden 2048 --layers 16 --ffn 8192 --vocab 32000] [--json]

Heavy (a few GB of RAM and disk): a script, not a CI test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _write_run(root: str, dims: dict, q) -> None:
    import torch

    from mtnlg.config import Config
    from mtnlg.data.tokenizer import byte_tokenizer
    from mtnlg.model.init import build_model, materialize
    from mtnlg.checkpoint import save_checkpoint

    cfg = Config()
    for k, v in dims.items():
        setattr(cfg.model, k, v)
    cfg.validate()
    tok_dir = Path(root) / "tok"
    byte_tokenizer().save(tok_dir)
    gpt = materialize(build_model(cfg.model), seed=0)
    opt = torch.optim.SGD(gpt.parameters(), lr=0.0)
    save_checkpoint(Path(root) / "run" / "checkpoints", 1, [gpt], [opt], {"step": 1}, keep=1, config=cfg,
                    tokenizer_dir=tok_dir)
    q.put({"params": sum(p.numel() for p in gpt.parameters()), "peak_gib": _peak_gib()})


def _load(root: str, streamed: bool, q) -> None:
    import torch

    from mtnlg.api import MegatronLmModel
    from mtnlg.model.quantize import quantized_bytes

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    run = Path(root) / "run"
    lm = MegatronLmModel.from_pretrained(run, quantize=True) if streamed else MegatronLmModel.from_pretrained(run).quantize()
    secs = time.perf_counter() - t0
    text = lm.generate("abc", max_new_tokens=8, return_full_text=False, stop_token_ids=[])
    q.put({"peak_gib": _peak_gib(), "load_s": secs, "model_gib": quantized_bytes(lm.model) / 2**30, "text": text})


def _child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def project_6b(streamed_peak: float, model_gib: float) -> float:
    """The spec's 6B streamed peak: its exact int8 model bytes + one fp32 FFN Linear + the overhead
    measured here over the int8 model (interpreter, torch, buffers)."""
    from mtnlg.api import MegatronModelConfig

    c = MegatronModelConfig(quantize=True).to_model_config()
    h, f, L, V = c.hidden_size, c.ffn_hidden_size, c.num_layers, c.padded_vocab_size()
    block_int8 = L * (4 * h * h + 2 * h * f)  # qkv, proj, fc1, fc2: 1 byte each
    block_fp32 = L * (4 * (4 * h + 3 * h + h + f + h) + 4 * (3 * h + h + f + h))  # norms, biases, scales
    emb = V * h * 4 + c.max_seq_len * h * 4 + V * h + V * 4  # fp32 tables + int8 head + its scales
    model = (block_int8 + block_fp32 + emb) / 2**30
    return model + f * h * 4 / 2**30 + max(0.0, streamed_peak - model_gib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dims = dict(hidden_size=args.hidden, num_layers=args.layers, ffn_hidden_size=args.ffn, num_heads=args.heads,
                vocab_size=max(args.vocab, 257), max_seq_len=512)
    root = tempfile.mkdtemp(prefix="mtnlg-qload-")
    try:
        made = _child(_write_run, root, dims)
        streamed = _child(_load, root, True)
        fp32_first = _child(_load, root, False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert streamed["text"] == fp32_first["text"], "streamed and fp32-first loads decode differently"
    result = {"params": made["params"], "fp32_gib": made["params"] * 4 / 2**30,
              "streamed": streamed, "fp32_first": fp32_first,
              "ratio_peak": streamed["peak_gib"] / fp32_first["peak_gib"],
              "projected_6b_streamed_peak_gib": project_6b(streamed["peak_gib"], streamed["model_gib"])}
    print(f"model: {made['params'] / 1e6:.0f}M parameters ({result['fp32_gib']:.2f} GiB in fp32)")
    print(f"{'load':<28}{'peak RSS GiB':>14}{'model GiB':>11}{'seconds':>9}")
    for name, r in (("quantize while loading", streamed), ("fp32 then quantize", fp32_first)):
        print(f"{name:<28}{r['peak_gib']:>14.2f}{r['model_gib']:>11.2f}{r['load_s']:>9.1f}")
    print(f"peak ratio streamed / fp32-first: {result['ratio_peak']:.2f}; projected 6B streamed peak: "
          f"{result['projected_6b_streamed_peak_gib']:.1f} GiB")
    out = Path(__file__).parent / "results" / "quantized_load.json"
    out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
