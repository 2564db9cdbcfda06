"""Helpers shared by the attention-pass tests."""

import torch


def _logits(model, ids, pos):
    with torch.no_grad():
        return model(ids, pos, None).double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())
