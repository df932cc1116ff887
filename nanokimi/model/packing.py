"""Several documents packed into the rows of one batch, kept apart inside the model.

With `documents=` the forward pass treats every document as if it were alone: attention is block-diagonal
causal (a token sees earlier tokens of its own document only), and KDA starts each document from a zero state
and a zero conv history. MoE and norms work per token. So packing changes speed, not the result (RoPE sees
positions shifted by the document's offset, which leaves q.k unchanged: it depends on distances only).
"""
from dataclasses import dataclass

import torch


@dataclass
class Documents:
    """Document layout of a [B, T] batch.

    ids:        [B, T] long, the document of each token, numbered across the whole batch
    positions:  [B, T] long, each token's index inside its document
    cu_seqlens: [N + 1] long, where the N documents start in the flattened B*T tokens, then B*T (fla's format)
    """

    ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor

    @classmethod
    def from_ids(cls, row_ids: torch.Tensor) -> "Documents":
        """row_ids [B, T]: any labels that change exactly where a new document starts within a row (e.g. the
        index of the document in its row). Every row starts a new document."""
        if row_ids.dim() != 2:
            raise ValueError(f"document ids must be [batch, seq_len], got shape {tuple(row_ids.shape)}.")
        B, T = row_ids.shape
        starts = torch.ones_like(row_ids, dtype=torch.bool)  # [B, T]
        starts[:, 1:] = row_ids[:, 1:] != row_ids[:, :-1]
        ids = starts.flatten().cumsum(0).view(B, T) - 1  # [B, T]
        first = starts.flatten().nonzero().squeeze(1)  # [N] flat index of each document's first token
        flat_index = torch.arange(B * T, device=row_ids.device)
        positions = (flat_index - first[ids.flatten()]).view(B, T)
        cu_seqlens = torch.cat([first, first.new_tensor([B * T])])
        return cls(ids, positions, cu_seqlens)

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], device=None) -> "Documents":
        """Each row's document lengths, in order; every row's lengths sum to the same T."""
        rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r, dtype=torch.long)) for r in lengths]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"every row's document lengths must add up to the same length, got "
                             f"{[sum(r) for r in lengths]}.")
        return cls.from_ids(torch.stack(rows).to(device))

    def to(self, device) -> "Documents":
        return Documents(self.ids.to(device), self.positions.to(device), self.cu_seqlens.to(device))

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: query t may attend key s when s <= t and both lie in the same document."""
        T = self.ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.ids.device).tril()  # [T, T]
        return (causal & (self.ids[:, :, None] == self.ids[:, None, :])).unsqueeze(1)
