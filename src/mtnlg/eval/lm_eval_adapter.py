"""lm-evaluation-harness model ``mtnlg``: ``lm_eval --model mtnlg --model_args checkpoint=RUN --tasks ...``.

Importing this module registers the model with ``lm_eval.api.registry``. lm-eval's CLI only knows
models from modules it imports itself, so there are two ways in (see :mod:`mtnlg.eval.harness`):

* ``mtnlg eval --checkpoint RUN --harness --tasks mtnlg_poem_cloze`` imports this module, adds
  ``--include_path`` for mtnlg's local tasks and hands the rest to lm-eval's own CLI;
* plain ``lm_eval --model mtnlg ...`` works once ``mtnlg eval --install-lm-eval-hook`` has put a
  one-line ``.pth`` file into site-packages that registers ``mtnlg`` lazily whenever lm-eval loads
  its model table (nothing heavy is imported until lm-eval asks for the model).

Scoring follows lm-eval's reference ``HFLM``: a continuation's log-likelihood is the sum of the
log-softmax of its tokens given everything before (left-truncated to the context window); rolling
log-likelihoods use lm-eval's disjoint windows, so every token is predicted exactly once.
Generation is greedy unless the task asks for sampling, and stops at the task's ``until`` strings.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: get_model() only loads them into an empty registry)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

log = logging.getLogger(__name__)


@register_model("mtnlg")
class MtnlgLM(TemplateLM):
    """An mtnlg checkpoint (any path :meth:`MegatronLmModel.from_pretrained` accepts) as an lm-eval LM."""

    def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, device: str | None = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, max_length: int | None = None,
                 dtype: str = "auto", **kwargs: Any):
        super().__init__()
        from mtnlg.api import MegatronLmModel
        from mtnlg.device import compute_dtype, pick_device
        from mtnlg.errors import ConfigError

        path = checkpoint or pretrained
        if not path:
            raise ConfigError("lm-eval model 'mtnlg' needs --model_args checkpoint=PATH (a run dir, checkpoint "
                              "dir or save_pretrained dir)")
        if kwargs:
            log.warning("mtnlg lm-eval model ignores unknown model_args %s", sorted(kwargs))
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s requested (lm-eval's default) but CUDA is not available; using CPU", device)
            device = None
        dev = torch.device(device) if device and device != "auto" else pick_device("auto")
        torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                       "bf16": torch.bfloat16}.get(str(dtype)) or compute_dtype(dev, "auto")
        self.lm = MegatronLmModel.from_pretrained(path, device=dev, dtype=torch_dtype)
        self.lm.model.eval()
        self.tokenizer = self.lm.tokenizer
        self._device = dev
        self.vocab = self.lm.config.vocab_size
        limit = self.lm.config.max_position_embeddings
        self._max_length = min(int(max_length), limit) if max_length else limit
        # "auto" (lm-eval's dynamic batch search) falls back on a fixed size: CPU-friendly and predictable
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else (int(max_batch_size or 8))
        self.checkpoint = str(path)

    # -- lm-eval's tokenization interface ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"mtnlg:{self.checkpoint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_name": "mtnlg", "checkpoint": self.checkpoint, "parameters": self.lm.num_parameters()}

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), continuation is the greedy choice)`` for token pairs."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        prepared = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[i] = (0.0, True)
                continue
            whole = (ctx + cont)[-(self.max_length + 1):]
            inp = whole[:-1]
            prepared.append((i, inp, len(cont)))
        prepared.sort(key=lambda t: -len(t[1]))  # similar lengths share a batch
        for s in range(0, len(prepared), self.batch_size):
            chunk = prepared[s:s + self.batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            x = torch.full((len(chunk), width), self.eot_token_id, dtype=torch.long)
            for r, (_, inp, _) in enumerate(chunk):
                x[r, :len(inp)] = torch.tensor(inp)  # right padding: causal attention never sees it
            logp = F.log_softmax(self.lm.model(x.to(self._device))[..., :self.vocab].float(), dim=-1).cpu()
            for r, (i, inp, n) in enumerate(chunk):
                whole = (pairs[i][0] + pairs[i][1])[-(self.max_length + 1):]
                target = torch.tensor(whole[-n:])
                lp = logp[r, len(inp) - n:len(inp)]
                results[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), ans in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (left-truncated to leave room for ``max_gen_toks``) in batches of
        ``batch_size`` through mtnlg's KV-cache engine; the text stops before the first ``until`` string."""
        from mtnlg.infer.generate import SamplingParams, generate

        rows = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_new = max(1, min(int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", 256))), self.max_length - 1))
            do_sample = bool(kw.pop("do_sample", False))
            params = SamplingParams(
                max_new_tokens=max_new, temperature=float(kw.pop("temperature", 0.0) or 0.0) if do_sample else 0.0,
                top_k=int(kw.pop("top_k", 0) or 0), top_p=float(kw.pop("top_p", 1.0) or 1.0), seed=kw.pop("seed", None),
                stop=until, stop_token_ids=[self.eot_token_id], vocab_limit=self.tokenizer.vocab_size)
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - max_new):]
            rows.append((context, gen_kwargs, until, prompt, params))
        out = []
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            comps = generate(self.lm.model, [r[3] for r in chunk], [r[4] for r in chunk], tokenizer=self.tokenizer)
            for (context, gen_kwargs, until, _, _), c in zip(chunk, comps):
                text = c.text
                text = text[:min([text.find(u) for u in until if u in text], default=len(text))]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
        return out
