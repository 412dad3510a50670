"""Kept-token overlays: the image as the model sees it, with the patches a pruner dropped greyed out.

Works for any LLaVA whose processor resizes to a square of ``grid x grid`` patches (one visual token
per patch, row-major, no crop), such as the proxy: 224 px, 14 px patches, 16 x 16 = 256 tokens.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from vtprune.proxy import prompt as fmt

DEFAULT_QUESTION = "What shape is in the image?"
# Dropped patches are blended towards this light grey so that the kept ones stand out in colour.
GREY, GREY_WEIGHT = (200, 200, 200), 0.8


def model_view(processor, image: Image.Image) -> Image.Image:
    """The RGB image the vision tower receives (resized, de-normalised ``pixel_values``)."""
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]  # (3, H, W)
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    rgb = (pixels.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


NEAR_WHITE = 230  # a pixel whose every channel is at least this is background
FOREGROUND_SHARE = 0.25  # a patch with at least this share of non-background pixels is on the shape


def foreground_patches(view: Image.Image, grid: int) -> torch.Tensor:
    """(grid * grid,) bool, row-major: patches of ``view`` (e.g. ``model_view``) with at least
    ``FOREGROUND_SHARE`` of their pixels not near-white: easy-vqa's shape on its white background."""
    import numpy as np

    pixels = torch.from_numpy(np.array(view.convert("RGB"))).amin(-1) < NEAR_WHITE  # (H, W)
    step = view.height // grid
    share = pixels.float().view(grid, step, grid, step).mean((1, 3))
    return (share >= FOREGROUND_SHARE).flatten()


def patch_grid(processor) -> int:
    """Patches per side of the model view (16 for the proxy)."""
    size = processor.image_processor.size
    height = size["height"] if "height" in size else size["shortest_edge"]
    return height // processor.patch_size


@torch.no_grad()
def kept_tokens(model, processor, image: Image.Image, pruner, question: str = DEFAULT_QUESTION, **options):
    """(k,) ascending indices (row-major patches) of the visual tokens ``pruner`` keeps for ``image``.

    ``pruner`` and ``options`` are what ``vtprune.apply`` takes. LLM-stage pruners (FastV) depend on the
    question; the indices are those that reach the last decoder layer (``PruneStats.kept``).
    """
    import vtprune

    inputs = processor(images=[image], text=[fmt.prompt(question)], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with vtprune.apply(model, pruner, **options) as handle:
        model(**inputs, logits_to_keep=1)
        return handle.last.kept[0].clone()


def grey_out(view: Image.Image, kept: torch.Tensor, grid: int) -> Image.Image:
    """``view`` with every patch not in ``kept`` blended to grey (``grid`` patches per side)."""
    if view.width != view.height or view.width % grid:
        raise ValueError(f"view must be square with a side divisible by grid={grid}, got {view.size}")
    kept = torch.as_tensor(kept, dtype=torch.long).flatten()
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= grid * grid):
        raise ValueError(
            f"kept indices must lie in [0, {grid * grid}), got range [{int(kept.min())}, {int(kept.max())}]"
        )
    step = view.width // grid
    dropped = torch.ones(grid * grid, dtype=torch.bool)
    dropped[kept] = False
    mask = Image.new("L", view.size, 0)
    draw = ImageDraw.Draw(mask)
    for index in dropped.nonzero().flatten().tolist():
        row, col = divmod(index, grid)
        draw.rectangle([col * step, row * step, (col + 1) * step - 1, (row + 1) * step - 1], fill=255)
    grey = Image.blend(view.convert("RGB"), Image.new("RGB", view.size, GREY), GREY_WEIGHT)
    return Image.composite(grey, view.convert("RGB"), mask)


LINE_HEIGHT = 16


def panel_grid(
    rows: list[list[tuple[str, Image.Image]]],
    pad: int = 6,
    title_height: int | None = None,
    header: tuple[str, ...] = (),
    footer: tuple[str, ...] = (),
) -> Image.Image:
    """One image from rows of (title, panel) pairs; all panels the same size.

    Titles may span several lines (``"\\n"``); ``title_height`` defaults to the tallest title's lines.
    ``header`` and ``footer`` are lines of text above and below the panels (a question, a legend).
    """
    if not rows or not all(rows):
        raise ValueError("rows must be a non-empty list of non-empty lists of (title, image)")
    width, height = rows[0][0][1].size
    if title_height is None:
        title_height = LINE_HEIGHT * max(title.count("\n") + 1 for row in rows for title, _ in row) + 4
    columns = max(len(r) for r in rows)
    top_text, bottom_text = LINE_HEIGHT * len(header), LINE_HEIGHT * len(footer)
    sheet = Image.new(
        "RGB",
        (pad + columns * (width + pad), pad + top_text + len(rows) * (height + title_height + pad) + bottom_text),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for i, line in enumerate(header):
        draw.text((pad, pad + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        top = pad + top_text + r * (height + title_height + pad)
        for c, (title, panel) in enumerate(row):
            if panel.size != (width, height):
                raise ValueError(f"panel {title!r} is {panel.size}, expected {(width, height)}")
            left = pad + c * (width + pad)
            draw.multiline_text((left, top + 2), title, fill=(0, 0, 0), font=font, spacing=3)
            sheet.paste(panel, (left, top + title_height))
    bottom = sheet.height - bottom_text
    for i, line in enumerate(footer):
        draw.text((pad, bottom + i * LINE_HEIGHT - 2), line, fill=(80, 80, 80), font=font)
    return sheet


def kept_panel(name: str, view: Image.Image, kept: torch.Tensor, grid: int, merged: int = 0) -> tuple[str, Image.Image]:
    """(title, panel) for one pruner: its name and token count (kept, plus ``merged`` tokens standing
    for groups of the greyed-out ones) over ``view`` with the rest greyed out."""
    count = f"{len(kept)}+{merged} merged" if merged else f"{len(kept)}"
    return f"{name} {count}/{grid * grid}", grey_out(view, kept, grid)


def overlay_row(
    model, processor, image: Image.Image, pruners, keep: int, question: str = DEFAULT_QUESTION, title: str = "input"
):
    """[(title, panel)]: the model view, then one greyed-out panel per pruner name at ``keep`` tokens."""
    view, grid = model_view(processor, image), patch_grid(processor)
    row = [(title, view)]
    for name in pruners:
        kept = kept_tokens(model, processor, image, name, question=question, keep=keep)
        row.append(kept_panel(name, view, kept, grid))
    return row
