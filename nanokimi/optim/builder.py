"""Split a model's parameters between Muon (hidden matrices) and AdamW (everything else), behind one object.

Muon gets every trainable 2-D weight and every 3-D stacked-expert weight [E, out, in], except:
embeddings (any nn.Embedding weight, or a parameter named `embed.weight`), the LM head (`lm_head.weight`),
convolution weights, degenerate matrices with a side of 1, and names matching `adamw_patterns`.
AdamW gets those plus norms, biases and every 1-D/0-D tensor, with the same lr and weight decay (Moonlight's
rule: Muon's 0.2 sqrt(max(A, B)) update scale makes AdamW's hyperparameters fit both).
"""
import fnmatch

import torch
from torch import nn

from nanokimi.optim.blocks import check_matrix_options
from nanokimi.optim.muon import Muon

EMBEDDING_NAMES = ("embed.weight", "lm_head.weight")
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _has_name(name, target):
    """True for `target` itself or a wrapped copy of it (`model.embed.weight`, `_orig_mod.lm_head.weight`)."""
    return name == target or name.endswith("." + target)


def _options_for(name, matrix_options):
    chosen = {}
    for pattern, options in matrix_options.items():
        if fnmatch.fnmatchcase(name, pattern):
            chosen.update(options)
    unknown = set(chosen) - {"heads", "split"}
    if unknown:
        raise ValueError(f"matrix_options for {name!r} has unknown keys {sorted(unknown)}; use 'heads' and/or 'split'")
    return chosen


def _muon_reason(name, p, owner, adamw_patterns):
    """None if the parameter belongs to Muon, else the reason it goes to AdamW."""
    if isinstance(owner, nn.Embedding) or any(_has_name(name, t) for t in EMBEDDING_NAMES):
        return "embedding/head"
    if isinstance(owner, CONV_TYPES):
        return "conv"
    if p.ndim < 2:
        return f"{p.ndim}-D"
    if p.ndim > 3:
        return f"{p.ndim}-D"
    if min(p.shape[-2:]) < 2:
        return "vector-like"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in adamw_patterns):
        return "adamw_patterns"
    return None


class OptimizerSet:
    """Several optimizers stepped as one: Muon for hidden matrices, AdamW for the rest.

    param_groups lists every group of every optimizer (the live dicts), each with "initial_lr" set to its base
    lr, so a schedule can do `g["lr"] = g["initial_lr"] * factor` for all of them.
    """

    def __init__(self, optimizers, assignments):
        self.optimizers = dict(optimizers)  # name -> torch.optim.Optimizer
        self.assignments = list(assignments)  # (param name, shape, optimizer name, note)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self):
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict):
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"state_dict holds optimizers {sorted(state_dict)} but this set has "
                             f"{sorted(self.optimizers)}; build the optimizer with the same name= as when saving")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def describe(self):
        """One line per tensor: name, shape, optimizer (and Muon options / AdamW reason), then totals."""
        width = max((len(name) for name, *_ in self.assignments), default=4)
        lines = [f"{'name':<{width}}  {'shape':<20} optimizer"]
        totals = {}
        for name, shape, opt_name, note in self.assignments:
            lines.append(f"{name:<{width}}  {str(list(shape)):<20} {opt_name}{f'  ({note})' if note else ''}")
            count = 1
            for s in shape:
                count *= s
            totals[opt_name] = totals.get(opt_name, 0) + count
        lines.append("total: " + ", ".join(f"{n} {c:,} params" for n, c in totals.items()))
        return "\n".join(lines)

    def __repr__(self):
        return f"OptimizerSet({', '.join(f'{n}: {len(o.param_groups)} groups' for n, o in self.optimizers.items())})"


def _adamw(groups, lr, betas, eps, weight_decay):
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kind)


def build_optimizer(model, name="muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                    nesterov=True, ns_steps=5, coefficients="quintic", ns_dtype=None,
                    matrix_options=None, adamw_patterns=(), muon_execution=None):
    """Build the optimizer for `model`: "muon" (Muon + AdamW) or "adamw" (AdamW for everything).

    matrix_options: {fnmatch pattern over parameter names: {"heads": H, "split": (a1, a2, ...)}}, e.g.
        {"*.attn.wq.weight": {"heads": 8}, "*.wqkv.weight": {"split": (1024, 256, 256)}}.
    adamw_patterns: extra name patterns sent to AdamW even if they are matrices (e.g. "*.router.weight").
    muon_execution: Muon's execution options ({"side_stream": False, ...}; OptimConfig's muon_* fields), else its
        defaults.
    Frozen parameters (requires_grad=False) are left out. Returns an OptimizerSet.
    """
    if name not in ("muon", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}; choose 'muon' or 'adamw'")
    matrix_options = dict(matrix_options or {})
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners.setdefault(f"{module_name}.{param_name}" if module_name else param_name, module)

    muon_groups = {}  # (heads, split) -> param list
    adamw_params, assignments = [], []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        reason = _muon_reason(pname, p, owners.get(pname), adamw_patterns) if name == "muon" else "adamw only"
        if reason is None:
            options = _options_for(pname, matrix_options)
            heads, split = options.get("heads"), options.get("split")
            split = tuple(split) if split is not None else None
            check_matrix_options(p.shape, heads, split, name=pname)
            muon_groups.setdefault((heads, split), []).append(p)
            note = ", ".join(f"{k}={v}" for k, v in (("heads", heads), ("split", split)) if v is not None)
            if p.ndim == 3:
                note = ", ".join(filter(None, [f"per-expert x{p.shape[0]}", note]))
            assignments.append((pname, tuple(p.shape), "muon", note))
        else:
            adamw_params.append(p)
            assignments.append((pname, tuple(p.shape), "adamw", reason))

    optimizers = {}
    if muon_groups:
        groups = [{"params": ps, "heads": heads, "split": split} for (heads, split), ps in muon_groups.items()]
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for ps in muon_groups.values() for p in ps):  # FSDP2: each matrix's Newton-Schulz runs once, on its owner rank
            from nanokimi.optim.dist_muon import DistributedMuon as muon_class
        else:
            muon_class = Muon
        optimizers["muon"] = muon_class(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                        ns_steps=ns_steps, coefficients=coefficients, ns_dtype=ns_dtype,
                                        **(muon_execution or {}))
    if adamw_params:
        optimizers["adamw"] = _adamw([{"params": adamw_params}], lr, betas, eps, weight_decay)
    if not optimizers:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return OptimizerSet(optimizers, assignments)
