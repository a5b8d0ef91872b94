"""`bitnet-jax chat`: an interactive chat that renders the model's own chat template.

The template is `chat_template` from the model folder's `tokenizer_config.json` (a jinja2
string, as transformers renders it: sandboxed, `trim_blocks` / `lstrip_blocks`, with
`bos_token`, `eos_token`, `add_generation_prompt` and `raise_exception` defined). Models without
one get a plain "User: ... / Assistant:" transcript. Generation stops at the tokenizer's stop
ids plus `<|eot_id|>` where the vocabulary has it (2B4T ends chat turns with it).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from .errors import BitNetError

_PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}Assistant:{% endif %}")
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>")


def chat_template(folder: str) -> str | None:
    """The chat template of a model folder, or None."""
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


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise BitNetError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template or _PLAIN_TEMPLATE)
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise BitNetError(f"chat template does not render: {e}") from None


def stop_ids(tokenizer, config) -> tuple[int, ...]:
    ids = set(config.eos_ids) | set(getattr(tokenizer, "stop_ids", ()) or ())
    for token in _END_OF_TURN:
        encoded = tokenizer.encode(token)
        if len(encoded) == 1:  # a special token of this vocabulary
            ids.add(encoded[0])
    return tuple(sorted(ids))


def chat_loop(config, params, tokenizer, folder: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
              top_p: float | None = None, system: str | None = None,
              read: Callable[[str], str] = input, write=sys.stdout) -> int:
    """Reads user turns until EOF or an empty line, streaming each reply."""
    import numpy as np

    from .generate import generate
    from .pack import is_packed, pack
    from .tokenizer import StreamDecoder

    if not is_packed(params) and config.weight_quant in ("tensor", "channel") and config.act_quant == "token":
        params = pack(config, params)  # pack once for the whole chat
    template = chat_template(folder)
    special = lambda i: tokenizer.decode([i]) if i is not None else ""
    bos, eos = special(getattr(tokenizer, "bos_id", None)), special(getattr(tokenizer, "eos_id", None))
    stops = stop_ids(tokenizer, config)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = read("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        text = render_chat(template, messages, bos_token=bos, eos_token=eos)
        ids = tokenizer.encode(text)
        if template is None or not text.startswith(bos or "\0"):
            ids = ([tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []) + ids
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
            generate(config, params, [ids], max_new_tokens, temperature=temperature, top_p=top_p,
                     stop_ids=stops, on_tokens=on_tokens)
        except BitNetError as e:
            write.write(f"[{e}]\n")
            messages.pop()
            continue
        write.write(stream.flush() + "\n")
        write.flush()
        content = tokenizer.decode([t for t in reply if t not in stops])
        messages.append({"role": "assistant", "content": content})
    return 0
