"""Data for vtprune's offline lmms-eval tasks (``eval/tasks/vtprune``): JSON lines + PNG files.

    <dir>/shapes/images/<i>.png    one coloured shape on white, drawn here (no package needed)
    <dir>/shapes_yes_no.jsonl      POPE-style: "Is there a <shape> in the image?", half yes, half no
    <dir>/shapes_choice.jsonl      multiple choice: "What colour is the shape?" with four options
    <dir>/easyvqa.jsonl            easy-vqa test questions (the real-weights proxy's); needs easy-vqa
    <dir>/easyvqa_image_reading.jsonl   the shape and colour questions among them (the proxy answers
                                   yes/no questions from a prior, not from the image)
    <dir>/easyvqa/images/<id>.png  their images, copied from the easy-vqa package

Image paths in the JSON lines are relative to ``<dir>``, which the tasks find in ``VTPRUNE_EVAL_DATA``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30)}


def draw_shape(shape: str, colour: str, size: int, rng: random.Random):
    """A ``size`` x ``size`` RGB image: one filled ``shape`` of ``colour`` at a random place on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    extent = rng.randint(size // 3, size // 2)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x, y, x + extent, y + extent)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + extent // 2, y), (x, y + extent), (x + extent, y + extent)], fill=fill)
    return image


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_shapes(directory, n_images: int = 40, size: int = 96, seed: int = 0) -> dict[str, int]:
    """Draw ``n_images`` shapes and write both shape tasks' JSON lines; returns questions per file."""
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    directory = Path(directory)
    (directory / "shapes" / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    yes_no, choice = [], []
    for i in range(n_images):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        image = f"shapes/images/{i}.png"
        draw_shape(shape, colour, size, rng).save(directory / image)
        asked = shape if i % 2 == 0 else rng.choice([s for s in SHAPES if s != shape])
        yes_no.append(
            {
                "question_id": f"yn{i}",
                "image": image,
                "question": f"Is there a {asked} in the image?",
                "answer": "yes" if asked == shape else "no",
            }
        )
        options = rng.sample([c for c in COLOURS if c != colour], 3) + [colour]
        rng.shuffle(options)
        choice.append(
            {
                "question_id": f"mc{i}",
                "image": image,
                "question": "What colour is the shape?",
                "options": options,
                "answer": options.index(colour),
            }
        )
    _write_jsonl(directory / "shapes_yes_no.jsonl", yes_no)
    _write_jsonl(directory / "shapes_choice.jsonl", choice)
    return {"shapes_yes_no.jsonl": len(yes_no), "shapes_choice.jsonl": len(choice)}


def write_easyvqa(directory, n: int = 1000, seed: int = 0) -> int:
    """easy-vqa test questions ``vtprune.proxy.data.subset("test", n, seed)`` (the questions
    ``vtprune.proxy.evaluate`` asks with the same arguments), in that order; returns their number."""
    from vtprune.proxy import data
    from vtprune.proxy.evaluate import IMAGE_READING, question_kind

    directory = Path(directory)
    (directory / "easyvqa" / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, q in enumerate(data.subset("test", n, seed)):
        image = f"easyvqa/images/{q.image_id}.png"
        if not (directory / image).is_file():
            shutil.copyfile(q.image_path, directory / image)
        rows.append(
            {
                "question_id": i,
                "image": image,
                "question": q.text,
                "answer": q.answer,
                "choices": list(data.answers()),
                "kind": question_kind(q),
            }
        )
    _write_jsonl(directory / "easyvqa.jsonl", rows)
    _write_jsonl(directory / "easyvqa_image_reading.jsonl", [r for r in rows if r["kind"] in IMAGE_READING])
    return len(rows)
