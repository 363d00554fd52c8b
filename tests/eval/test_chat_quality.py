"""The chat figure: poem-form detection, and that the prompts go through the chat template as `mtnlg chat` sends them."""

from __future__ import annotations

import pytest

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.data.tokenizer import END_OF_TURN, byte_tokenizer
from mtnlg.eval import chat_quality
from mtnlg.eval.chat_quality import chat_poem_form_rate, chat_poem_samples
from mtnlg.infer.poem_form import is_poem_form
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.infer.generate import Completion


@pytest.mark.parametrize("text, ok", [
    ("空山新雨后，天气晚来秋。\n明月松间照，清泉石上流。", True),
    ("君问归期未有期，巴山夜雨涨秋池。何当共剪西窗烛，却话巴山夜雨时。", True),
    ("  床前明月光，疑是地上霜。\n举头望明月，低头思故乡？\n", True),
    ("空山新雨后，天气晚来秋。", False),  # one couplet is not a poem
    ("空山新雨后，天气晚来秋。\n明月松间照，清泉石上流", False),  # cut off
    ("空山新雨后，天气晚来秋。\n明月松间照，清泉石上流。好", False),  # trailing text
    ("空山新雨后，天气晚来秋。\n明月松间照，清泉石上流水。", False),  # 5 then 6
    ("空山新雨后。天气晚来秋，\n明月松间照，清泉石上流。", False),  # punctuation swapped
    ("空山新雨后，天气晚来秋，明月松间照，清泉石上流。", False),  # "，" closing a couplet
    ("春风春风，吹绿江南。\n春风春风，吹绿江南。", False),  # 4 characters
    ("Hello，world。\nHello，world。", False),
    ("", False),
])
def test_is_poem_form(text, ok):
    assert is_poem_form(text) is ok


def _lm():
    tok = byte_tokenizer()
    cfg = MegatronModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=256)
    return MegatronLmModel(cfg, tok).materialize(seed=0)


def test_prompts_go_through_the_chat_template_and_replies_are_counted(monkeypatch):
    lm = _lm()
    seen = {}
    poem = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"

    def fake_generate(model, prompts, params, tokenizer):
        seen["prompts"], seen["params"] = prompts, params
        return [Completion(prompt_ids=p, text=poem if i % 4 else "不是诗") for i, p in enumerate(prompts)]

    monkeypatch.setattr(chat_quality, "generate", fake_generate)
    samples = chat_poem_samples(lm, n=12)
    template = ChatTemplate(lm.tokenizer)
    assert [s.prompt for s in samples[:2]] == ["写一首关于春天的诗", "写一首关于秋天的诗"]
    assert seen["prompts"][0] == template.prompt_ids([{"role": "user", "content": "写一首关于春天的诗"}])
    assert seen["prompts"][10] == seen["prompts"][0]  # topics cycle past 10
    end = lm.tokenizer.token_to_id(END_OF_TURN)
    assert all(end in p.stop_token_ids and p.temperature == 0.7 for p in seen["params"])
    assert all(p.form == "poem" for p in seen["params"])  # as `mtnlg chat` answers a poem request
    assert len({p.seed for p in seen["params"]}) == 12
    assert [s.poem_form for s in samples] == [i % 4 != 0 for i in range(12)]
    assert chat_poem_form_rate(lm, n=12) == pytest.approx(9 / 12)


def test_a_random_model_writes_no_poems():
    samples = chat_poem_samples(_lm(), n=2, max_new_tokens=16, form="free")
    assert len(samples) == 2 and not any(s.poem_form for s in samples)
