"""``mtnlg chat``: a multi-turn conversation in the terminal, replies streamed as they are generated.

The history is formatted by :mod:`mtnlg.data.chat_template`, the template the HTTP server and SFT use::

    <|system|>...<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|user|>...<|end|><|assistant|>

When the history no longer fits the context (``max_position_embeddings`` minus the reply budget)
the oldest turns are dropped (the system message stays). A request for a poem (写一首关于秋天的诗,
来一首七言诗, 再来一首 after a poem) is answered under the poem form (``--form``; see
:class:`mtnlg.infer.poem_form.PoemForm`), the way ``mtnlg poem`` keeps its lines. Commands: ``/reset`` forgets the history,
``/exit`` (or end of input, Ctrl-D) quits. Works in a terminal (line editing via readline) and with
piped standard input.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from mtnlg.data.chat_template import Conversation
from mtnlg.data.tokenizer import END_OF_TURN
from mtnlg.errors import ConfigError
from mtnlg.infer.poem_form import FORMS, form_of_conversation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mtnlg.commands.generate import add_model_arguments, add_sampling_arguments

    add_model_arguments(parser)
    parser.add_argument("--system", help="a system message that stays at the start of the context")
    add_sampling_arguments(parser, temperature=0.7, max_new_tokens=128)
    parser.add_argument("--form", choices=("auto", "free", *FORMS), default="auto",
                        help="auto (default): a request for a poem (写一首关于秋天的诗, 再来一首) is answered in "
                             "regular poem form, anything else freely; free: never constrain; poem / poem5 / "
                             "poem7: every reply is a poem (of any / 5- / 7-character lines)")


def _read(prompt: str, tty: bool) -> str | None:
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    from mtnlg.commands.generate import load_model, sampling_params
    from mtnlg.infer.generate import stream

    lm, rank = load_model(args)
    tok = lm.tokenizer
    end_id = tok.token_to_id(END_OF_TURN)
    params = sampling_params(args, tok, extra_stop_ids=[end_id] if end_id is not None else [])
    params.num_beams = 1
    conv = Conversation(tok, args.system)
    tty = sys.stdin.isatty()
    out = sys.stdout
    # piped: a blank line after each answer, so that a multi-line answer (a poem) is told from the next one
    end = "" if tty else "\n"
    if tty:
        out.write("mtnlg chat: /reset forgets the conversation, /exit quits.\n")
    budget = lm.context_budget(params.max_new_tokens)  # less the soft prompt with --prompt-tuning
    if budget < 8:
        raise ConfigError(f"--max-new-tokens {params.max_new_tokens} leaves no room for the conversation in the "
                          f"model's context of {lm.model.cfg.max_seq_len}; lower it")
    while True:
        line = _read("you> " if tty else "", tty)
        text = (line or "").strip()
        if line is None or text.lower() == "/exit":
            break
        if not text:
            continue
        if text.lower() == "/reset":
            conv.reset()
            out.write("(history cleared)\n" + end)
            out.flush()
            continue
        if re.fullmatch(r"/[A-Za-z?]+", text):  # a command, not a message to the model (a path is text)
            known = "" if text.lower() in ("/help", "/?") else f"unknown command {text}: "
            out.write(f"({known}/reset forgets the conversation, /exit quits)\n" + end)
            out.flush()
            continue
        conv.add("user", text)
        try:
            prompt, soft = lm.with_soft_prompt(conv.prompt_ids(budget))
        except ConfigError as e:  # this message alone does not fit: say so, and forget it
            conv.turns.pop()
            print(f"mtnlg chat: {e}", file=sys.stderr)
            out.write("\n" + end)  # an empty answer: a script reading the pipe stays in step
            out.flush()
            continue
        out.write("bot> " if tty else "")
        form = form_of_conversation(conv.messages()) if args.form == "auto" else args.form
        # --seed: the conversation is reproducible, each reply with a seed of its own (the same seed every turn
        # would draw the same random numbers for every reply, and the replies would echo one another)
        seed = None if params.seed is None else params.seed + sum(m.role == "assistant" for m in conv.turns)
        turn = dataclasses.replace(params, form=None if form == "free" else form, seed=seed)
        s = stream(lm.model, tok, prompt, turn, soft_prompt=soft)
        reply = []
        for delta in s:
            reply.append(delta)
            if rank == 0:
                out.write(delta)
                out.flush()
        out.write("\n" + end)
        out.flush()
        conv.add("assistant", "".join(reply))
    return 0
