"""FSDP2 data parallelism on the CPU (gloo, 2 processes): same losses as one process with the same global
batch (with and without resharding after forward), distributed Muon equal to Muon (one bucket and several),
and checkpoints that move between 2 ranks and 1.

One spawn of two processes does all the 2-rank work (spawning costs ~10 s per process on a loaded box);
the single-process reference and the 1-rank resume run in the test process."""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import rel_err

STEPS, SAVE_AT = 20, 10
MUON_SHAPES = [  # (shape, heads, split): even and uneven row shards, per-head, split, experts, fewer rows than ranks,
    # tall and wide blocks of equal sides (6x4 / 4x6), gram batches of one short side (2x4 heads, 9x2)
    ((12, 8), None, None), ((5, 7), None, None), ((3, 6, 4), None, None), ((16, 6), 4, None),
    ((10, 4), None, (6, 4)), ((12, 4), 2, (8, 4)), ((1, 5, 3), None, None), ((9, 2), None, None),
]


def _overrides(root):
    return [f"data.source={root / 'corpus'}", f"data.dir={root / 'data'}", "data.vocab_size=300",
            "model.hidden_size=64", "model.num_layers=2", "model.mixers=KA", "train.seq_len=32", "train.batch_size=4",
            f"train.max_steps={STEPS}", "train.device=cpu", "train.sample_tokens=0", "optim.qk_clip_tau=0.1"]


def _trainer(root, out, resume=False, rank=0, world_size=1, extra=()):
    from nanokimi.train.config import load_run_config
    from nanokimi.train.trainer import Trainer

    run = load_run_config("tiny", None, [*_overrides(root), *extra])
    return Trainer(run, out, resume=resume, progress=False, rank=rank, world_size=world_size)


def _muon_check(rank, world_size):
    """Muon and DistributedMuon from the same weights and gradients for 3 steps; returns rel errors."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from nanokimi.optim.dist_muon import DistributedMuon
    from nanokimi.optim.muon import Muon

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(shape, generator=gen) for shape, *_ in MUON_SHAPES]
    plain = [torch.nn.Parameter(w.clone()) for w in weights]
    sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]

    def groups(params):
        return [{"params": [p], "heads": heads, "split": split} for p, (_, heads, split) in zip(params, MUON_SHAPES)]

    single, distributed = Muon(groups(plain), lr=0.05), DistributedMuon(groups(sharded), lr=0.05)
    for _ in range(3):
        for p, q in zip(plain, sharded):
            grad = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = grad.clone(), distribute_tensor(grad.clone(), mesh, [Shard(0)])
        single.step()
        distributed.step()
    errors = [rel_err(q.full_tensor(), p) for p, q in zip(plain, sharded)]
    return errors, [rel_err(p, w) for p, w in zip(plain, weights)]


def _worker(rank, world_size, port, root):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = {"muon": _muon_check(rank, world_size)}
        trainer = _trainer(root, root / "two", rank=rank, world_size=world_size)
        losses = []
        for step in range(STEPS):
            losses.append(trainer.train_step())
            if step + 1 == SAVE_AT:
                trainer.save()
        result["two"] = losses
        resumed = _trainer(root, root / "one_to_two", resume=True, rank=rank, world_size=world_size,
                           extra=["train.fsdp_reshard=true"])  # the other FSDP schedule: gather again in backward
        result["one_to_two"] = [resumed.train_step() for _ in range(STEPS - SAVE_AT)]
        result["embed_rows"] = (trainer.model.embed.weight.to_local().shape[0], trainer.model.embed.weight.shape[0])
        if rank == 0:
            torch.save(result, root / "result.pt")
    finally:
        dist.destroy_process_group()


def _write_corpus(root):
    corpus = root / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog while experts route tokens across ranks".split()
    gen = torch.Generator().manual_seed(0)
    for d in range(12):
        picks = torch.randint(len(words), (600,), generator=gen).tolist()
        (corpus / f"doc{d}.txt").write_text("\n".join(" ".join(words[i] for i in picks[k:k + 12])
                                                      for k in range(0, 600, 12)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process reference (saving at step 10), then the 2-rank runs, then the 2 -> 1 resume."""
    root = tmp_path_factory.mktemp("dist")
    _write_corpus(root)
    reference = _trainer(root, root / "one")
    losses = []
    for step in range(STEPS):
        losses.append(reference.train_step())
        if step + 1 == SAVE_AT:
            reference.save()
            shutil.copytree(root / "one" / "checkpoints", root / "one_to_two" / "checkpoints")
    mp.spawn(_worker, args=(2, _free_port(), root), nprocs=2, join=True)
    result = torch.load(root / "result.pt")
    resumed = _trainer(root, root / "two", resume=True)
    result["two_to_one"] = [resumed.train_step() for _ in range(STEPS - SAVE_AT)]
    result["one"], result["root"] = losses, root
    return result


