"""`bitnet-jax chat`: an interactive chat that renders the model's own chat template.

The template and its rendering are `data/chat.py`'s (`chat:` training sources render with the
same code); models without one get a plain "User: ... / Assistant:" transcript. Generation stops
at the model folder's stop ids (`hf.generation_stop_ids`), the tokenizer's, and `<|eot_id|>`
where the vocabulary has it (2B4T ends chat turns with it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bitnet_jax.data.chat import chat_prompt_ids, read_chat_template, render_chat
from bitnet_jax.errors import BitNetError

__all__ = ["chat_loop", "chat_prompt_ids", "chat_template", "render_chat", "stop_ids"]

_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>")


def chat_template(folder: str) -> str | None:
    """The chat template of a model folder (or GGUF file), or None."""
    if str(folder).endswith(".gguf"):  # in the file's metadata
        from bitnet_jax.interop.gguf import gguf_chat_template

        return gguf_chat_template(folder)
    return read_chat_template(folder)


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
    in_child: bool = False,
) -> int:
    """Reads user turns until EOF or an empty line, streaming each reply. `in_child`: compile each
    prompt-length bucket's program in a child process (`generate.generate`'s `in_child`), so that the
    chat process never holds the compiler; with a compilation cache folder, a later chat loads
    the programs it stored there.
    """
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
                in_child=in_child,
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
