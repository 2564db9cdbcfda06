"""A deterministic no-grad forward of a (tiny) GPTModel, shared by the checkpoint tests."""

import torch


def forward(model, seed: int = 3, batch: int = 2, seq: int = 16) -> torch.Tensor:
    """Logits of the model in eval mode on seeded random token ids ``[batch, seq]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size, (batch, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    model.eval()
    with torch.no_grad():
        return model(ids, pos, None)
