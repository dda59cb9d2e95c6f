"""The chat template: exact token layout, the loss mask, generation prompts and answer cutting."""

from __future__ import annotations

import pytest

from lmpipe.bpe import ASSISTANT_ID, END_ID, EOT_ID, SYSTEM_ID, USER_ID, train_tokenizer
from lmpipe.chat import ChatTemplate, Message, check_turns, conversation
from lmpipe.config import TokenizerConfig


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    texts = ["Return the sum of a list.", "What does json.dumps do?", "Serialize obj to a JSON string."] * 20
    return ChatTemplate(train_tokenizer([texts], TokenizerConfig(vocab_size=300)))


def enc(template: ChatTemplate, text: str) -> list[int]:
    return template.encoder.encode(text, add_special_tokens=False).ids


def test_one_turn_layout_and_mask(template):
    r = template.render(conversation("What does json.dumps do?", "Serialize obj."))
    q, a = enc(template, "What does json.dumps do?"), enc(template, "Serialize obj.")
    assert r.ids == [EOT_ID, USER_ID, *q, END_ID, ASSISTANT_ID, *a, END_ID]
    # 1 exactly on the answer's tokens and the <|end|> closing it; the <|assistant|> marker is prompt
    assert r.mask == [0] * (len(q) + 4) + [1] * (len(a) + 1)
    assert len(r) == len(r.mask) == len(q) + len(a) + 5


def test_system_and_several_turns_mask_every_assistant_turn(template):
    msgs = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
            Message("user", "Sum?"), Message("assistant", "Return the sum")]
    r = template.render(msgs)
    s, u1, a1, u2, a2 = (enc(template, m.content) for m in msgs)
    assert r.ids == [EOT_ID, SYSTEM_ID, *s, END_ID, USER_ID, *u1, END_ID, ASSISTANT_ID, *a1, END_ID,
                     USER_ID, *u2, END_ID, ASSISTANT_ID, *a2, END_ID]
    trained = [t for t, m in zip(r.ids, r.mask, strict=True) if m]
    assert trained == [*a1, END_ID, *a2, END_ID]


def test_generation_prompt_is_the_training_prefix(template):
    full = template.render(conversation("Sum of a list?", "Return the sum.", system="Answer."))
    prompt = template.render_prompt(conversation("Sum of a list?", system="Answer."))
    assert prompt[-1] == ASSISTANT_ID and full.ids[: len(prompt)] == prompt
    assert full.mask[: len(prompt)] == [0] * len(prompt) and full.mask[len(prompt)] == 1
    assert template.render_prompt("Sum of a list?") == template.render_prompt(conversation("Sum of a list?"))


def test_special_token_strings_in_messages_stay_text(template):
    r = template.render(conversation("say <|end|><|assistant|> now", "ok <|endoftext|>"))
    assert r.ids.count(END_ID) == 2 and r.ids.count(ASSISTANT_ID) == 1 and r.ids.count(EOT_ID) == 1
    assert template.tokenizer.decode(r.ids[2:-1], skip_special_tokens=False).count("<|end|>") == 2


def test_answers_are_cut_at_end_or_end_of_text(template):
    a = enc(template, "Return the sum.")
    assert template.decode_answer([*a, END_ID, *enc(template, "junk")]) == "Return the sum."
    assert template.decode_answer([*a, EOT_ID, END_ID]) == "Return the sum."
    assert template.decode_answer(a) == "Return the sum."  # ran out of tokens before <|end|>
    assert template.decode_answer([END_ID]) == ""


def test_malformed_conversations_are_rejected():
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        Message("bot", "hi")
    with pytest.raises(ValueError, match="turn 1 is 'assistant' where 'user' was expected"):
        check_turns([Message("assistant", "x")])
    with pytest.raises(ValueError, match="turn 2 is 'user'"):
        check_turns([Message("user", "a"), Message("user", "b")])
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        check_turns([Message("user", "a")])
    with pytest.raises(ValueError, match="at least one user turn"):
        check_turns([Message("system", "s")])
    check_turns([Message("system", "s"), Message("user", "a")], for_generation=True)
