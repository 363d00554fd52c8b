"""The chat figure: ask "写一首关于…的诗" through the chat template and count replies in poem form.

A reply is in poem form when, ignoring white space, it is nothing but 4 or more lines (an even
number: whole couplets) of all 5 or all 7 Chinese characters, odd lines ending in "，" and even lines
in "。" (or "？" / "！"). The prompts go through :class:`~mtnlg.data.chat_template.ChatTemplate` exactly
as ``mtnlg chat`` and the server send them, and are sampled as ``mtnlg chat`` samples by default
(temperature 0.7, 128 new tokens, stop at ``<|end|>``), one fixed seed per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.poem_text import is_poem_form
from mtnlg.data.tokenizer import END_OF_TURN
from mtnlg.infer.generate import generate
from mtnlg.infer.poem_form import requested_form
from mtnlg.infer.sampling import SamplingParams

TOPICS = ("春天", "秋天", "月亮", "故乡", "离别", "江南", "梅花", "边塞", "朋友", "大海")
PROMPT = "写一首关于{}的诗"


@dataclass
class ChatSample:
    prompt: str
    reply: str
    poem_form: bool


def chat_poem_samples(lm, n: int = 10, temperature: float = 0.7, max_new_tokens: int = 128,
                      seed: int = 0, form: str = "auto") -> list[ChatSample]:
    """Ask ``n`` poem requests (topics of :data:`TOPICS`, cycled) in one batch; the replies and their form.

    ``form="auto"`` decodes as ``mtnlg chat`` does (a request for a poem is answered under the poem
    form, :func:`mtnlg.infer.poem_form.requested_form`); ``"free"`` lets the model write unconstrained."""
    tok = lm.tokenizer
    template = ChatTemplate(tok)
    prompts = [PROMPT.format(TOPICS[i % len(TOPICS)]) for i in range(n)]
    ids = [template.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    end = tok.token_to_id(END_OF_TURN)
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i,
                             stop_token_ids=[tok.eod_id, end], vocab_limit=tok.vocab_size,
                             form=requested_form(prompts[i]) if form == "auto" else None).validate()
              for i in range(n)]
    was = lm.model.training
    lm.model.eval()
    try:
        comps = generate(lm.model, ids, params, tok)
    finally:
        lm.model.train(was)
    return [ChatSample(p, c.text.strip(), is_poem_form(c.text)) for p, c in zip(prompts, comps)]


def chat_poem_form_rate(lm, n: int = 10, **sampling) -> float:
    """Fraction of ``n`` "写一首关于…的诗" chat replies in poem form (the goal is >= 0.8)."""
    samples = chat_poem_samples(lm, n, **sampling)
    return sum(s.poem_form for s in samples) / max(1, len(samples))
