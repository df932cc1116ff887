"""nanokimi.runtime: the one home of torch.compile, CUDA-graph capture, FSDP row arithmetic and backend probes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanokimi.runtime.graphs import capture
from nanokimi.runtime.rows import scale_rows_, shard_rows

PACKAGE = Path(__file__).resolve().parents[1] / "nanokimi"
# what only nanokimi/runtime may do: call torch.compile or Module.compile, record CUDA graphs, set dynamo's config
ONLY_IN_RUNTIME = re.compile(r"torch\.compile\(|\.compile\(\*\*|torch\.cuda\.graph\(|CUDAGraph\(|_dynamo\.config")


def test_speed_machinery_has_one_home():
    offenders = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.parent.name != "runtime"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if ONLY_IN_RUNTIME.search(line) and not line.lstrip().startswith("#")]
    assert not offenders, "route these through nanokimi.runtime:\n" + "\n".join(offenders)
    model_attention = (PACKAGE / "model" / "attention.py").read_text()
    assert "DTensor" not in model_attention and "get_device_capability" not in model_attention


def test_shard_rows_and_scale_rows():
    assert [shard_rows(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [shard_rows(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    weight = torch.randn(6, 5)
    before = weight.clone()
    factors = torch.tensor([1.0, 0.5, 1.0, 0.25, 1.0, 1.0])
    scale_rows_(weight, factors)
    assert torch.equal(weight[[0, 2, 4, 5]], before[[0, 2, 4, 5]])  # factor 1: bit-identical
    assert torch.equal(weight[1], before[1] * 0.5) and torch.equal(weight[3], before[3] * 0.25)


def test_capture_needs_cuda_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        capture(lambda: torch.zeros(()))


@pytest.mark.gpu
def test_capture_replays_with_new_inputs_and_a_shared_pool():
    from nanokimi.runtime.graphs import graph_pool

    x = torch.ones(4, device="cuda")
    pool = graph_pool()
    double = capture(lambda: x * 2, warmup=2, pool=pool)
    square = capture(lambda: x * x, pool=pool)
    x.copy_(torch.arange(4.0))
    assert torch.equal(double.replay(), torch.arange(4.0, device="cuda") * 2)
    assert torch.equal(square.replay(), torch.arange(4.0, device="cuda") ** 2)


@pytest.mark.gpu
def test_qk_clip_makes_no_host_sync():
    from nanokimi.config import ModelConfig
    from nanokimi.model import build_model
    from nanokimi.optim.qk_clip import clip_heads_, enable_qk_clip_recording

    model = build_model(ModelConfig.preset("tiny", mixers="AG", num_layers=2, num_kv_heads=2), device="cuda")
    enable_qk_clip_recording(model)
    model.loss(torch.randint(0, 4096, (2, 64), device="cuda"), torch.randint(0, 4096, (2, 64), device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert len(clip_heads_(model, tau=1e-3)) == 2  # tau this low clips every head
    finally:
        torch.cuda.set_sync_debug_mode("default")


def clip_heads_one_by_one(module, tau):
    """The readable QK-Clip: find the heads over tau on the host, rescale their rows one head at a time."""
    with torch.no_grad():
        for h, max_logit in enumerate(module.max_logits):
            if not max_logit > tau:
                continue
            g = tau / max_logit  # 0-d fp32
            if hasattr(module, "head_dim"):  # GQA / MHA
                d = module.head_dim
                module.q_proj.weight[h * d:(h + 1) * d] *= g.sqrt() if module.num_kv_heads == module.num_heads else g
                if module.num_kv_heads == module.num_heads:
                    module.k_proj.weight[h * d:(h + 1) * d] *= g.sqrt()
            else:  # MLA: q_nope, k_nope by sqrt(gamma), q_rope by gamma
                dq, dkv, dn = module.nope_dim + module.rope_dim, module.nope_dim + module.v_dim, module.nope_dim
                module._q_weight()[h * dq:h * dq + dn] *= g.sqrt()
                module._q_weight()[h * dq + dn:(h + 1) * dq] *= g
                module.kv_b_proj.weight[h * dkv:h * dkv + dn] *= g.sqrt()


@pytest.mark.parametrize("settings", [dict(mixers="G", num_kv_heads=4), dict(mixers="G", num_kv_heads=2),
                                      dict(mixers="A"), dict(mixers="A", q_lora_rank=32)])
def test_qk_clip_on_the_device_equals_the_head_by_head_clip(settings):
    from nanokimi.config import ModelConfig
    from nanokimi.model.attention import GroupedQueryAttention, MultiHeadLatentAttention

    cfg = ModelConfig.preset("tiny", **settings)
    kind = GroupedQueryAttention if settings["mixers"] == "G" else MultiHeadLatentAttention
    torch.manual_seed(0)
    fast = kind(cfg)
    reference = kind(cfg)
    reference.load_state_dict(fast.state_dict())
    fast.max_logits = reference.max_logits = torch.tensor([50.0, 150.0, 99.9, 1000.0])
    fast.qk_clip_(100.0)
    clip_heads_one_by_one(reference, 100.0)
    for name, value in reference.state_dict().items():
        assert torch.equal(fast.state_dict()[name], value), name  # bit for bit, untouched heads included


FREEZE_PROBE = """
import gc, weakref
from nanokimi.config import ModelConfig
from nanokimi.infer import Engine
from nanokimi.model import build_model
from nanokimi.runtime.host import freeze_startup_objects
assert gc.get_freeze_count() == 0
engine = Engine(build_model(ModelConfig.preset("tiny")), max_cache_tokens=64)
frozen = gc.get_freeze_count()
assert frozen > 10_000, frozen
gc.disable()
second = Engine(build_model(ModelConfig.preset("tiny-dense")), max_cache_tokens=64)
assert gc.get_freeze_count() == frozen and not freeze_startup_objects()
engine_ref, model_ref = weakref.ref(second), weakref.ref(second.model)
del second
assert engine_ref() is None and model_ref() is None  # freed by reference counting alone: no cycles to leak
del engine
print("ok")
"""


def test_the_first_engine_freezes_start_up_objects_and_engines_are_still_freed():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", FREEZE_PROBE], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
