"""Fixtures of the modeling tests."""

from __future__ import annotations

import pytest
import torch

#: Factor applied to the tiny model's mask hypernetwork output layers (as tests/inference/conftest.py).
SHARPEN = 1000.0


@pytest.fixture()
def sharp_tiny_model():
    """A fresh ``tiny`` RSRefSeg whose mask logits are O(0.1-1) instead of ~1e-4.

    With random weights the SAM decoder's logits are ~1e-4, so an absolute tolerance of 1e-5 would
    be ~10 % of the signal; the last layer of the mask hypernetworks is scaled by 1000, as the
    inference tests do, so that relative tolerances bite.
    """
    from rsrefseg import RSRefSeg

    model = RSRefSeg.from_preset("tiny")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "output_hypernetworks_mlps" in name and ".proj_out." in name:
                param.mul_(SHARPEN)
    return model.eval()
