"""Attention Residuals, computed the straightforward way: the reference every faster form is tested against.

One AttnRes read (arXiv 2603.15031, eq. for h_l), for sources v_0..v_{N-1} at the same token:
    k_i   = RMSNorm(v_i) * key_weight          keys are RMS-normalised (with a learnable weight)
    alpha = softmax_i(query . k_i)             softmax over depth, in fp32
    h     = sum_i alpha_i v_i                  values are the raw, un-normalised sources

A stack of L sublayers f_0..f_{L-1} (token mixer, FFN, mixer, FFN, ...) then reads its input from sources:
  full AttnRes:  sources of sublayer l = [embedding, f_0 out, ..., f_{l-1} out]
  block AttnRes: sublayers are grouped into consecutive blocks of `block_size`; the sources of sublayer l are
                 [embedding, sum of block 0's outputs, ..., sum of block n-1's outputs]   (n = l's block)
                 plus, when l is not the first of its block, the partial sum of its block's earlier outputs.
and the final hidden state (before the final norm and the LM head) is one more read, with its own query,
over all sources once every sublayer has run. block_size = 1 is full AttnRes.
"""
import torch
import torch.nn.functional as F


def attnres_naive(sources, query, key_weight=None, eps=1e-6):
    """sources: [N, B, T, D] (or a list of N tensors [B, T, D]); query, key_weight: [D].

    Returns the depth mixture [B, T, D] in the sources' dtype.
    """
    if isinstance(sources, (list, tuple)):
        sources = torch.stack(list(sources))
    compute_dtype = torch.promote_types(sources.dtype, torch.float32)  # fp32, or float64 for float64 inputs
    values = sources.to(compute_dtype)  # [N, B, T, D]
    D = values.shape[-1]
    weight = None if key_weight is None else key_weight.to(compute_dtype)
    keys = F.rms_norm(values, (D,), weight, eps)  # [N, B, T, D]
    logits = torch.einsum("nbtd,d->nbt", keys, query.to(compute_dtype))
    alpha = logits.softmax(dim=0)  # [N, B, T]
    return torch.einsum("nbt,nbtd->btd", alpha, values).to(sources.dtype)


def attnres_stack_naive(embedding, sublayers, queries, key_weights=None, block_size=1, eps=1e-6,
                        return_inputs=False):
    """Run a stack of sublayers with (block) AttnRes residuals, recomputing every source from scratch.

    embedding: [B, T, D]; sublayers: list of L callables [B, T, D] -> [B, T, D] (their own pre-norm included);
    queries, key_weights: L + 1 vectors [D] each (a tensor [L + 1, D] or a list): one per sublayer, then the final one.
    Returns the final hidden state [B, T, D], and with return_inputs the L sublayer inputs as well.
    """
    L = len(sublayers)
    if key_weights is None:
        key_weights = [None] * (L + 1)
    outputs = []
    inputs = []

    def sources_before(l):
        """The sources sublayer l (or the final read, l = L) attends over."""
        block = l // block_size
        completed = [embedding]
        for n in range(block):
            completed.append(sum(outputs[n * block_size:(n + 1) * block_size]))
        earlier_in_block = outputs[block * block_size:l]
        if earlier_in_block:
            completed.append(sum(earlier_in_block))
        return completed

    for l, sublayer in enumerate(sublayers):
        h = attnres_naive(sources_before(l), queries[l], key_weights[l], eps)
        inputs.append(h)
        outputs.append(sublayer(h).to(embedding.dtype))
    final = attnres_naive(sources_before(L), queries[L], key_weights[L], eps)
    return (final, inputs) if return_inputs else final
