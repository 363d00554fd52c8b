"""Quality figures of a trained run, side by side with honest anchors.

::

    the run's corpus (data.corpus, e.g. poems:0.3,zh:0.7), split by documents exactly as training did
        │ train docs                          │ test docs
        ├─► character unigram (add-one) ──────┤
        ├─► character n-gram, interpolated    ├─► bits per character, per corpus and all together
        │   Kneser-Ney (order chosen on valid)│
        └─► (the run's model) ────────────────┘
    20 sampled poem continuations (infer/poem_form.continue_poem) ─► right form, characters from
        the corpus, distinct first lines

Bits per character count the end of each document as one more symbol to predict (the model
predicts its ``<|endoftext|>`` token too) and divide by the document's characters. Every model
uses the same closed alphabet: the characters of the whole corpus (which is what the run's
tokenizer covers), plus the end of a document. The n-gram predicts every character from the n-1
before it, so the model is scored with context too: overlapping windows of ``seq_len`` tokens advancing
by ``seq_len/2``, every target after the first ``seq_len/2`` seeing at least that many tokens (Megatron's
overlapping evaluation; ``mtnlg eval --context``); ``model_disjoint`` is the same model over disjoint
windows, as the training loop scores a split (the first tokens of each window without context).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtnlg.data.datasets import corpus_splits

BOS, EOS = "\x02", "\x03"  # never in the corpora (control characters)


class Unigram:
    """Character unigram with add-one smoothing over a closed alphabet (plus the end of document)."""

    def __init__(self, alphabet: set[str]):
        self.alphabet = set(alphabet) | {EOS}
        self.counts: Counter[str] = Counter()

    def fit(self, docs: Iterable[str]) -> Unigram:
        for d in docs:
            self.counts.update(d)
            self.counts[EOS] += 1
        self.total = sum(self.counts.values()) + len(self.alphabet)
        return self

    def doc_bits(self, doc: str) -> float:
        return -sum(math.log2((self.counts[c] + 1) / self.total) for c in [*doc, EOS])


class KneserNey:
    """Interpolated Kneser-Ney character n-gram (Chen & Goodman 1998, one discount per order).

    ``P_k(w | h) = max(c(hw) - D_k, 0) / c(h·) + D_k N1+(h·) / c(h·) · P_{k-1}(w | h[1:])``, where the
    counts are raw at the highest order and continuation counts (distinct left neighbours) below it,
    ``D_k = n1 / (n1 + 2 n2)``, and ``P_0`` is uniform over the alphabet. An unseen context backs
    off entirely to the next order.
    """

    def __init__(self, order: int, alphabet: set[str]):
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        self.order = order
        self.alphabet_size = len(set(alphabet) | {EOS})
        self.counts: list[dict[str, int]] = [{} for _ in range(order + 1)]  # level k: k-gram -> count
        self.ctx: list[dict[str, tuple[int, int]]] = [{} for _ in range(order + 1)]  # (total, distinct next)
        self.discount = [0.0] * (order + 1)

    def fit(self, docs: Iterable[str]) -> KneserNey:
        n = self.order
        top: Counter[str] = Counter()
        for d in docs:
            s = BOS * (n - 1) + d + EOS
            top.update(s[i - n + 1:i + 1] for i in range(n - 1, len(s)))
        self.counts[n] = dict(top)
        for k in range(n - 1, 0, -1):  # continuation counts: distinct left extensions of each k-gram
            cont: Counter[str] = Counter(g[1:] for g in self.counts[k + 1])
            self.counts[k] = dict(cont)
        for k in range(1, n + 1):
            total: dict[str, int] = defaultdict(int)
            distinct: dict[str, int] = defaultdict(int)
            for g, c in self.counts[k].items():
                total[g[:-1]] += c
                distinct[g[:-1]] += 1
            self.ctx[k] = {h: (total[h], distinct[h]) for h in total}
            values = Counter(self.counts[k].values())
            n1, n2 = values.get(1, 0), values.get(2, 0)
            self.discount[k] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
        return self

    def prob(self, history: str, w: str) -> float:
        p = 1.0 / self.alphabet_size
        for k in range(1, self.order + 1):
            h = history[len(history) - (k - 1):] if k > 1 else ""
            stats = self.ctx[k].get(h)
            if stats is None:
                continue  # unseen context: this order adds nothing, keep the lower-order estimate
            total, distinct = stats
            d = self.discount[k]
            p = max(self.counts[k].get(h + w, 0) - d, 0.0) / total + d * distinct / total * p
        return p

    def doc_bits(self, doc: str) -> float:
        s = BOS * (self.order - 1) + doc + EOS
        n = self.order
        return -sum(math.log2(self.prob(s[i - n + 1:i], s[i])) for i in range(n - 1, len(s)))


def bits_per_char(model, docs: Sequence[str]) -> float:
    """Total bits over ``docs`` (each with its end of document) per character of ``docs``."""
    chars = sum(len(d) for d in docs)
    return sum(model.doc_bits(d) for d in docs) / chars if chars else float("nan")


def fit_anchors(splits: dict[str, dict[str, list[str]]], orders: Sequence[int] = (2, 3, 4, 5)) -> dict[str, Any]:
    """The unigram and the Kneser-Ney n-gram (order with the lowest valid bits per char) on the train docs."""
    alphabet = {c for parts in splits.values() for docs in parts.values() for d in docs for c in d}
    train = [d for p in splits.values() for d in p["train"]]
    valid = [d for p in splits.values() for d in p["valid"]]
    best, best_bpc, tried = None, math.inf, {}
    for n in orders:
        m = KneserNey(n, alphabet).fit(train)
        tried[n] = bits_per_char(m, valid) if valid else float("nan")
        if best is None or tried[n] < best_bpc:
            best, best_bpc = m, tried[n]
    return {"unigram": Unigram(alphabet).fit(train), "ngram": best, "valid_bpc_by_order": tried,
            "alphabet": alphabet}


@dataclass
class PoemFigures:
    """Figures over sampled poem continuations."""

    samples: list[str] = field(default_factory=list)
    right_form: int = 0
    chars_in_corpus: float = 0.0
    distinct_first_lines: int = 0

    def to_dict(self) -> dict[str, Any]:
        n = len(self.samples)
        return {"samples": self.samples, "n": n, "right_form": self.right_form,
                "right_form_fraction": self.right_form / n if n else float("nan"),
                "chars_in_corpus_fraction": self.chars_in_corpus, "distinct_first_lines": self.distinct_first_lines}


def poem_figures(continue_fn: Callable[[int], list[str]], prompt: str, alphabet: set[str], n: int = 20) -> PoemFigures:
    """Sample ``n`` continuations (``continue_fn(seed)`` -> new lines) of ``prompt`` and measure them.

    Right form: the prompt's lines and the new ones parse as one poem of 5- or 7-character lines
    with ， after odd lines and 。 after even ones. A failed continuation counts as wrong form."""
    from mtnlg.errors import MtnlgError
    from mtnlg.infer.poem_form import LINE_RE, parse_poem

    out = PoemFigures()
    chars, known = 0, 0
    firsts = set()
    for seed in range(n):
        try:
            lines = continue_fn(seed)
        except MtnlgError as e:
            out.samples.append(f"<failed: {e}>")
            continue
        text = "".join(lines)
        out.samples.append(text)
        try:
            width, all_lines = parse_poem(prompt + text)
            marks = [m.group(2) for m in LINE_RE.finditer(prompt + text)]
            ok = all(mk == ("，" if i % 2 == 0 else "。") for i, mk in enumerate(marks)) and \
                "".join(m.group(0) for m in LINE_RE.finditer(text)) == text and all(len(x) == width for x in all_lines)
        except MtnlgError:
            ok = False
        out.right_form += ok
        body = [c for c in text if c not in "，。"]
        chars += len(body)
        known += sum(c in alphabet for c in body)
        if lines:
            firsts.add(lines[0])
    out.chars_in_corpus = known / chars if chars else float("nan")
    out.distinct_first_lines = len(firsts)
    return out


def quality_report(run: str | Path, prompt: str = "床前明月光，疑是地上霜。", num_poems: int = 20,
                   orders: Sequence[int] = (2, 3, 4, 5), chat: Callable[[], dict[str, Any]] | None = None,
                   batch_size: int = 8) -> dict[str, Any]:
    """All the figures for run ``run`` (a run directory trained on a built-in corpus), as one dict.

    ``chat`` (optional) returns the chat row, e.g. ``{"poem_form": 8, "n": 10}``; it is reported as is.
    """
    import numpy as np
    import torch

    from mtnlg.api import MegatronLmModel
    from mtnlg.config import Config
    from mtnlg.data.datasets import GPTDataset, corpus_prefix, eval_sequences, split_documents
    from mtnlg.data.indexed import IndexedDataset
    from mtnlg.errors import DataError
    from mtnlg.eval.perplexity import evaluate, token_byte_lengths, token_char_lengths
    from mtnlg.infer.poem_form import continue_poem
    from mtnlg.infer.sampling import SamplingParams

    run = Path(run)
    cfg_file = next((p for p in (run / "config.yaml", run.parent.parent / "config.yaml") if p.is_file()), None)
    cfg = Config.load(cfg_file)
    if cfg.data.paths:
        raise DataError(f"{run} trained on data.paths; the quality figures need a run on a built-in corpus")
    lm = MegatronLmModel.from_pretrained(str(run), device="cpu", dtype=torch.float32)
    tok = lm.tokenizer
    splits = corpus_splits(cfg.data.corpus, cfg.data.split, cfg.data.seed)
    anchors = fit_anchors(splits, orders)
    rows: dict[str, dict[str, float]] = {}
    context = cfg.train.seq_len // 2
    totals = {"model": 0.0, "model_disjoint": 0.0, "model_chars": 0, "ngram": 0.0, "unigram": 0.0, "chars": 0}
    blen, clen = token_byte_lengths(tok), token_char_lengths(tok)
    for name, parts in splits.items():
        indexed = IndexedDataset(corpus_prefix(name, tok))
        if len(indexed) != sum(len(p) for p in parts.values()):
            raise DataError(f"the preprocessed corpus '{name}' has {len(indexed)} documents, the corpus "
                            f"{sum(len(p) for p in parts.values())}; clear the cache ({indexed.idx_path})")
        test_ids = split_documents(len(indexed), cfg.data.split, cfg.data.seed)["test"]
        test = GPTDataset(indexed, np.asarray(test_ids), cfg.train.seq_len, "test")
        # with context, as the n-gram always has its n-1 characters: every target after the first seq_len/2
        # sees at least seq_len/2 tokens (Megatron's overlapping evaluation); beside it, disjoint windows
        res = evaluate(lm.model, eval_sequences(test, context), blen, batch_size=batch_size, char_lengths=clen)
        disjoint = evaluate(lm.model, eval_sequences(test), blen, batch_size=batch_size, char_lengths=clen)
        docs = parts["test"]
        chars = sum(map(len, docs))
        ng, uni = bits_per_char(anchors["ngram"], docs), bits_per_char(anchors["unigram"], docs)
        rows[name] = {"model": res.bits_per_char, "model_disjoint": disjoint.bits_per_char, "ngram": ng,
                      "unigram": uni, "chars": chars, "model_chars": res.chars, "model_loss": res.loss}
        totals["model"] += res.bits_per_char * res.chars
        totals["model_disjoint"] += disjoint.bits_per_char * disjoint.chars
        totals["model_chars"] += res.chars
        totals["ngram"] += ng * chars
        totals["unigram"] += uni * chars
        totals["chars"] += chars
    rows["all"] = {"model": totals["model"] / totals["model_chars"],
                   "model_disjoint": totals["model_disjoint"] / totals["model_chars"],
                   "ngram": totals["ngram"] / totals["chars"], "unigram": totals["unigram"] / totals["chars"],
                   "chars": totals["chars"]}
    for r in rows.values():
        r["gain_vs_ngram"] = 1 - r["model"] / r["ngram"]

    base = SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.1, seed=0)

    def sample(seed: int) -> list[str]:
        import dataclasses

        # seeds far apart: continue_poem seeds line j with seed + j, so neighbouring seeds would share lines
        return continue_poem(lm, prompt, 2, dataclasses.replace(base, seed=1000 * seed))

    poems = poem_figures(sample, prompt, anchors["alphabet"], num_poems)
    if chat is None and (run / "sft.json").is_file():
        chat = lambda: chat_row(lm)  # noqa: E731 - the run ends with the SFT stage: it is meant to chat
    return {"run": str(run), "corpus": cfg.data.corpus, "eval_context": context, "ngram_order": anchors["ngram"].order,
            "ngram_valid_bpc_by_order": anchors["valid_bpc_by_order"], "bits_per_char": rows,
            "prompt": prompt, "poems": poems.to_dict(), "chat": chat() if chat is not None else None}


def chat_row(lm, n: int = 10) -> dict[str, Any]:
    """The chat figure: ``n`` replies to 写一首关于…的诗 sampled as ``mtnlg chat`` samples (a poem request
    is decoded under the poem form), and how many are in poem form; beside it the same requests
    decoded freely (``--form free``), which is what the model writes by itself."""
    from mtnlg.eval.chat_quality import chat_poem_samples

    samples = chat_poem_samples(lm, n)
    free = chat_poem_samples(lm, n, form="free")
    return {"poem_form": sum(s.poem_form for s in samples), "n": len(samples),
            "samples": [f"{s.prompt} -> {s.reply}" for s in samples],
            "poem_form_free": sum(s.poem_form for s in free),
            "samples_free": [f"{s.prompt} -> {s.reply}" for s in free]}


GOALS = {"gain_vs_ngram": 0.10, "right_form_fraction": 1.0, "chars_in_corpus_fraction": 0.98,
         "distinct_first_lines": 18, "chat_poem_form": 8}


def goals_met(report: dict[str, Any]) -> dict[str, bool | None]:
    """Each goal of the quality table: met, missed, or None (not measured)."""
    p = report["poems"]
    chat = report.get("chat")
    return {"bits_per_char >= 10% below the n-gram": report["bits_per_char"]["all"]["gain_vs_ngram"] >= GOALS["gain_vs_ngram"],
            "100% right form": p["right_form_fraction"] >= GOALS["right_form_fraction"],
            ">= 98% characters from the corpus": p["chars_in_corpus_fraction"] >= GOALS["chars_in_corpus_fraction"],
            ">= 18/20 distinct first lines": p["distinct_first_lines"] >= GOALS["distinct_first_lines"] * p["n"] / 20,
            ">= 8/10 chat replies in poem form": None if not chat else chat.get("poem_form", 0) >= GOALS["chat_poem_form"]}
