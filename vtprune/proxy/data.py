"""easy-vqa (``easy-vqa==1.0``): 64x64 images of one coloured shape, questions with one-word answers.

4,000 train / 1,000 test images, 38,575 / 9,673 questions, 13 possible answers (3 shapes, 8 colours,
yes/no). Read straight from the package's ``data/`` directory (JSON and PNG), without importing it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vtprune.proxy import packages

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    image_id: int
    split: str

    @property
    def image_path(self) -> Path:
        return image_path(self.split, self.image_id)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


@lru_cache(maxsize=1)
def answers() -> tuple[str, ...]:
    """The 13 possible answers, in the data set's order."""
    text = (packages.data_dir() / "data" / "answers.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@lru_cache(maxsize=2)
def questions(split: str) -> tuple[Question, ...]:
    """All questions of a split, in the data set's order."""
    path = packages.data_dir() / "data" / _check_split(split) / "questions.json"
    return tuple(Question(q[0], q[1], int(q[2]), split) for q in json.loads(path.read_text()))


def image_path(split: str, image_id: int) -> Path:
    path = packages.data_dir() / "data" / _check_split(split) / "images" / f"{int(image_id)}.png"
    if not path.is_file():
        raise FileNotFoundError(f"no easy-vqa {split} image {image_id}: {path}")
    return path


def load_image(split: str, image_id: int):
    """The image as an RGB ``PIL.Image`` (64x64)."""
    from PIL import Image

    with Image.open(image_path(split, image_id)) as image:
        return image.convert("RGB")


def load_photo(name: str):
    """A real photo shipped by scikit-image (``"astronaut"``, ``"cat"``) as an RGB ``PIL.Image``."""
    from PIL import Image

    with Image.open(packages.photo_path(name)) as image:
        return image.convert("RGB")


def subset(split: str = "test", n: int = 1000, seed: int = 0) -> list[Question]:
    """A fixed seeded sample of ``n`` questions (in data set order); the same for the same arguments."""
    pool = questions(split)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(pool):
        raise ValueError(f"n must be an int in [1, {len(pool)}] for the {split} split, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    chosen = sorted(random.Random(seed).sample(range(len(pool)), n))
    return [pool[i] for i in chosen]


def by_image(items) -> dict[int, list[Question]]:
    """Questions grouped by image id (insertion order kept)."""
    groups: dict[int, list[Question]] = {}
    for q in items:
        groups.setdefault(q.image_id, []).append(q)
    return groups


SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")


def colours() -> tuple[str, ...]:
    """The 8 colour answers."""
    return tuple(a for a in answers() if a not in SHAPES and a not in YES_NO)


def kind(question: Question) -> str:
    """What a question asks: ``"shape"``, ``"colour"``, ``"yes/no"`` or ``"yes/no negated"``.

    Negated forms ("is there not a ...", "is no ... present", "does the image not contain ...") are told
    apart because a frozen language model has to invert its reading of the image for them.
    """
    if question.answer in SHAPES:
        return "shape"
    if question.answer not in YES_NO:
        return "colour"
    words = question.text.rstrip("?").split()
    return "yes/no negated" if "not" in words or "no" in words else "yes/no"


def image_labels(split: str) -> dict[int, tuple[str, str]]:
    """(shape, colour) of each image, read from its shape and colour questions.

    A shape question names the colour ("what is the red shape?") and a colour question may name the
    shape ("what is the color of the triangle?"); images whose questions do not give both are left out.
    """
    shades = colours()
    labels = {}
    for image_id, items in by_image(questions(split)).items():
        shape = colour = None
        for q in items:
            words = q.text.rstrip("?").split()
            if q.answer in SHAPES:
                shape = q.answer
                colour = next((w for w in words if w in shades), colour)
            elif q.answer in shades:
                colour = q.answer
                shape = next((w for w in words if w in SHAPES), shape)
        if shape is not None and colour is not None:
            labels[image_id] = (shape, colour)
    return labels


def named_present(question: Question) -> bool | None:
    """For a yes/no question, whether the shape or colour it names is in the image; None otherwise.

    "is there a red shape?" -> yes means present; "is there not a red shape?" -> no means present.
    """
    question_kind = kind(question)
    if not question_kind.startswith("yes/no"):
        return None
    return (question.answer == "yes") == (question_kind == "yes/no")


def balance_yes_no(items, rng: random.Random) -> list[Question]:
    """``items`` with, per image, as many yes/no questions about absent things as about present ones.

    About 82% of easy-vqa's yes/no questions name something absent, so "absent" is right most of the
    time without looking at the image. Trained on all of them, the proxy's projector learned exactly
    that: on the test set it answered every yes/no question as if the named thing were absent. Keeping
    every present-thing question and an equal random draw of absent-thing ones (per image, order kept)
    removes the shortcut; shape and colour questions are all kept.
    """
    out: list[Question] = []
    for group in by_image(items).values():
        present = [q for q in group if named_present(q) is True]
        absent = [i for i, q in enumerate(group) if named_present(q) is False]
        keep_absent = set(rng.sample(absent, min(len(present), len(absent))))
        out.extend(q for i, q in enumerate(group) if named_present(q) is not False or i in keep_absent)
    return out
