"""The residual stream, driven one sublayer at a time so that other schemes (AttnRes) can replace it.

    state = residual.start(embedding, norm_0)
    for each sublayer l:  state = residual.add(state, l, f_l(residual.normed_input(state, l, norm_l)), norm_{l+1})
    hidden = residual.finish(state)

(`normed_input(state, l, norm)` is norm(sublayer_input(state, l)); start's and add's last argument, the next
sublayer's norm, lets a scheme compute that normed input in the same kernel as the input itself: AttnRes does,
this one does not.)

The Transformer runs PreNorm models through Block.forward instead (the same sum, one call per block, so
a whole block compiles as one graph); this class states the plain scheme in the protocol's terms.
"""
import torch
from torch import nn


class PreNormResidual(nn.Module):
    """h_l = h_{l-1} + f_l(norm(h_{l-1}))."""

    def start(self, embedding: torch.Tensor, first_norm: nn.Module | None = None) -> torch.Tensor:
        return embedding

    def sublayer_input(self, state: torch.Tensor, index: int) -> torch.Tensor:
        return state

    def normed_input(self, state: torch.Tensor, index: int, norm: nn.Module) -> torch.Tensor:
        return norm(state)

    def add(self, state: torch.Tensor, index: int, out: torch.Tensor,
            next_norm: nn.Module | None = None) -> torch.Tensor:
        return state + out

    def finish(self, state: torch.Tensor) -> torch.Tensor:
        return state
