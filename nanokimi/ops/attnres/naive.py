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
import functools

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


class _Round(torch.autograd.Function):
    """x -> x rounded to dtype and back (fp32 values); backward passes the gradient through, rounded to dtype
    when round_grad (the gradient of a tensor stored in dtype is in dtype), else unchanged (straight through)."""

    @staticmethod
    def forward(ctx, x, dtype, round_grad):
        ctx.dtype, ctx.round_grad = dtype, round_grad
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return (grad.to(ctx.dtype).to(grad.dtype) if ctx.round_grad else grad), None, None


def attnres_stack_stored_naive(embedding, sublayers, queries, key_weights, block_size, storage_dtype, eps=1e-6,
                               round_mixtures=True):
    """attnres_stack_naive with the roundings of a narrow storage dtype (AttentionResiduals(storage="auto")
    under autocast): every completed source (the embedding, each finished block's sum) is rounded to
    storage_dtype once and its gradient passes through unrounded (summed in fp32); a sublayer's softmax is split
    as the two-phase form computes it: the mixture of the completed sources (with round_mixtures, as
    storage="auto-all", rounded to storage_dtype, its gradient too) merged with the block's partial sum (kept in fp32) by the partial's logit. Everything else is
    fp32: the AttnRes maths runs with autocast off, the sublayers under the caller's autocast.
    embedding [B, T, D] fp32; sublayers, queries, key_weights as in attnres_stack_naive.
    Returns the final hidden state [B, T, D] (fp32)."""
    no_autocast = functools.partial(torch.autocast, embedding.device.type, enabled=False)

    def stored(x):
        return _Round.apply(x, storage_dtype, False)

    def mixture(sources, l):
        with no_autocast():
            mixed = attnres_naive(sources, queries[l], key_weights[l], eps)
            return _Round.apply(mixed, storage_dtype, True) if round_mixtures else mixed

    def logit(v, l):  # query_l . RMSNorm(v) * key_weight_l, fp32
        return (F.rms_norm(v, v.shape[-1:], key_weights[l], eps) * queries[l]).sum(-1)

    def merge(h, partial, completed, l):  # online softmax: the completed sources' share against the partial's logit
        with no_autocast():
            lse = torch.logsumexp(torch.stack([logit(v, l) for v in completed]), dim=0)
            share = torch.sigmoid(lse - logit(partial, l)).unsqueeze(-1)
            return partial + share * (h - partial)

    L = len(sublayers)
    completed = [stored(embedding)]
    for first in range(0, L, block_size):
        partial = None
        for l in range(first, min(first + block_size, L)):
            h = mixture(completed, l)
            if partial is not None:
                h = merge(h, partial, completed, l)
            out = sublayers[l](h).to(embedding.dtype)
            partial = out if partial is None else partial + out
        completed.append(stored(partial))
    return mixture(completed, L)
