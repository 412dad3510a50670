"""Turn an lmms-eval request (context text + the document's images) into the model's prompt."""

from __future__ import annotations

import warnings


def _image_token(processor) -> str | None:
    return getattr(processor, "image_token", None)


def chat_prompt(processor, context: str, n_images: int) -> str:
    """The user turn ``context`` with ``n_images`` images, rendered by the processor's chat template
    up to where the answer starts. Images go before the text unless ``context`` already holds the
    processor's image token (then the context places them itself and must hold one per image).
    Without a chat template: the image tokens, a newline and the context, with a warning."""
    token = _image_token(processor)
    placed = token is not None and token in context
    if placed and context.count(token) != n_images:
        raise ValueError(
            f"the context names {context.count(token)} {token!r} tokens but the request has {n_images} images"
        )
    if getattr(processor, "chat_template", None) is None:
        warnings.warn("the processor has no chat template; prompts are '<image tokens>\\n<context>'", stacklevel=2)
        if placed or n_images == 0:
            return context
        if token is None:
            raise ValueError("the processor has neither a chat template nor an image token; cannot place images")
        return " ".join([token] * n_images) + "\n" + context
    content = [] if placed else [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": context})
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def truncate_at_stops(text: str, stops) -> str:
    """``text`` cut before the first occurrence of any stop string (lmms-eval's ``until``)."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]
