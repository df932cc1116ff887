"""The residual stream, driven one sublayer at a time so that other schemes (AttnRes) can replace it.

    state = residual.start(embedding)
    for each sublayer l:  state = residual.add(state, l, f_l(norm_l(residual.sublayer_input(state, l))))
    hidden = residual.finish(state)

The Transformer runs PreNorm models through Block.forward instead (the same sum, one call per block, so
a whole block compiles as one graph); this class states the plain scheme in the protocol's terms.
"""
import torch
from torch import nn


class PreNormResidual(nn.Module):
    """h_l = h_{l-1} + f_l(norm(h_{l-1}))."""

    def start(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding

    def sublayer_input(self, state: torch.Tensor, index: int) -> torch.Tensor:
        return state

    def add(self, state: torch.Tensor, index: int, out: torch.Tensor) -> torch.Tensor:
        return state + out

    def finish(self, state: torch.Tensor) -> torch.Tensor:
        return state
