"""The one regular-poem text rule (mtnlg.data.poem_text), shared by the SFT set, chat and the quality figures."""

from mtnlg.data.poem_text import is_poem_form, poem_lines

JUEJU = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


def test_poem_lines_reads_a_poem_prefix_and_cuts_whole_couplets():
    assert poem_lines(JUEJU) == ("床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。")
    assert poem_lines(JUEJU + JUEJU, max_lines=6) == poem_lines(JUEJU) + poem_lines(JUEJU)[:2]
    assert poem_lines(JUEJU + "后记：静夜思。") == poem_lines(JUEJU)  # a tail after the poem is not part of it
    assert poem_lines("床前明月光，疑是地上霜。") is None  # one couplet is not a poem
    assert poem_lines("床前明月光，疑是地上霜。举头望明月，低头思故乡乡。") is None  # 5 then 6 characters


def test_is_poem_form_needs_the_whole_text_to_be_the_poem():
    assert is_poem_form(JUEJU) and is_poem_form(JUEJU.replace("。", "。\n"))
    assert not is_poem_form(JUEJU + "后记")
    assert not is_poem_form("好的：" + JUEJU)
    assert not is_poem_form(JUEJU.replace("霜。", "霜，"))  # a couplet must close with 。？！
