"""scripts/proxy_placement.py: the kept tokens land where the experiment says, as many as asked."""

from __future__ import annotations

import pytest
import torch
from helpers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("proxy_placement")


@pytest.fixture
def shape():
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[3:5, 3:6] = True  # a 2x3 object: 6 patches, its one-patch ring adds 14
    return grid.flatten()


def test_ring_grows_the_shape_by_one_patch(script, shape):
    ring = script.ring(shape, 8)
    assert ring[shape].all() and int(ring.sum()) == 4 * 5
    assert ring.view(8, 8)[2:6, 2:7].all() and not ring.view(8, 8)[1].any()


@pytest.mark.parametrize("region, on", [("shape", 6), ("background", 0), (0.5, 4), (0.0, 0), (1.0, 6)])
def test_placement_draws_from_the_region_asked(script, shape, region, on):
    kept = script.placement(shape, 8, region, 8, seed=3)
    assert torch.equal(kept, kept.sort().values) and kept.unique().numel() == kept.numel()
    assert int(shape[kept].sum()) == on
    # a region with fewer tokens than asked gives all it has; a mix fills the rest from the background
    assert kept.numel() == (6 if region == "shape" else 8)


def test_placement_is_seeded(script, shape):
    assert torch.equal(
        script.placement(shape, 8, "anywhere", 8, seed=1), script.placement(shape, 8, "anywhere", 8, seed=1)
    )
    ring = script.ring(shape, 8)
    assert ring[script.placement(shape, 8, "shape+ring", 12, seed=1)].all()
