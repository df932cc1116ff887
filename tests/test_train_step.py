"""The Trainer's step: which path it picks (eager / compiled / whole-step CUDA graph), that every path runs the
same step, and that benchmarks/train_step.py times that very step."""
import dataclasses
import inspect
import sys
from pathlib import Path

import pytest
import torch

from nanokimi.config import ConfigError
from nanokimi.train import step as step_module
from nanokimi.train.config import load_run_config
from nanokimi.train.step import TrainStep, build_model_and_optimizer, choose_step, plan_loss

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.mixers=KA", "model.num_heads=2", "model.kv_lora_rank=32",
         "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.kda_num_heads=2",
         "model.kda_head_dim=16", "model.intermediate_size=128", "model.num_experts=4",
         "model.moe_intermediate_size=32", "model.vocab_size=300", "train.batch_size=4", "train.seq_len=32"]
GPU = 80 << 30  # a fake GPU's memory


def run_config(*extra):
    return load_run_config(None, None, [*SMALL, *extra])


def test_cpu_runs_the_eager_step_and_says_why():
    plan = choose_step(run_config(), "cpu")
    assert (plan.name, plan.compile, plan.graph, plan.optimizer_graph, plan.loss_chunk) == ("eager", False, False,
                                                                                           False, 8192)
    assert plan.describe().startswith("step=eager (not compiled") and "cpu: compile and CUDA graphs are for CUDA" in \
        plan.describe()
    fake_cuda = choose_step(run_config(), "cuda", cuda=False)  # a CUDA device name on a machine without CUDA
    assert fake_cuda.name == "eager" and not fake_cuda.graph


def test_cuda_picks_the_whole_step_graph_where_it_is_valid():
    plan = choose_step(run_config(), "cuda", cuda=True, memory=GPU)
    assert (plan.name, plan.compile, plan.graph, plan.optimizer_graph, plan.loss_chunk) == ("graph", True, True,
                                                                                           False, 0)
    assert plan.describe() == "step=graph (compiled, whole step in one CUDA graph, loss in one piece)"
    sharded = choose_step(run_config(), "cuda", world_size=2, cuda=True, memory=GPU)
    assert (sharded.name, sharded.graph, sharded.optimizer_graph) == ("compiled", False, False)
    assert "2 processes" in sharded.describe()
    packed = choose_step(run_config(), "cuda", fixed_batches=False, cuda=True, memory=GPU)  # SFT: as before
    assert (packed.compile, packed.graph, packed.optimizer_graph, packed.loss_chunk) == (False, False, False, 8192)
    no_graph = choose_step(run_config("train.cuda_graph=false"), "cuda", cuda=True, memory=GPU)
    assert (no_graph.name, no_graph.optimizer_graph) == ("compiled", True)
    assert "optimizer step in one CUDA graph" in no_graph.describe()
    big_logits = choose_step(run_config("model.vocab_size=163840", "train.seq_len=4096", "train.batch_size=64"),
                             "cuda", cuda=True, memory=GPU)
    assert big_logits.loss_chunk == 8192  # 64 x 4096 x 163840 fp32 logits are far over a tenth of the GPU


def test_forced_paths_are_obeyed_or_refused_with_a_clear_error():
    assert choose_step(run_config("train.compile=true"), "cpu").compile
    assert choose_step(run_config("optim.cuda_graph=true"), "cpu").optimizer_graph  # CapturedStep warns, as before
    with pytest.raises(ConfigError, match="train.cuda_graph=true cannot run here .cpu"):
        choose_step(run_config("train.cuda_graph=true"), "cpu")
    with pytest.raises(ConfigError, match="optim.cuda_graph=true works in a single process only"):
        choose_step(run_config("optim.cuda_graph=true"), "cuda", world_size=2, cuda=True, memory=GPU)
    with pytest.raises(ConfigError, match="whole step is one CUDA graph already"):
        choose_step(run_config("optim.cuda_graph=true"), "cuda", cuda=True, memory=GPU)
    with pytest.raises(ConfigError, match="train.compile='fast' must be true, false or auto"):
        run_config("train.compile=fast")


