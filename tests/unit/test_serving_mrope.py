"""M-RoPE positions of a pruned prompt for vLLM (``vtprune.serving.mrope``, plain torch): text at the
unpruned prompt's positions, each kept token at its own grid place, in chunks or at once."""

import torch

from vtprune.serving.mrope import PLACE_CHANNELS, Media, place_tokens, prompt_positions, with_places


def _unpruned(n_text_before: int, grid: tuple[int, int, int], n_text_after: int) -> torch.Tensor:
    """(3, L) positions of text, one image of ``grid`` (t, h, w) tokens, text: Qwen2-VL's rule."""
    t, h, w = grid
    before = torch.arange(n_text_before).expand(3, -1)
    cells = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    image = cells + n_text_before
    after = torch.arange(n_text_after).expand(3, -1) + int(image.max()) + 1
    return torch.cat([before, image, after], dim=1)


def _kept_embeddings(places: torch.Tensor, grid) -> torch.Tensor:
    return with_places(torch.randn(places.numel(), 8), places, grid)


def test_kept_tokens_get_their_unpruned_positions_and_text_keeps_its_own():
    grid, kept = (1, 4, 5), torch.tensor([0, 3, 7, 12, 19])
    full = _unpruned(3, grid, 4)
    positions, _ = prompt_positions(3 + kept.numel() + 4, [Media(3, kept.numel(), grid)])
    embeddings = _kept_embeddings(kept, grid)
    stripped, positions, delta = place_tokens([embeddings], positions, 0)
    keep = torch.cat([torch.arange(3), 3 + kept, torch.arange(23, 27)])
    assert torch.equal(positions, full[:, keep])
    assert torch.equal(stripped[0], embeddings[:, :-PLACE_CHANNELS])
    assert delta == int(full.max()) + 1 - positions.shape[1]


def test_chunks_and_a_second_pass_give_the_same_positions():
    grids, kept = [(1, 4, 4), (1, 2, 6)], [torch.tensor([1, 5, 6, 15]), torch.tensor([0, 11])]
    media = [Media(2, 4, grids[0]), Media(8, 2, grids[1])]  # text 2, image 4, text 2, image 2, text 3
    once, _ = prompt_positions(13, media)
    chunked, _ = prompt_positions(13, media)
    rows = [_kept_embeddings(k, g) for k, g in zip(kept, grids)]
    _, once, delta = place_tokens(rows, once, 0)
    place_tokens([rows[0][:3]], chunked, 0)  # a first prefill chunk ends inside the first image
    _, chunked, chunked_delta = place_tokens([rows[0][3:], rows[1]], chunked, 5)
    assert torch.equal(once, chunked) and delta == chunked_delta
    placed = once.clone()
    _, again, _ = place_tokens(rows, once, 0)  # a preempted request's prefill runs again
    assert torch.equal(again, placed)
    # Text at 6 and 7 (after the first grid's 4 rows), so the second image's origin is 8: its tokens 0
    # and 11 of a 2 x 6 grid sit at (8, 8, 8) and (8, 9, 13).
    assert once[:, 8:10].tolist() == [[8, 8], [8, 9], [8, 13]]


def test_large_grid_places_survive_bfloat16():
    places = torch.tensor([0, 300 * 301 - 1])
    rows = with_places(torch.zeros(2, 4, dtype=torch.bfloat16), places, (1, 300, 301))
    positions, _ = prompt_positions(2, [Media(0, 2, (1, 300, 301))])
    _, positions, _ = place_tokens([rows], positions, 0)
    assert positions[:, 1].tolist() == [0, 299, 300]
