"""llama.cpp side by side for ``benchmarks/decode.py --llama-cpp``.

The benchmark model is exported with ``mtnlg convert``'s GGUF writer (:mod:`mtnlg.interop.gguf`), f32
(and q8_0 when decode.py also times mtnlg's int8 weights), and llama-cpp-python decodes it greedily at
batch 1 with the same thread count and an f32 KV cache (as mtnlg's): prefill of the prompt, then one
token at a time, the same work decode.py times for mtnlg. ``ratio_llama_cpp`` = mtnlg tokens/s /
llama.cpp tokens/s at the same precision (the issue's goal: >= 1); ``ratio_llama_cpp_int8`` compares mtnlg int8 with llama.cpp q8_0.

llama-cpp-python builds llama.cpp from source and is not part of ``setup.sh``; without it the keys are
null and ``llama_cpp_skipped`` says why. The benchmark model uses exact GELU (llama.cpp's GPT-2 graph
uses the tanh approximation), so the tokens are reported (``llama_cpp_f32_same_tokens``), not required equal.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtnlg.infer.generate import SamplingParams, generate
from mtnlg.interop.gguf import export_gguf


def _decode(llm: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy: prefill ``prompt``, then ``n`` tokens one at a time (no KV cache reuse across calls)."""
    llm.reset()
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def side_by_side(m: Any, n: int, prompt_len: int, repeats: int, threads: int, mtnlg_tok_s: float,
                 int8_tok_s: float | None, time_it: Callable[[Callable[[], Any], int], float]) -> dict[str, Any]:
    """Time llama.cpp on ``m`` (a :class:`MegatronLmModel`) at batch 1 with decode.py's ``time_it`` (so both
    sides are timed alike); keys for decode.py's JSON."""
    result: dict[str, Any] = {"ratio_llama_cpp": None, "llama_cpp_skipped": None}
    try:
        import llama_cpp
    except ImportError as e:
        result["llama_cpp_skipped"] = (f"llama-cpp-python is not importable ({e}); it builds llama.cpp from "
                                       "source and is not part of setup.sh")
        return result
    prompt = torch.randint(0, m.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = generate(m.model, [prompt], SamplingParams(max_new_tokens=n))[0].token_ids
    kinds = [("f32", mtnlg_tok_s, "")] + ([("q8_0", int8_tok_s, "_int8")] if int8_tok_s else [])
    with tempfile.TemporaryDirectory() as d:
        for kind, our_tok_s, suffix in kinds:
            path = export_gguf(m, Path(d) / f"bench-{kind}.gguf", kind)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_len + n + 8, n_batch=max(prompt_len, 8),
                                  n_threads=threads, n_threads_batch=threads, verbose=False,
                                  type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache, as mtnlg's
            theirs = _decode(llm, prompt, n)
            tok_s = n / time_it(lambda: _decode(llm, prompt, n), repeats)
            result[f"llama_cpp_{kind}_tok_s"] = tok_s
            result[f"ratio_llama_cpp{suffix}"] = our_tok_s / tok_s
            result[f"llama_cpp_{kind}_same_tokens"] = sum(a == b for a, b in zip(ours, theirs)) if kind == "f32" \
                else None
    result["llama_cpp_version"] = getattr(llama_cpp, "__version__", "?")
    return result


def describe(result: dict[str, Any]) -> str:
    """One line for decode.py's table."""
    if result.get("llama_cpp_skipped"):
        return f"llama.cpp: skipped ({result['llama_cpp_skipped']})"
    line = (f"llama.cpp {result['llama_cpp_version']} b1 f32: {result['llama_cpp_f32_tok_s']:.1f} tok/s, "
            f"mtnlg/llama.cpp = {result['ratio_llama_cpp']:.2f}x")
    if "llama_cpp_q8_0_tok_s" in result:
        line += (f"; q8_0: {result['llama_cpp_q8_0_tok_s']:.1f} tok/s, mtnlg int8/llama.cpp q8_0 = "
                 f"{result['ratio_llama_cpp_int8']:.2f}x")
    return line
