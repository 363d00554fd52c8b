"""lm-evaluation-harness: the ``mtnlg`` model's scores, an end-to-end run of the local tasks, plain ``lm_eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtnlg.api import MegatronLmModel, MegatronModelConfig

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ("mtnlg_lambada_poems", "mtnlg_poem_cloze", "mtnlg_poems_rolling", "mtnlg_poem_next_line")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = MegatronModelConfig(vocab_size=262, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("lm") / "model"
    MegatronLmModel(cfg).materialize(seed=5).save_pretrained(d)
    return d


def requests(kind: str, *args: tuple):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def manual_logprob(model: MegatronLmModel, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    x = torch.tensor(ctx + cont)
    with torch.no_grad():
        logp = F.log_softmax(model(x[:-1])[0], dim=-1)[len(ctx) - 1:]
    tgt = torch.tensor(cont)
    return float(logp.gather(-1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


def test_adapter_scores_match_the_model(model_dir):
    from mtnlg.eval.lm_eval_adapter import MtnlgLM

    lm = MtnlgLM(checkpoint=str(model_dir), device="cpu", batch_size=2)
    ref = MegatronLmModel.from_pretrained(model_dir)
    tok = ref.tokenizer
    pairs = [("床前明月", "光"), ("Hello", " world"), ("", "abc"), ("x" * 90, "yz")]  # the last one is truncated
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c = tok.encode(ctx) if ctx else [tok.eod_id]
        whole = (c + tok.encode(cont))[-(64 + 1):]
        n = len(tok.encode(cont))
        want_lp, want_greedy = manual_logprob(ref, whole[:-n], whole[-n:])
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    # rolling log-likelihood of a short text: every token given <|endoftext|> and what precedes it
    text = "疑是地上霜"
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    ids = tok.encode(text)
    assert rolling == pytest.approx(manual_logprob(ref, [tok.eod_id], ids)[0], abs=1e-4)
    # a text longer than the context is split into windows predicting each token exactly once
    (long_lp,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", ("abcdefgh" * 20,)))
    assert long_lp < rolling < 0
    # generation is greedy, stops at `until` and equals the model's own greedy continuation
    # (prompts of different lengths share a left-padded batch)
    prompts = ["床前", "举头望明月，低头"]
    outs = lm.generate_until(requests("generate_until", *[(t, {"until": ["\n"], "max_gen_toks": 8}) for t in prompts]))
    for text, out in zip(prompts, outs):
        full = ref.generate(text, max_new_tokens=8, return_full_text=False)
        assert out == full.split("\n")[0]


def test_lm_eval_end_to_end_on_local_tasks(model_dir):
    """lm-eval's own pipeline (simple_evaluate: tasks, requests, metrics) over all four local tasks."""
    from mtnlg.eval.harness import evaluate_tasks

    out = evaluate_tasks(str(model_dir), list(TASKS), limit=2, batch_size=4, device="cpu", bootstrap_iters=0)
    results = out["results"]
    assert set(TASKS) <= set(results)
    assert 0.0 <= results["mtnlg_poem_cloze"]["acc,none"] <= 1.0
    assert 0.0 <= results["mtnlg_lambada_poems"]["acc,none"] <= 1.0
    assert results["mtnlg_lambada_poems"]["perplexity,none"] > 1.0
    assert results["mtnlg_poems_rolling"]["bits_per_byte,none"] > 0.0
    assert results["mtnlg_poem_next_line"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert out["config"]["model"] == "mtnlg"


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_mtnlg_eval_harness_cli(model_dir, tmp_path):
    """`mtnlg eval --harness ...` = lm-eval's own CLI with the mtnlg model and the shipped tasks."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "mtnlg", "eval", "--checkpoint", str(model_dir), "--harness",
                           "--tasks", "mtnlg_poem_cloze", "--limit", "2", "--device", "cpu", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = list(out.rglob("results_*.json"))
    results = json.loads(result_file.read_text())["results"]
    assert 0.0 <= results["mtnlg_poem_cloze"]["acc,none"] <= 1.0


def test_installed_hook_makes_plain_lm_eval_know_mtnlg(tmp_path):
    """A fresh interpreter whose site dir holds the .pth hook (what `mtnlg eval --install-lm-eval-hook`
    writes into site-packages) resolves `--model mtnlg` exactly as lm_eval's CLI does (get_model), and
    lm-eval's own models stay available; without the hook the name is unknown. The interpreter's own
    site-packages then behaves as the hook's presence there says (setup.sh installs it)."""
    from mtnlg.eval.lm_eval_hook import install_pth

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install_pth(site_dir)
    probe = ("import sys; from lm_eval.api.registry import get_model; "
             "print(get_model('mtnlg').__name__, get_model('dummy').__name__, 'torch' in sys.modules)")
    code = f"import site; site.addsitedir({str(site_dir)!r}); " + probe
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["MtnlgLM", "DummyLM", "True"]
    # This interpreter's own site-packages: `bash setup.sh` installs the hook there, so after set-up plain
    # lm_eval knows mtnlg; where it is not installed, the name is unknown.
    from mtnlg.eval.lm_eval_hook import pth_path

    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=ENV)
    if pth_path().is_file():
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split() == ["MtnlgLM", "DummyLM", "True"]
    else:
        assert proc.returncode != 0 and "mtnlg" in proc.stderr


def test_shipped_task_data_is_the_heldout_split(tmp_path):
    from mtnlg.data.corpora import fortunes_dir
    from mtnlg.eval.poem_tasks import DATA_DIR, build

    if fortunes_dir() is None:
        pytest.skip("fortunes-zh is not installed")
    counts = build(tmp_path)
    assert all(n > 0 for n in counts.values())
    for name in counts:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
    assert Path(DATA_DIR.parent / "mtnlg_poem_cloze.yaml").is_file()
