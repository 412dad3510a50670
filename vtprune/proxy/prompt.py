"""The proxy's fixed question format (SmolLM2's ChatML turns, no system turn).

    <|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>

The image comes first so that every question about an image shares the same prefix (the user-turn
header and the visual tokens); training runs that prefix once per image. No system turn: SmolLM2's
default one (about 20 tokens) adds cost to every sequence and says nothing about images. The answer
is one easy-vqa word, scored by the logit of its first token (the 13 answers' first tokens differ).
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
USER_START = "<|im_start|>user\n"
TURN_END = "<|im_end|>"
ASSISTANT_START = "<|im_start|>assistant\n"

# Renders exactly ``prompt(question)`` from [{"role": "user", "content": [{"type": "image"},
# {"type": "text", "text": question}]}] with add_generation_prompt=True (assistant turns are closed).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prompt(question: str) -> str:
    """The full prompt for one question about one image, up to where the answer starts."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return f"{USER_START}{IMAGE_TOKEN}\n{question}{TURN_END}\n{ASSISTANT_START}"


def question_suffix(question: str) -> str:
    """What follows the visual tokens in ``prompt(question)``: the per-question part of the sequence."""
    return prompt(question)[len(USER_START) + len(IMAGE_TOKEN) :]


def answer_text(answer: str) -> str:
    """The target after the prompt: the answer word and the end of the assistant turn."""
    return f"{answer}{TURN_END}"
