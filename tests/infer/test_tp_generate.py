"""Tensor-parallel inference: 2 gloo ranks under torchrun give the same greedy tokens as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.data.tokenizer import byte_tokenizer


@pytest.mark.slow
def test_tp2_greedy_equals_one_process(tmp_path):
    tok = byte_tokenizer()
    cfg = MegatronModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, init_method_std=0.3)
    lm = MegatronLmModel(cfg, tok).materialize(seed=0)
    path = lm.save_pretrained(tmp_path / "model")
    args = ["-m", "mtnlg", "generate", "--checkpoint", str(path), "--prompt", "床前明月", "--max-new-tokens", "16",
            "--json", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         *args, "--parallel.tp=2"], capture_output=True, text=True, env=env, timeout=300)
    assert tp.returncode == 0, tp.stderr[-2000:]
    lines = [json.loads(line) for line in tp.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    solo = lm.generate("床前明月", max_new_tokens=16, return_full_text=False)
    ids = tok.encode("床前明月")
    from mtnlg.infer.generate import SamplingParams, generate

    ref = generate(lm.model, [ids], SamplingParams(max_new_tokens=16, stop_token_ids=[tok.eod_id],
                                                   vocab_limit=tok.vocab_size), tok)[0].token_ids
    assert lines[0]["token_ids"] == ref and lines[0]["text"] == solo
    bad = subprocess.run([sys.executable, *args, "--parallel.tp=2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and "torchrun" in bad.stderr
