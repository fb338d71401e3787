"""The decoding-step form of the block importance equals the full-sequence form."""

from __future__ import annotations

import pytest
import torch

from megatron_nsa.hf.asa_ops import selection_overlap, selection_scores


@pytest.mark.parametrize("block, stride, select_block", [(8, 4, 16), (32, 16, 64), (16, 16, 16),
                                                         (16, 4, 16), (8, 8, 32)])
@pytest.mark.parametrize("num_cmp", [0, 1, 5, 37])
def test_selection_scores_equal_the_overlap_product(block, stride, select_block, num_cmp):
    num_slc = max(1, -(-((num_cmp - 1) * stride + block) // select_block))
    p_cmp = torch.rand(2, 3, 4, num_cmp, dtype=torch.float64)
    overlap = selection_overlap(num_cmp, num_slc, block, stride, select_block, "cpu")
    torch.testing.assert_close(
        selection_scores(p_cmp, num_slc, block, stride, select_block), p_cmp @ overlap.double()
    )
