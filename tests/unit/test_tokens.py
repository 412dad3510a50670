"""The check every pruner's choice passes (vtprune.core.tokens.Reduction.fits)."""

import pytest
import torch

from vtprune.core.tokens import Reduction

T = torch.tensor


@pytest.mark.parametrize(
    "reduction, fits",
    [
        (Reduction(T([0, 2, 5])), True),
        (Reduction(T([], dtype=torch.long)), True),
        (Reduction(T([1, 3]), (T([0, 2]), T([4, 5]))), True),  # 2 kept + 2 merged = keep
        (Reduction(T([0, 0, 1])), False),  # repeated
        (Reduction(T([2, 1])), False),  # not ascending
        (Reduction(T([0, 6])), False),  # out of range
        (Reduction(T([-1, 2])), False),
        (Reduction(T([0, 1, 2, 3, 4])), False),  # more than keep
        (Reduction(T([1, 3]), (T([1, 2]),)), False),  # a group holds a kept token
        (Reduction(T([1]), (T([0, 2]), T([2, 3]))), False),  # groups overlap
        (Reduction(T([1, 3]), (T([0, 2]), T([4]), T([5]))), False),  # 2 kept + 3 merged > keep
    ],
)
def test_a_reduction_fits_six_tokens_and_a_keep_of_four(reduction, fits):
    assert reduction.fits(n=6, keep=4) == fits
