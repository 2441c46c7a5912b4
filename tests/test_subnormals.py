"""Subnormal numbers read as zero where influence-store computes (pieces.py), and nowhere else."""

import torch

from influence_store.pieces import kept_sums_in_threads, subnormals_flushed

SUBNORMAL = 1e-40  # below float32's smallest normal number (1.2e-38)


def test_subnormals_read_as_zero_inside_and_the_thread_setting_comes_back():
    tiny = torch.tensor([SUBNORMAL])
    before = float(tiny * 1.0)
    assert before != 0.0  # torch's default: subnormals are kept
    with subnormals_flushed():
        assert float(tiny * 1.0) == 0.0
    assert float(tiny * 1.0) == before


def test_hvp_threads_read_subnormals_as_zero():
    """The threads that run HVP pieces flush subnormals for themselves, whatever the caller's threads do."""
    vectors = torch.full((2, 3), SUBNORMAL)
    total = kept_sums_in_threads({0: lambda block: block * 1.0, 1: lambda block: block * 1.0}, [0, 1], vectors, 1,
                                 into=torch.zeros_like(vectors))
    assert torch.equal(total, torch.zeros_like(vectors))
    assert float(vectors[0, 0] * 1.0) != 0.0  # this thread untouched
