"""The chat template: one rendering of conversations, shared by SFT, the reward model, PPO and generation.

A conversation becomes, on the tokenizer's reserved special tokens (:mod:`lmpipe.bpe`)::

    <|endoftext|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...

The leading ``<|endoftext|>`` is the boundary the pretrained model saw before every document, so a
conversation starts the way a document does. Message texts are encoded with special-token strings read
as plain text: a user who types ``<|end|>`` cannot close a turn. The loss mask is 1 exactly on the
assistant's text tokens and the ``<|end|>`` that closes each assistant turn; the ``<|assistant|>``
marker belongs to the prompt, which is why a prompt rendered for generation ends with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from lmpipe.bpe import ASSISTANT_ID, END_ID, EOT_ID, SYSTEM_ID, USER_ID
from lmpipe.shards import document_encoder

TEMPLATE_NAME = "lmpipe-chat-1"  # stored with chat models, so loaders know to apply this template
ROLES = ("system", "user", "assistant")
ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}
STOP_IDS = frozenset({END_ID, EOT_ID})  # an answer ends at the first of these


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLE_IDS:
            raise ValueError(f"unknown role {self.role!r}; roles: {', '.join(ROLES)}")


@dataclass(frozen=True)
class Rendered:
    """Token ids of a conversation and its loss mask (1 on the assistant's tokens, its ``<|end|>`` included)."""

    ids: list[int]
    mask: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def conversation(prompt: str, response: str | None = None, system: str | None = None,
                 history: Sequence[Message] = ()) -> list[Message]:
    """Messages of a (system, earlier turns, prompt, response) record; without ``response`` it ends on the prompt."""
    messages = [Message("system", system)] if system else []
    messages += [*history, Message("user", prompt)]
    return messages + [Message("assistant", response)] if response is not None else messages


def check_turns(messages: Sequence[Message], for_generation: bool = False) -> None:
    """Raise ValueError unless: optional system first, then user and assistant alternating from a user turn.

    A conversation to train on ends with the assistant; one to generate from ends with the user.
    """
    turns = list(messages[1:] if messages and messages[0].role == "system" else messages)
    if not turns:
        raise ValueError("a conversation needs at least one user turn")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise ValueError(f"turn {i + 1} is {m.role!r} where {expected!r} was expected "
                             "(system first if at all, then user and assistant alternating)")
    last = "user" if for_generation else "assistant"
    if turns[-1].role != last:
        purpose, turn = ("generate from", "a user") if for_generation else ("train on", "an assistant")
        raise ValueError(f"a conversation to {purpose} ends with {turn} turn")


class ChatTemplate:
    """Renders conversations to token ids and masks, and cuts generated answers, for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoder = document_encoder(tokenizer)  # message text never yields special ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.encoder.encode_batch_fast(list(texts), add_special_tokens=False)]

    def render_many(self, conversations: Sequence[Sequence[Message]], for_generation: bool = False
                    ) -> list[Rendered]:
        """Render several conversations, encoding all their texts in one parallel batch."""
        for messages in conversations:
            check_turns(messages, for_generation)
        encoded = iter(self.encode_texts([m.content for messages in conversations for m in messages]))
        out = []
        for messages in conversations:
            ids, mask = [EOT_ID], [0]
            for m in messages:
                text = next(encoded)
                trained = int(m.role == "assistant")
                ids += [ROLE_IDS[m.role], *text, END_ID]
                mask += [0] + [trained] * (len(text) + 1)  # the role marker is prompt; the <|end|> is the speaker's
            if for_generation:
                ids.append(ASSISTANT_ID)
                mask.append(0)
            out.append(Rendered(ids, mask))
        return out

    def render(self, messages: Sequence[Message]) -> Rendered:
        """Ids and loss mask of a conversation that ends with an assistant turn."""
        return self.render_many([messages])[0]

    def render_prompt(self, messages: Sequence[Message] | str) -> list[int]:
        """Ids of a conversation ending with a user turn (or of one user prompt), then ``<|assistant|>``."""
        if isinstance(messages, str):
            messages = conversation(messages)
        return self.render_many([messages], for_generation=True)[0].ids

    def render_prompts(self, prompts: Sequence[Sequence[Message] | str]) -> list[list[int]]:
        """:meth:`render_prompt` for several prompts at once."""
        convs = [conversation(p) if isinstance(p, str) else p for p in prompts]
        return [r.ids for r in self.render_many(convs, for_generation=True)]

    def answer_ids(self, generated: Sequence[int]) -> list[int]:
        """The generated tokens up to (without) the first ``<|end|>`` or ``<|endoftext|>``."""
        for i, token in enumerate(generated):
            if token in STOP_IDS:
                return list(generated[:i])
        return list(generated)

    def decode_answer(self, generated: Sequence[int]) -> str:
        """The answer text of a generated continuation of :meth:`render_prompt`'s ids."""
        return self.tokenizer.decode(self.answer_ids(generated), skip_special_tokens=True).strip()
