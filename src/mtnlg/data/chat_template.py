"""The one chat format, used by ``mtnlg chat``, the HTTP server and supervised fine-tuning data.

A conversation is rendered as role tokens around each message, then the assistant's opener::

    <|system|>...<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|user|>...<|end|><|assistant|>

Role markers are special token ids added here; message *content* is always encoded as plain text,
so a user who types ``<|system|>`` gets those characters, never a forged role token.
``encode_conversation`` also returns the mask of assistant tokens (the SFT loss covers those only:
each assistant reply and the ``<|end|>`` that closes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mtnlg.data.tokenizer import END_OF_TURN, ROLE_TOKENS
from mtnlg.errors import ConfigError

ROLES = tuple(ROLE_TOKENS)  # ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def as_messages(raw: Sequence[Mapping[str, object]] | Sequence[Message]) -> list[Message]:
    """Validate OpenAI-style ``{"role", "content"}`` dicts (or ``Message``s); one-line ``ConfigError`` if not."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw:
        raise ConfigError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out: list[Message] = []
    for i, m in enumerate(raw):
        if isinstance(m, Message):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            raise ConfigError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLE_TOKENS:
            raise ConfigError(f"messages[{i}].role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ConfigError(f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}")
            content = "".join(str(p["text"]) for p in content)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ConfigError(f"messages[{i}].content must be a string")
        out.append(Message(role, content))
    return out


class ChatTemplate:
    """Encodes conversations for one tokenizer (which must have the role and ``<|end|>`` tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        ids = {r: tokenizer.token_to_id(t) for r, t in ROLE_TOKENS.items()}
        end = tokenizer.token_to_id(END_OF_TURN)
        missing = [t for r, t in ROLE_TOKENS.items() if ids[r] is None] + ([END_OF_TURN] if end is None else [])
        if missing:
            raise ConfigError(f"the tokenizer lacks the chat tokens {missing}; retrain it with `mtnlg tokenizer train`")
        self.role_ids: dict[str, int] = {r: int(i) for r, i in ids.items()}  # type: ignore[arg-type]
        self.end_id: int = int(end)  # type: ignore[arg-type]

    def encode_text(self, text: str) -> list[int]:
        """Content as plain text: special-token strings inside it are not turned into special ids."""
        hf = self.tok.hf
        old = hf.encode_special_tokens
        hf.encode_special_tokens = True
        try:
            return hf.encode(text, add_special_tokens=False).ids
        finally:
            hf.encode_special_tokens = old

    def encode_message(self, m: Message) -> list[int]:
        return [self.role_ids[m.role], *self.encode_text(m.content), self.end_id]

    def encode_conversation(self, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and, per id, whether it is an assistant token to learn."""
        ids: list[int] = []
        mask: list[bool] = []
        for m in as_messages(messages):
            piece = self.encode_message(m)
            ids += piece
            learn = m.role == "assistant"
            mask += [False] + [learn] * (len(piece) - 1)  # the role marker is given, the reply and <|end|> learned
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(False)
        return ids, mask

    def prompt_ids(self, messages, budget: int | None = None) -> list[int]:
        """The prompt for the next assistant reply. With ``budget``, drop the oldest non-system turns until it
        fits (the system message stays); a :class:`ConfigError` when the last message alone does not fit."""
        msgs = as_messages(messages)
        keep_system = msgs[0].role == "system"
        head = [self.encode_message(msgs[0])] if keep_system else []
        body = [self.encode_message(m) for m in msgs[1 if keep_system else 0:]]
        tail = [self.role_ids["assistant"]]
        if budget is not None:
            while len(body) > 1 and sum(map(len, head)) + sum(map(len, body)) + len(tail) > budget:
                body.pop(0)
        ids = [t for p in head for t in p] + [t for p in body for t in p] + tail
        if budget is not None and len(ids) > budget:
            raise ConfigError(f"the message makes a {len(ids)}-token prompt{' with the system message' if head else ''}"
                              f", more than the {budget} tokens the model's context leaves beside the reply; "
                              f"shorten the message (or lower --max-new-tokens)")
        return ids


class Conversation:
    """A running multi-turn chat (``mtnlg chat``, the web page): its turns and the next prompt."""

    def __init__(self, tokenizer, system: str | None = None):
        self.template = ChatTemplate(tokenizer)
        self.system = system
        self.turns: list[Message] = []

    def reset(self) -> None:
        self.turns.clear()

    def add(self, role: str, content: str) -> None:
        self.turns.append(as_messages([{"role": role, "content": content}])[0])

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + list(self.turns)

    def prompt_ids(self, budget: int) -> list[int]:
        return self.template.prompt_ids(self.messages(), budget)
