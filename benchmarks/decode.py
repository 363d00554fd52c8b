"""Greedy decoding speed: mtnlg's generator vs Hugging Face ``generate`` on the same weights.

A ~10M-parameter model (hidden 288, 8 layers, vocab 8192: ~21 MFLOP per token) decodes 128 new
tokens greedily at batch 1 and batch 8, in fp32 on CPU. The Hugging Face side is a
``GPT2LMHeadModel`` holding our weights (mtnlg's interop converter: Conv1D-transposed weights, QKV
rows regrouped); the two must produce the same tokens, which the script checks before timing.

    python benchmarks/decode.py [--new-tokens 128] [--threads N] [--json]

Prints a table of tokens/s and ratios; ``--json`` prints one object with ``ratio_b1`` and ``ratio_b8``
(fp32 vs fp32, token-identical). ``--int8`` adds mtnlg with int8 weights (``ratio_b1_int8`` ...).

Model bandwidth utilisation (``mbu_b1``, ``mbu_b1_int8``): the weight bytes one decode step reads
(every layer, the LM head, one embedding row) times tokens/s at batch 1, divided by the read
bandwidth of a buffer of the same size measured in the same run (``torch.sum`` over it, best of 20).
``--compile`` adds mtnlg with ``compile_decode=True`` (the decode step through ``torch.compile`` over a
static KV cache, :mod:`mtnlg.infer.compiled`): ``ratio_b1_compiled``, ``mbu_b1_compiled``, and the
first call's time (``compile_s_b1``, compilation included) apart from the timed runs; with ``--int8`` too,
the int8 model compiled (``mbu_b1_int8_compiled``; its activations enter PyTorch's int8 kernel in bf16,
eager decoding's enter mtnlg's in fp32, so the two agree to bf16 rounding and may pick different tokens at
near-ties).
``--llama-cpp`` adds llama.cpp at batch 1 on the same model exported to GGUF (``ratio_llama_cpp``,
mtnlg tokens/s over llama.cpp's; skipped with the reason when llama-cpp-python is not installed).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.infer.generate import SamplingParams, generate
from mtnlg.interop.hf import gpt2_config, to_gpt2_state_dict


def build(seed: int = 0) -> MegatronLmModel:
    cfg = MegatronModelConfig(vocab_size=8192, hidden_size=288, num_hidden_layers=8, num_attention_heads=8,
                              intermediate_size=1152, max_position_embeddings=512, init_method_std=0.1)
    return MegatronLmModel(cfg).materialize(seed=seed).eval()


def hf_model(m: MegatronLmModel):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = m.config
    conf = {k: v for k, v in gpt2_config(c).items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    conf.update(bos_token_id=0, eos_token_id=None, pad_token_id=0)
    hf = GPT2LMHeadModel(GPT2Config(**conf)).eval()
    state = to_gpt2_state_dict(m.model.state_dict(), c.num_hidden_layers, c.num_attention_heads, c.vocab_size)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf


def bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes a batch-1 decode step reads: everything but the embedding tables, plus the LM head
    (which is the token-embedding table when the head is tied)."""
    from mtnlg.model.quantize import quantized_bytes

    total = quantized_bytes(model)
    emb, pos = model.tok_embeddings.weight, model.pos_embeddings.weight
    total -= emb.numel() * emb.element_size() + pos.numel() * pos.element_size()
    if getattr(model.output, "weight", None) is emb:
        total += emb.numel() * emb.element_size()
    return total


