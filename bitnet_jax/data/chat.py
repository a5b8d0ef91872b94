"""Chat conversations: the model's chat template, rendering, and the tokens of assistant turns.

`bitnet-jax chat` / `serve` render prompts here (`chat_prompt_ids`), and `chat:` training sources
render their conversations with the same code and template (`chat_training_ids`), so a model is
fine-tuned on exactly the token sequences it is later prompted with.

The template is `chat_template` from a folder's `tokenizer_config.json` (a jinja2 string, as
transformers renders it: sandboxed, `trim_blocks` / `lstrip_blocks`, with `bos_token`,
`eos_token` (the tokenizer's own strings, e.g. '<|begin_of_text|>'), `add_generation_prompt` and
`raise_exception` defined). A conversation is a list of messages `{"role": "system" | "user" |
"assistant", "content": str}` (the OpenAI / Hugging Face chat format).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from bitnet_jax.errors import BitNetError

ROLES = ("system", "user", "assistant")
# What `chat` and `serve` render with when a model has no template (training refuses instead).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def read_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template in `folder/tokenizer_config.json`, else in `folder/chat_template.jinja`
    (where recent transformers versions save it), or None."""
    path = os.path.join(folder, "tokenizer_config.json")
    template = None
    try:
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except OSError:
        pass
    except ValueError as e:
        raise BitNetError(f"{path}: not valid JSON ({e}).") from None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        template = Path(folder, "chat_template.jinja").read_text(encoding="utf-8")
    return template or None


def tokenizer_chat_template(tokenizer) -> str | None:
    """The chat template stored beside a loaded tokenizer's file (a model folder, a run folder,
    which `copy_tokenizer` gives the model's tokenizer_config.json), or None."""
    return read_chat_template(Path(tokenizer.path).parent)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise BitNetError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """The conversation as the template writes it (`PLAIN_TEMPLATE` for None)."""
    import jinja2

    try:
        return _compiled(template or PLAIN_TEMPLATE).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:
        raise BitNetError(f"chat template does not render: {e}") from None


class _Encoder:
    """Text -> ids for rendered chats. The template gets the tokenizer's BOS / EOS strings, and
    those strings in the rendered text become their ids: `encode` of a sentencepiece model would
    spell '<s>' out as characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        token = lambda i: "" if i is None else tokenizer.id_to_token(i)
        self.bos_id = tokenizer.bos_id
        self.bos_token, self.eos_token = token(tokenizer.bos_id), token(tokenizer.eos_id)
        self._specials = {token(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
        # Longest first, so that a special string containing another is matched whole.
        pattern = "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if self._specials else None

    def render(self, template: str | None, messages: list[dict], add_generation_prompt: bool) -> str:
        return render_chat(
            template,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, text: str) -> list[int]:
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # re.split puts the captured special strings at odd indices
                ids.append(self._specials[part])
            elif part:
                ids.extend(self.tokenizer.encode(part))
        return ids


def chat_prompt_ids(template: str | None, messages: list[dict], tokenizer) -> list[int]:
    """Token ids of the rendered conversation, ending with the generation prompt (the assistant's
    header). BOS is prepended where the text does not start with it (the model was trained with
    it there)."""
    enc = _Encoder(tokenizer)
    ids = enc.encode(enc.render(template, messages, add_generation_prompt=True))
    if enc.bos_id is not None and ids[:1] != [enc.bos_id]:
        ids.insert(0, enc.bos_id)
    return ids


def chat_training_ids(template: str, messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(token ids of the whole conversation, loss mask: 1 on the tokens of assistant turns).

    How the assistant tokens are found, for any template: the template renders the conversation
    prefix by prefix. For the assistant message k, `before` = the first k messages with the
    generation prompt (exactly the text `chat` / `serve` prompt the model with to get that reply:
    everything up to and including the assistant header) and `through` = the first k + 1 messages
    without it (the same conversation once the reply, and whatever the template closes the turn
    with, is written). The reply's span of the whole rendering is [len(before), len(through)): the
    content as the template writes it (trimmed, say) and the end of its turn (LLaMA-3's
    `<|eot_id|>`, an `eos_token`), which the model must learn to emit, and never the header, which
    the template writes and the model is given. This needs no knowledge of the template's markup,
    only that rendering a prefix gives a prefix of the rendering (`before` and `through` start the
    whole text); a template that renders earlier turns differently from the last one (dropping
    reasoning, say) breaks that, and is refused rather than guessed at.

    The text is then tokenized piece by piece, cut at the span boundaries (and at the BOS / EOS
    strings): the tokens of a reply are those of the reply encoded on its own, which is what the
    model produces when it writes that reply after the prompt `chat_prompt_ids` gives; no token
    straddles a boundary, so the mask is exact, whatever the tokenizer merges.
    """
    if not template:
        raise BitNetError("the tokenizer has no chat template")
    enc = _Encoder(tokenizer)
    text = enc.render(template, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = enc.render(template, messages[:k], add_generation_prompt=True)
        through = enc.render(template, messages[: k + 1], add_generation_prompt=False)
        previous_end = spans[-1][1] if spans else 0
        if not (through.startswith(before) and text.startswith(through)) or len(before) < previous_end:
            raise BitNetError(
                f"the chat template renders the first {k + 1} messages (up to an assistant reply) differently "
                "from the start of the whole conversation (it must render a prefix of the messages as a "
                "prefix of the text), so the tokens of that reply cannot be told apart. Use a template "
                "that renders every turn the same way wherever it stands, or split such conversations "
                "into one record per assistant reply."
            )
        spans.append((len(before), len(through)))
    ids: list[int] = []
    mask: list[int] = []
    done = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, target in ((text[done:start], 0), (text[start:end], 1)):
            piece_ids = enc.encode(piece)
            ids += piece_ids
            mask += [target] * len(piece_ids)
        done = end
    if enc.bos_id is not None and ids[:1] != [enc.bos_id]:
        ids.insert(0, enc.bos_id)
        mask.insert(0, 0)
    return ids, mask


def check_conversation(record) -> list[dict]:
    """The messages of one chat record `{"messages": [...]}`, checked; errors say what is wrong
    (the caller adds where)."""
    if not isinstance(record, dict):
        raise BitNetError(f'expected a JSON object {{"messages": [...]}}, found a JSON {type(record).__name__}.')
    if "messages" not in record:
        fields = ", ".join(map(repr, record)) or "no fields"
        raise BitNetError(
            f'no field "messages"; this record has {fields}. Expected {{"messages": [{{"role": "user", '
            '"content": "..."}, {"role": "assistant", "content": "..."}]}.'
        )
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise BitNetError(f'"messages" holds {json.dumps(messages)[:60]}; expected a non-empty list of messages.')
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BitNetError(f'message {i} is {json.dumps(m)[:60]}; expected an object with "role" and "content".')
        if m["role"] not in ROLES:
            raise BitNetError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}.")
        if not isinstance(m["content"], str):
            raise BitNetError(
                f"message {i} ({m['role']}) has content of JSON type {type(m['content']).__name__}; "
                "expected a string (text only: join a list of content parts into one string)."
            )
    if not any(m["role"] == "assistant" for m in messages):
        # Refused, not skipped: with no reply there is nothing to learn, and such records are
        # almost always a conversion mistake (every turn mapped to one role, replies dropped)
        # that a skip count would hide.
        raise BitNetError(
            "the conversation has no assistant message, so it holds no tokens to train on. Add the "
            "assistant's reply or remove the record."
        )
    return messages
