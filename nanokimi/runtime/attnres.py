"""How the Attention Residuals stream runs: settings that change speed and memory, never the architecture.

They are not in ModelConfig nor in a checkpoint's config.json; the model applies them from outside
(`nanokimi.model.attn_res.set_attnres_kernels(model, AttnResKernels(...))`).
"""
from dataclasses import dataclass

STORAGES = ("auto", "auto-all", "fp32")


@dataclass(frozen=True, kw_only=True, slots=True)
class AttnResKernels:
    """storage: the dtype the stored sources (embedding, finished block sums) are kept in: "auto" = the sublayers'
    output dtype (bf16 under bf16 autocast), "fp32"; "auto-all": as "auto", and phase 1's mixtures too. Sums and
    the softmax run in fp32 either way.
    fuse_norm: each sublayer's pre-norm (an RMSNorm) applied by the kernel that computes its input (the merge's
    for a sublayer inside a block, phase 1's for a block's first); False: the input, then the norm (the same
    numbers)."""
    storage: str = "auto"
    fuse_norm: bool = True

    def __post_init__(self):
        if self.storage not in STORAGES:
            raise ValueError(f"storage='{self.storage}' must be one of {STORAGES}: 'auto' stores the residual "
                             "sources in the sublayers' output dtype (bf16 under bf16 autocast), 'auto-all' the "
                             "phase-1 mixtures as well, 'fp32' everything in fp32.")
        if not isinstance(self.fuse_norm, bool):
            raise ValueError(f"fuse_norm={self.fuse_norm!r} must be True or False.")
