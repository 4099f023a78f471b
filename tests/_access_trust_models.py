"""A torch model for tests/test_access_trust.py, in a module of its own so that its class (code
and all) is the same object whatever values its instances hold."""

from __future__ import annotations

import numpy as np
import torch


class Affine(torch.nn.Module):
    """``x * scale + shift``: ``scale`` a plain attribute, ``shift`` a non-persistent buffer."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(0.0)
        self.scale = scale
        self.register_buffer("shift", torch.tensor([shift]), persistent=False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = self.conv(torch.from_numpy(x.astype(np.float32))[None, None])[0, 0]
            return (y * self.scale + self.shift).numpy()
