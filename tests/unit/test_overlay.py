"""Kept-token overlays (vtprune.proxy.overlay): which pixels are greyed, how panels are laid out."""

import pytest
import torch
from PIL import Image

from vtprune.proxy.overlay import GREY, GREY_WEIGHT, LINE_HEIGHT, grey_out, panel_grid


def checkerboard(side=32, grid=4):
    image = Image.new("RGB", (side, side))
    step = side // grid
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        colour = (255, 0, 0) if (row + col) % 2 else (0, 0, 255)
        image.paste(colour, (col * step, row * step, (col + 1) * step, (row + 1) * step))
    return image


def test_grey_out_keeps_kept_patches_and_greys_the_rest_row_major():
    view, grid = checkerboard(), 4
    kept = torch.tensor([0, 6, 15])  # (0, 0), (1, 2), (3, 3)
    out = grey_out(view, kept, grid)
    assert out.size == view.size
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        centre = (col * 8 + 4, row * 8 + 4)
        original = view.getpixel(centre)
        if index in kept.tolist():
            assert out.getpixel(centre) == original
        else:
            expected = tuple(round(o * (1 - GREY_WEIGHT) + g * GREY_WEIGHT) for o, g in zip(original, GREY))
            assert all(abs(a - b) <= 1 for a, b in zip(out.getpixel(centre), expected)), (index, out.getpixel(centre))
    assert grey_out(view, torch.arange(16), grid).tobytes() == view.tobytes()


@pytest.mark.parametrize(
    "kept, grid, size, match",
    [([16], 4, 32, r"\[0, 16\)"), ([-1], 4, 32, r"\[0, 16\)"), ([0], 5, 32, "divisible"), ([0], 4, (32, 16), "square")],
)
def test_grey_out_rejects_bad_input(kept, grid, size, match):
    view = Image.new("RGB", (size, size) if isinstance(size, int) else size)
    with pytest.raises(ValueError, match=match):
        grey_out(view, torch.tensor(kept), grid)


def test_panel_grid_lays_out_rows_with_titles():
    a, b = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 255, 0))
    sheet = panel_grid([[("a", a), ("b", b)], [("a", a)]], pad=5, title_height=7)
    assert sheet.size == (5 + 2 * 25, 5 + 2 * (10 + 7 + 5))
    assert sheet.getpixel((5 + 25 + 1, 5 + 7 + 1)) == (0, 255, 0)  # row 0, column 1, below its title
    assert sheet.getpixel((5 + 25 + 1, 5 + 22 + 7 + 1)) == (255, 255, 255)  # row 1 has one panel
    with pytest.raises(ValueError, match="expected"):
        panel_grid([[("a", a), ("small", Image.new("RGB", (5, 5)))]])
    with pytest.raises(ValueError, match="non-empty"):
        panel_grid([])


def test_panel_grid_makes_room_for_multi_line_titles_a_header_and_a_footer():
    a = Image.new("RGB", (20, 10), (255, 0, 0))
    plain = panel_grid([[("a", a)]], pad=5)
    sheet = panel_grid([[("a\nanswer", a)]], pad=5, header=("question", "keep"), footer=("legend",))
    assert sheet.width == plain.width
    assert sheet.height == plain.height + LINE_HEIGHT * (1 + 2 + 1)  # one more title line, 2 above, 1 below
    top = 5 + 2 * LINE_HEIGHT + 2 * LINE_HEIGHT + 4  # header, then the two-line title
    assert sheet.getpixel((6, top + 1)) == (255, 0, 0)
