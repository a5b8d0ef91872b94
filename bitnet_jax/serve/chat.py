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
    """Reads user turns until EOF or an empty line, streaming each reply.

    The turns run on the serving engine (`serve.batching.Engine`, one slot over the model's
    context) with its prefix cache: a turn's prompt is the whole conversation, rendered again,
    and the engine prefills only what its KV cache does not hold from the turn before (the new
    message, and the last reply where it tokenizes differently from how it was sampled), so a
    turn's first token does not wait for the history. The replies are `generate`'s for the same
    prompt. `in_child`: the engine compiles its programs in a child process (as `bitnet-jax
    serve` does), so that the chat process never holds the compiler; with a compilation cache
    folder, a later chat loads the programs it stored there.
    """
    import queue

    from bitnet_jax.model.serving_layers import is_packed
    from bitnet_jax.serve.batching import Engine, GenerationRequest
    from bitnet_jax.serve.pack import pack

    if not is_packed(params) and config.weight_quant in ("tensor", "channel") and config.act_quant == "token":
        params = pack(config, params)  # pack once for the whole chat
    template = chat_template(folder)
    stops = stop_ids(tokenizer, config, folder)
    engine = Engine(
        config,
        params,
        tokenizer,
        max_batch=1,
        max_context=config.max_position_embeddings,
        in_child=in_child,
        prefix_cache=True,
        top_k=top_k is not None,
    )
    engine.start()
    messages = [{"role": "system", "content": system}] if system else []
    try:
        while True:
            try:
                user = read("> ")
            except EOFError:
                break
            if not user.strip():
                break
            messages.append({"role": "user", "content": user})
            request = GenerationRequest(
                tuple(chat_prompt_ids(template, messages, tokenizer)),
                max_new_tokens,
                temperature=temperature,
                top_p=1.0 if top_p is None else top_p,
                top_k=top_k,
                stop_ids=tuple(stops),
            )
            events: queue.Queue = queue.Queue()
            try:
                engine.submit(request, events.put)
            except BitNetError as e:
                write.write(f"[{e}]\n")
                messages.pop()
                continue
            reply = []
            while True:
                event = events.get()
                reply.append(event.text)
                write.write(event.text)
                write.flush()
                if event.finish_reason:
                    break
            if event.error:
                write.write(f"[{event.error}]\n")
                messages.pop()
                continue
            write.write("\n")
            write.flush()
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        engine.stop()
    return 0