def _rel(a, b):
    return rel_err(torch.tensor(a), torch.tensor(b))


ATTNRES = ["model.attn_res=block", "model.attn_res_blocks=2"]


def _attnres_worker(rank, world_size, port, root):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer = _trainer(root, root / "two", rank=rank, world_size=world_size, extra=ATTNRES)
        losses = [trainer.train_step() for _ in range(4)]
        if rank == 0:
            torch.save(losses, root / "losses.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_attnres_with_fused_norms_matches_single_process(tmp_path):
    """Block AttnRes under FSDP2 (every mixer and FFN its own unit; the norms, whose weights the fused merge + norm
    reads straight from the root, stay with the root): the 2-rank losses equal one process's."""
    _write_corpus(tmp_path)
    single = _trainer(tmp_path, tmp_path / "one", extra=ATTNRES)
    assert single.model.residual.fuse_norm and single.model.residual.mode == "block"
    reference = [single.train_step() for _ in range(4)]
    mp.spawn(_attnres_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    assert _rel(torch.load(tmp_path / "losses.pt"), reference) <= 1e-5


def test_fsdp_losses_match_single_process(runs):
    assert len(runs["two"]) == STEPS and runs["one"][-1] < runs["one"][0] - 0.5  # it learns
    for step, (a, b) in enumerate(zip(runs["two"], runs["one"])):
        assert abs(a - b) / abs(b) <= 1e-5, f"step {step + 1}: 2 ranks {a} vs 1 process {b}"
    local, total = runs["embed_rows"]
    assert local == total // 2  # the embedding is really sharded: each rank holds half the vocabulary rows


def test_distributed_muon_matches_muon(runs):
    errors, moved = runs["muon"]
    assert min(moved) > 1e-3  # the weights did move
    assert max(errors) <= 1e-6, errors


def test_resume_two_ranks_to_one(runs):
    assert _rel(runs["two_to_one"], runs["one"][SAVE_AT:]) <= 1e-5


def test_resume_one_to_two_ranks(runs):
    assert _rel(runs["one_to_two"], runs["one"][SAVE_AT:]) <= 1e-5


def test_export_sharded_checkpoint(runs, tmp_path):
    from safetensors.torch import load_file

    from nanokimi.checkpoint import load_model_checkpoint, resolve_checkpoint
    from nanokimi.train.sharded_checkpoint import export_checkpoint, is_sharded_checkpoint

    sharded = resolve_checkpoint(runs["root"] / "two")
    assert is_sharded_checkpoint(sharded) and not (sharded / "model.safetensors").exists()
    out = export_checkpoint(sharded, tmp_path / "export")
    model = load_model_checkpoint(out)  # what `nanokimi generate --ckpt` loads
    # both folders hold step 10 (the resumed runs did not save): the 2-rank weights equal the 1-process ones
    single = load_file(str(resolve_checkpoint(runs["root"] / "one_to_two") / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(single)
    for name, tensor in single.items():
        assert rel_err(exported[name], tensor) <= 1e-5, name
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    assert model.embed.weight.shape[1] == 64


def test_launch_drops_nproc():
    from nanokimi.train.launch import _without_nproc

    assert _without_nproc(["--nproc", "2", "--preset", "tiny", "--nproc=4", "train.max_steps=3"]) == [
        "--preset", "tiny", "train.max_steps=3"]


def test_benchmark_quick(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed.py"
    subprocess.run([sys.executable, str(script), "--quick", "--one-gpu-accum", "2", "--out", str(tmp_path / "d.json")],
                   check=True, capture_output=True, timeout=300)
    rows = {(r["gpus"], r["variant"]): r for r in json.loads((tmp_path / "d.json").read_text())["rows"]}
    assert set(rows) == {(1, "default"), (1, "per-rank-batch"), (2, "default"), (2, "reshard"), (2, "bf16-reduce")}
    assert rows[1, "per-rank-batch"]["batch_size"] * 2 == rows[1, "default"]["batch_size"] == 4
    # the 1-GPU global-batch row accumulates 2 micro-batches of 2 (the 2-rank run's per-rank batch); no other row does
    assert [key for key, r in rows.items() if r["grad_accum"] != 1] == [(1, "default")]
    assert rows[1, "default"]["grad_accum"] == 2
    assert all(r["weak_scaling_efficiency"] > 0 for r in rows.values())
    assert all(r["tokens_per_s"] > 0 and 0 < r["optimizer_share"] < 1 for r in rows.values())
    assert all(0 < r["optimizer_host_ms"] <= r["optimizer_ms"] for r in rows.values())  # host part, then the sync
    assert all(set(r["phase_ms"]) == {"forward", "backward", "statistics", "clip", "optimizer", "after"}
               for r in rows.values())
    calls = {key: r["collective_calls"] for key, r in rows.items()}
    assert calls[1, "default"] == {} == calls[1, "per-rank-batch"]  # one process: no collectives at all
    assert calls[2, "default"]["all_to_all_single"] == 2
    gathers = {key: sum(n for name, n in c.items() if name.startswith("all_gather")) for key, c in calls.items()}
    units = 2  # tiny quick model: 2 blocks, one FSDP unit each (PreNorm residual)
    assert gathers[2, "default"] == units + 1 and gathers[2, "reshard"] == 2 * units + 1


def test_benchmark_quick_compiled_under_fsdp(tmp_path):
    """compile_model after fully_shard: blocks holding FSDP units compile module by module (their hooks
    stay outside the graphs), so the compiled 2-rank step runs."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed.py"
    subprocess.run([sys.executable, str(script), "--quick", "--compile", "--variants", "default",
                    "--out", str(tmp_path / "d.json")], check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert {(r["gpus"], r["variant"]) for r in rows} == {(1, "default"), (1, "per-rank-batch"), (2, "default")}
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_distributed_muon_fused_passes_compiled_equal_eager():
    """The four data passes of DistributedMuon as torch.compile runs them on CUDA, against the eager
    functions: shards of odd sizes, an empty shard, 3-D experts with two segments along dim 1, a matrix cut
    into heads and split pieces whose shards come from two ranks."""
    import torch

    from nanokimi.optim.dist_muon import decay_and_apply, momentum_and_pack, pack_returns, unpack_owned

    def run(fused):
        g = torch.Generator().manual_seed(0)
        compile_if = (lambda f: torch.compile(f, fullgraph=True)) if fused else (lambda f: f)
        shapes = [(5, 7), (0, 7), (2, 6, 4), (3, 9)]
        grads = [torch.randn(s, generator=g) for s in shapes]
        bufs = [torch.randn(s, generator=g) for s in shapes]
        weights = [torch.randn(s, generator=g) for s in shapes]
        send = compile_if(momentum_and_pack)(grads, bufs, [0.95, 0.9, 0.95, 0.8], [True, True, False, True],
                                             (3, 0, 1, 2), torch.float32)
        orthogonal = torch.randn(5 * 7 + 3 * 9 + 2 * 6 * 4, generator=g)
        layout = ((27, (5, 7), ((0, 0, 5, 0.7),)), (62, (0, 7), ()),
                  (62, (2, 6, 4), ((1, 0, 2, 0.4), (1, 2, 6, 0.9))), (0, (3, 9), ((0, 0, 1, 0.3), (0, 1, 3, 0.5))))
        compile_if(decay_and_apply)(weights, orthogonal, torch.tensor([0.01, 0.02]), (0, 1, 1, 0),
                                    [0.1, 0.0, 0.1, 0.2], layout)
        # owned: a [6, 4] matrix in split (4, 2) x heads 2 blocks (rows 0-2 from rank 0, 3-5 from rank 1), and
        # a [5, 3] matrix (rows 0-2, 3-4); received: rank 0's chunk, then rank 1's
        received = torch.randn(3 * 4 + 3 * 3 + 3 * 4 + 2 * 3, generator=g)
        jobs = (((6, 4), 2, (4, 2), ((0, 3), (21, 3))), ((5, 3), None, None, ((12, 3), (33, 2))))
        batches = (((2, 4), ((0, 0),)), ((1, 4), ((0, 1),)), ((5, 3), ((1, 0),)))
        inputs = compile_if(unpack_owned)(received, (jobs, batches))
        returns = (((6, 4), ((0, 0, (1, 2, 2, 4)), (1, 0, (1, 2, 1, 4))), ((0, 3), (3, 6))),
                   ((5, 3), ((2, 0, (1, 5, 3)),), ((0, 3), (3, 5))))
        back = compile_if(pack_returns)([x * 2 for x in inputs], returns)
        return [send, *bufs, *weights, *inputs, back]

    for a, b in zip(run(True), run(False)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_distributed_muon_unpack_and_return_round_trip():
    """pack_returns(unpack_owned(x)) gives back x's rows in per-rank order: the layouts agree on where every
    shard and block sits (matrix [6, 4] as split (4, 2) x 2 heads from two ranks, and a whole [5, 3])."""
    import torch

    from nanokimi.optim.dist_muon import pack_returns, unpack_owned

    a, b = torch.arange(24.).view(6, 4), 100 + torch.arange(15.).view(5, 3)
    received = torch.cat([a[:3].flatten(), b[:3].flatten(), a[3:].flatten(), b[3:].flatten()])
    jobs = (((6, 4), 2, (4, 2), ((0, 3), (21, 3))), ((5, 3), None, None, ((12, 3), (33, 2))))
    batches = (((2, 4), ((0, 0),)), ((1, 4), ((0, 1),)), ((5, 3), ((1, 0),)))
    inputs = unpack_owned(received, (jobs, batches))
    assert torch.equal(inputs[0], a[:4].view(2, 2, 4)) and torch.equal(inputs[1], a[4:].view(2, 1, 4))
    assert torch.equal(inputs[2], b[None])
    returns = (((6, 4), ((0, 0, (1, 2, 2, 4)), (1, 0, (1, 2, 1, 4))), ((0, 3), (3, 6))),
               ((5, 3), ((2, 0, (1, 5, 3)),), ((0, 3), (3, 5))))
    assert torch.equal(pack_returns(inputs, returns), received)


def test_clip_grad_norm_equals_torch_on_plain_tensors():
    import torch

    from nanokimi.train.distributed import clip_grad_norm_

    for max_norm in (0.5, 1e3):  # clipped, and left alone
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 3), (5,), (2, 4, 3)]]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape) * 3
            q.grad = p.grad.clone()
        norm = clip_grad_norm_(a, max_norm)
        expected = torch.nn.utils.clip_grad_norm_(b, max_norm)
        assert torch.allclose(norm, expected, rtol=1e-6)
        assert all(torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-8) for p, q in zip(a, b))