def read_bandwidth(nbytes: int, repeats: int = 20) -> float:
    """Bytes/s at which ``torch.sum`` reads an fp32 buffer of ``nbytes``."""
    buf = torch.rand(nbytes // 4)
    return nbytes / time_it(lambda: buf.sum(), repeats)


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_pair(a, b, repeats: int) -> tuple[float, float]:
    """Best time of each of ``a`` and ``b``, run alternately (a, b, a, b ...) so that a slow spell of
    the machine falls on both sides alike."""
    a(), b()  # warm-up
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for fn, side in ((a, "a"), (b, "b")):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if side == "a":
                best_a = min(best_a, dt)
            else:
                best_b = min(best_b, dt)
    return best_a, best_b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--int8", action="store_true", help="also time mtnlg with int8 weights (quantize=True)")
    ap.add_argument("--compile", action="store_true", help="also time mtnlg with compile_decode=True")
    ap.add_argument("--llama-cpp", action="store_true", help="also decode with llama.cpp at batch 1 "
                    "(llama-cpp-python; benchmarks/llama_cpp_decode.py): ratio_llama_cpp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = build()
    hf = hf_model(m)
    q = None
    if args.int8:
        from mtnlg.model.quantize import quantize_model

        q = quantize_model(build().model).eval()
    n = args.new_tokens
    gen = torch.Generator().manual_seed(1)
    rows = {}
    for B in (1, 8):
        prompt = torch.randint(0, 8192, (B, args.prompt_len), generator=gen)
        params = SamplingParams(max_new_tokens=n)
        ours = lambda: generate(m.model, prompt.tolist(), params)  # noqa: E731

        def theirs():
            with torch.inference_mode():
                return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

        a = [c.token_ids for c in ours()]
        b = theirs()[:, args.prompt_len:].tolist()
        same = sum(x == y for x, y in zip(a, b))
        t_ours, t_hf = time_pair(ours, theirs, args.repeats)
        rows[B] = {"mtnlg_tok_s": B * n / t_ours, "hf_tok_s": B * n / t_hf, "ratio": t_hf / t_ours,
                   "same_tokens_rows": f"{same}/{B}"}
        if q is not None:
            t_q = time_it(lambda: generate(q, prompt.tolist(), params), args.repeats)
            rows[B].update(int8_tok_s=B * n / t_q, ratio_int8=t_hf / t_q)
        if args.compile:
            cparams = SamplingParams(max_new_tokens=n, compile_decode=True)
            t0 = time.perf_counter()
            c = [r.token_ids for r in generate(m.model, prompt.tolist(), cparams)]
            first = time.perf_counter() - t0
            t_c = time_it(lambda: generate(m.model, prompt.tolist(), cparams), args.repeats)
            rows[B].update(compiled_tok_s=B * n / t_c, ratio_compiled=t_hf / t_c, compile_s=first,
                           compiled_same_rows=f"{sum(x == y for x, y in zip(a, c))}/{B}")
            if q is not None and B == 1:
                generate(q, prompt.tolist(), cparams)  # compile
                t_qc = time_it(lambda: generate(q, prompt.tolist(), cparams), args.repeats)
                rows[B].update(int8_compiled_tok_s=B * n / t_qc)
    result = {"model_params": m.num_parameters(), "new_tokens": n, "threads": torch.get_num_threads(),
              "b1": rows[1], "b8": rows[8], "ratio_b1": rows[1]["ratio"], "ratio_b8": rows[8]["ratio"]}
    wb = bytes_per_token(m.model)
    bw = read_bandwidth(wb)
    result.update(weight_bytes=wb, read_gb_s=bw / 1e9, mbu_b1=wb * rows[1]["mtnlg_tok_s"] / bw)
    if q is not None:
        wq = bytes_per_token(q)
        bwq = read_bandwidth(wq)
        result.update(ratio_b1_int8=rows[1]["ratio_int8"], ratio_b8_int8=rows[8]["ratio_int8"], weight_bytes_int8=wq,
                      read_gb_s_int8=bwq / 1e9, mbu_b1_int8=wq * rows[1]["int8_tok_s"] / bwq)
    if args.compile:
        result.update(ratio_b1_compiled=rows[1]["ratio_compiled"], ratio_b8_compiled=rows[8]["ratio_compiled"],
                      mbu_b1_compiled=wb * rows[1]["compiled_tok_s"] / bw, compile_s_b1=rows[1]["compile_s"])
        if q is not None:
            result.update(int8_compiled_tok_s_b1=rows[1]["int8_compiled_tok_s"],
                          mbu_b1_int8_compiled=wq * rows[1]["int8_compiled_tok_s"] / bwq)
    if args.llama_cpp:
        from llama_cpp_decode import describe, side_by_side

        result.update(side_by_side(m, n, args.prompt_len, args.repeats, torch.get_num_threads(),
                                   rows[1]["mtnlg_tok_s"], rows[1].get("int8_tok_s"), time_it))
    if args.json:
        print(json.dumps(result))
        return
    print(f"greedy decode, {n} new tokens, {result['model_params'] / 1e6:.1f}M params, "
          f"{result['threads']} threads, fp32 CPU")
    print(f"{'batch':>5} {'mtnlg tok/s':>12} {'HF tok/s':>10} {'ratio':>7} {'same tokens':>12}")
    for B, r in rows.items():
        print(f"{B:>5} {r['mtnlg_tok_s']:>12.1f} {r['hf_tok_s']:>10.1f} {r['ratio']:>6.2f}x "
              f"{r['same_tokens_rows']:>12}" + (f"   int8: {r['int8_tok_s']:.1f} tok/s, {r['ratio_int8']:.2f}x"
                                                 if "int8_tok_s" in r else "")
              + (f"   compiled: {r['compiled_tok_s']:.1f} tok/s, {r['ratio_compiled']:.2f}x, same tokens "
                 f"{r['compiled_same_rows']}, first call {r['compile_s']:.1f} s" if "compiled_tok_s" in r else ""))
    print(f"mbu_b1 {result['mbu_b1']:.2f} ({wb / 1e6:.1f} MB/token, buffer read {result['read_gb_s']:.1f} GB/s)"
          + (f"   mbu_b1_int8 {result['mbu_b1_int8']:.2f} ({result['weight_bytes_int8'] / 1e6:.1f} MB/token, "
             f"{result['read_gb_s_int8']:.1f} GB/s)" if q is not None else "")
          + (f"   mbu_b1_compiled {result['mbu_b1_compiled']:.2f}" if args.compile else "")
          + (f"   int8 compiled {result['int8_compiled_tok_s_b1']:.1f} tok/s, mbu_b1_int8_compiled "
             f"{result['mbu_b1_int8_compiled']:.2f}" if args.compile and q is not None else ""))
    if args.llama_cpp:
        print(describe(result))


if __name__ == "__main__":
    main()
