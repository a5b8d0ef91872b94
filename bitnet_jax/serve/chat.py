"""`bitnet-jax chat`: an interactive chat that renders the model's own chat template.

The template is `chat_template` from the model folder's `tokenizer_config.json` (a jinja2
string, as transformers renders it: sandboxed, `trim_blocks` / `lstrip_blocks`, with
`bos_token`, `eos_token` (the tokenizer's own strings, e.g. '<|begin_of_text|>'),
`add_generation_prompt` and `raise_exception` defined). Models without one get a plain
"User: ... / Assistant:" transcript. Generation stops at the model folder's stop ids
(`hf.generation_stop_ids`), the tokenizer's, and `<|eot_id|>` where the vocabulary has it (2B4T
ends chat turns with it).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable

from bitnet_jax.errors import BitNetError

_PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>")


def chat_template(folder: str) -> str | None:
    """The chat template of a model folder (or GGUF file), or None."""
    if str(folder).endswith(".gguf"):  # in the file's metadata
        from bitnet_jax.interop.gguf import gguf_chat_template

        return gguf_chat_template(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    try:
        with open(path) as f:
            template = json.load(f).get("chat_template")
    except OSError:
        return None
    except ValueError as e:
        raise BitNetError(f"{path}: not valid JSON ({e}).") from None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise BitNetError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template or _PLAIN_TEMPLATE)
        return compiled.render(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:
        raise BitNetError(f"chat template does not render: {e}") from None


def chat_prompt_ids(template: str | None, messages: list[dict], tokenizer) -> list[int]:
    """Token ids of the rendered conversation.

    The template gets the tokenizer's BOS / EOS strings, and those strings in the rendered text
    become their ids: `encode` of a sentencepiece model would spell '<s>' out as characters. BOS
    is prepended where the text does not start with it (the model was trained with it there).
    """
    bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    token = lambda i: "" if i is None else tokenizer.id_to_token(i)
    text = render_chat(template, messages, bos_token=token(bos_id), eos_token=token(eos_id))
    specials = {token(i): i for i in (bos_id, eos_id) if i is not None}
    # Longest first, so that a special string containing another is matched whole.
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    parts = re.split(f"({pattern})", text) if specials else [text]
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:  # re.split puts the captured special strings at odd indices
            ids.append(specials[part])
        elif part:
            ids.extend(tokenizer.encode(part))
    if bos_id is not None and ids[:1] != [bos_id]:
        ids.insert(0, bos_id)
    return ids


def stop_ids(tokenizer, config, folder: str | None = None) -> tuple[int, ...]:
    """Ids that end a reply: the model folder's (`hf.generation_stop_ids`; the config's alone
    without a folder), the tokenizer's, and the end-of-turn tokens the vocabulary has."""
    from bitnet_jax.interop.hf import generation_stop_ids

    ids = set(generation_stop_ids(folder, config) if folder else config.eos_ids)
    ids |= set(getattr(tokenizer, "stop_ids", ()) or ())
    for token in _END_OF_TURN:
        encoded = tokenizer.encode(token)
        if len(encoded) == 1:  # a special token of this vocabulary
            ids.add(encoded[0])
    return tuple(sorted(ids))


def chat_loop(
    config,
    params,
    tokenizer,
    folder: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write=sys.stdout,
) -> int:
    """Reads user turns until EOF or an empty line, streaming each reply."""
    import numpy as np

    from bitnet_jax.model.serving_layers import is_packed
    from bitnet_jax.serve.generate import generate
    from bitnet_jax.serve.pack import pack
    from bitnet_jax.serve.streaming import StreamDecoder

    if not is_packed(params) and config.weight_quant in ("tensor", "channel") and config.act_quant == "token":
        params = pack(config, params)  # pack once for the whole chat
    template = chat_template(folder)
    stops = stop_ids(tokenizer, config, folder)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = read("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = chat_prompt_ids(template, messages, tokenizer)
        stream = StreamDecoder(tokenizer)
        reply: list[int] = []

        def on_tokens(tokens_b):
            token = int(np.asarray(tokens_b)[0])
            if token not in stops and (not reply or reply[-1] not in stops):
                reply.append(token)
                write.write(stream.push(token))
                write.flush()
            elif not reply or reply[-1] not in stops:
                reply.append(token)

        try:
            generate(
                config,
                params,
                [ids],
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_ids=stops,
                on_tokens=on_tokens,
            )
        except BitNetError as e:
            write.write(f"[{e}]\n")
            messages.pop()
            continue
        write.write(stream.flush() + "\n")
        write.flush()
        content = tokenizer.decode([t for t in reply if t not in stops])
        messages.append({"role": "assistant", "content": content})
    return 0
