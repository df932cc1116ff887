"""QK-Clip (MuonClip, Kimi K2 arXiv 2507.20534): keep every attention head's max logit at or below tau.

Contract with the model's attention modules (any module with a `qk_clip_` method):
    module.record_max_logits: bool   when True, the forward stores module.max_logits, a [num_heads] fp32
                                     tensor: the exact max pre-softmax scaled logit q.k * scale of each head
                                     over the batch
    module.qk_clip_(tau) -> [num_heads] gamma = min(1, tau / max_logit) per head, after rescaling that head's
                                     query/key weights in place (MHA: W_q, W_k by sqrt(gamma); MLA: q_nope,
                                     k_nope by sqrt(gamma), q_rope by gamma, the shared k_rope never)
Call `enable_qk_clip_recording(model)` once, then `apply_qk_clip(model, tau)` after every optimizer step.
"""
import torch


def qk_clip_modules(model):
    """(name, module) for every module of `model` that implements the QK-Clip contract."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "qk_clip_", None))]


def enable_qk_clip_recording(model, on=True):
    """Set `record_max_logits = on` on every QK-Clip module; returns how many modules were set."""
    modules = qk_clip_modules(model)
    for _, module in modules:
        module.record_max_logits = on
    return len(modules)


@torch.no_grad()
def clip_heads_(model, tau=100.0):
    """Clip every recorded head above tau, on the device and without a host sync (a CUDA graph can hold it);
    returns [(max_logits [H], gamma [H])] per module that recorded. Heads at or below tau keep their weights
    bit-identical (their factor is exactly 1)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    clipped = []
    for _, module in qk_clip_modules(model):
        logits = getattr(module, "max_logits", None)
        if logits is not None:
            clipped.append((logits, module.qk_clip_(tau)))
    return clipped


@torch.no_grad()
def apply_qk_clip(model, tau=100.0):
    """Clip every recorded head above tau; returns {"clipped_heads", "heads", "max_logit", "min_gamma", "modules"}.

    max_logit is the largest logit seen over all heads (a Python float, -inf if nothing was recorded).
    One host sync per call (the statistics); the rescaling itself stays on the device (`clip_heads_`).
    """
    modules = qk_clip_modules(model)
    gammas, max_logits = [], []
    for logits, gamma in clip_heads_(model, tau):
        max_logits.append(logits.detach().float().reshape(-1).max())
        gammas.append(torch.as_tensor(gamma).detach().float().reshape(-1).to(logits.device))
    if not gammas:
        return {"clipped_heads": 0, "heads": 0, "max_logit": float("-inf"), "min_gamma": 1.0, "modules": len(modules)}
    device = gammas[0].device
    gamma_all = torch.cat([g.to(device) for g in gammas])
    stats = torch.stack([(gamma_all < 1).sum().float(), torch.stack([m.to(device) for m in max_logits]).max(),
                         gamma_all.min()]).tolist()
    return {"clipped_heads": int(stats[0]), "heads": gamma_all.numel(), "max_logit": stats[1],
            "min_gamma": stats[2], "modules": len(modules)}
