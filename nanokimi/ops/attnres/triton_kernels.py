"""The Triton kernels of both phases, assembled over a base set of kernels."""
import functools

from nanokimi.ops.attnres.triton_phase1 import phase1_backward, phase1_forward, phase1_norm_backward, phase1_norm_forward
from nanokimi.ops.attnres.triton_phase2 import accumulate_merge, accumulate_merge_norm
from nanokimi.ops.attnres.two_phase import Kernels


@functools.cache
def triton_kernels(base: Kernels) -> Kernels:
    """base (e.g. compiled_kernels()) with phase 1 forward and backward (alone and with the first query's norm),
    and the per-sublayer accumulate + merge (alone and with the next sublayer's norm), replaced by the Triton
    kernels (triton_phase1.py and triton_phase2.py); base's functions still run for inputs the kernels do not take (see
    `supports`). Built once per base."""
    return base._replace(phase1_forward=functools.partial(phase1_forward, fallback=base.phase1_forward),
                         phase1_backward=functools.partial(phase1_backward, fallback=base.phase1_backward),
                         phase1_norm_forward=functools.partial(phase1_norm_forward,
                                                               fallback=base.phase1_norm_forward),
                         phase1_norm_backward=functools.partial(phase1_norm_backward,
                                                                fallback=base.phase1_norm_backward),
                         accumulate_merge=functools.partial(accumulate_merge, fallback=base.accumulate_merge),
                         accumulate_merge_norm=functools.partial(accumulate_merge_norm,
                                                                 fallback=base.accumulate_merge_norm))