class ReplayEagerly:
    """Stands in for a CUDA graph on the CPU: replay() calls the recorded function again."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def replay(self):
        self.calls += 1
        return self.fn()


def test_graph_path_warms_up_then_replays_the_same_step(monkeypatch):
    # the CPU cannot capture, so the graph is a stand-in that re-runs the recorded function on the same input
    # tensors: what is checked is the path's logic (eager warm-up steps, the batches copied into fixed inputs,
    # the capture, the replays) against the plain step, step by step, with QK-Clip clipping and grad accumulation
    captured = []

    def fake_capture(fn, warmup=0, pool=None, error_mode=None):
        captured.append(ReplayEagerly(fn))
        return captured[-1]

    monkeypatch.setattr(step_module, "capture", fake_capture)
    monkeypatch.setattr(step_module, "run_on_side_stream", lambda fn, times=1: [fn() for _ in range(times)])
    monkeypatch.setattr(TrainStep, "_with_tensor_lrs", lambda self, fn, *args: fn(*args))  # CPU AdamW: float lrs
    run = run_config("optim.qk_clip_tau=5", "train.grad_accum=2")

    def losses(graph: bool):
        torch.manual_seed(0)
        plan = dataclasses.replace(choose_step(run, "cpu"), graph=graph)
        model, optimizer = build_model_and_optimizer(run, torch.device("cpu"), plan)
        step = TrainStep(model, optimizer, run, plan, torch.device("cpu"), plan_loss(model, plan))
        generator = torch.Generator().manual_seed(1)
        values = []
        for i in range(6):
            batches = [tuple(torch.randint(0, 300, (2, 32), generator=generator) for _ in range(2)) for _ in range(2)]
            values.append(step(batches, 1.0 - 0.1 * i).item())
            assert step.graphed == (graph and i >= 3)
        return values, model

    (plain, plain_model), (graphed, graphed_model) = losses(False), losses(True)
    assert len(captured) == 1 and captured[0].calls == 3  # steps 1-3 warm up, step 4 is captured and replayed
    assert graphed == plain
    for a, b in zip(plain_model.state_dict().values(), graphed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_trainer_and_benchmark_run_the_same_step(tmp_path, monkeypatch):
    from nanokimi.train.trainer import Trainer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step as bench

    assert bench.TrainStep is TrainStep and bench.choose_step is choose_step
    assert bench.build_model_and_optimizer is build_model_and_optimizer
    source = inspect.getsource(bench)
    assert ".backward(" not in source.split("def run_gpt_peer")[0]  # nanokimi's step is not written out there
    spec = dict(preset="tiny", overrides=dict(vocab_size=300, num_layers=2, mixers="KA"), B=2, T=32)
    step = bench.build_trainer_step(spec, torch.device("cpu"))
    assert type(step) is TrainStep and step.plan == choose_step(step.run, "cpu")
    assert step.run.optim.name == "muon" and step.run.optim.qk_clip and step.optimizer.optimizers.keys() == {
        "muon", "adamw"}

    monkeypatch.setenv("NANOKIMI_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}."
                                  for i in range(800)))
    trainer = Trainer(load_run_config("tiny", None, [f"data.source={corpus}", "data.vocab_size=300",
                                                     "model.num_layers=2", "model.mixers=KA", "train.batch_size=2",
                                                     "train.seq_len=32"]), tmp_path / "run", progress=False)
    assert type(trainer.step_fn) is TrainStep and trainer.plan == step.plan
    calls = []
    monkeypatch.setattr(TrainStep, "body", lambda self, batches: calls.append(len(batches)) or torch.zeros(()))
    assert trainer.train_step() == 0.0 and calls == [1]


def test_benchmark_quick_run_times_the_trainer_step(tmp_path):
    import json
    import subprocess

    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--configs",
                           "bench-kl-900m", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads(out.read_text())["results"]["bench-kl-900m"]["nanokimi"]
    assert row["path"].startswith("step=eager") and row["optimizer"] == "muon + qk_clip" and row["tokens_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_whole_step_graph_on_gpu_follows_the_eager_step(compiled):
    # MLA + MoE (no KDA: no fla autotuning), Muon + AdamW, QK-Clip low enough to clip, router bias, grad accumulation
    run = run_config("model.mixers=A", "train.device=cuda", "optim.qk_clip_tau=5", "optim.router_bias_rate=0.01",
                     "train.grad_accum=2", f"train.compile={str(compiled).lower()}")
    device = torch.device("cuda")

    def losses(graph: bool):
        torch.manual_seed(0)
        plan = dataclasses.replace(choose_step(run, device), graph=graph, optimizer_graph=False)
        model, optimizer = build_model_and_optimizer(run, device, plan)
        step = TrainStep(model, optimizer, run, plan, device, plan_loss(model, plan))
        generator = torch.Generator().manual_seed(1)
        values = []
        for i in range(7):
            batches = [tuple(torch.randint(0, 300, (2, 32), generator=generator).to(device) for _ in range(2))
                       for _ in range(2)]
            values.append(step(batches, 1.0 - 0.1 * i).item())
        assert step.graphed == graph and step.failed is None
        return values

    eager, graphed = losses(False), losses(True)
    for a, b in zip(eager, graphed):  # bf16 autocast and atomics: close, not bitwise
        assert abs(a - b) <= 2e-2 * abs(a), (eager, graphed)
