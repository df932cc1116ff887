"""nanokimi rl on the CPU: sampler, partial rollouts, learning on a toy verifiable task (and not learning with
the reward's sign flipped), exact resume, the CLI on the ladder task, and two gloo ranks against one process."""
import json
import math
import os
import random
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rl_toy import CharTokenizer, CopyDigit, Flipped, tiny_model

from nanokimi.config import ConfigError
from nanokimi.post.rl.config import load_rl_config
from nanokimi.post.rl.loop import RLTrainer
from nanokimi.post.rl.rollout import EngineBackend, Group, ReferenceBackend, Response, RolloutBuffer
from nanokimi.post.rl.sampler import PromptSampler, informative
from nanokimi.tasks import Example

TOY = ["rl.samples_per_prompt=8", "rl.max_tokens=2", "rl.eval_per_level=2", "rl.eval_samples=4", "rl.eval_ks=1,4",
       "optim.name=adamw", "optim.lr=0.01", "rl.tau=0.5", "rl.save_every=1000"]


def toy_trainer(tmp_path, overrides, task=None, resume=False, name="run", seed=0, **kwargs):
    run = load_rl_config(None, [*TOY, *overrides])
    return RLTrainer(run, tiny_model(seed), CharTokenizer(), task or CopyDigit(), tmp_path / name, resume=resume,
                     progress=False, **kwargs)


def test_sampler_curriculum_and_priorities():
    examples = [Example(id=f"{d}/{i}", question="", answer="", difficulty=d) for d in (1, 2, 3) for i in range(4)]
    sampler = PromptSampler(examples, curriculum="linear", curriculum_steps=10, prioritized=True, floor=0.0)
    rng = random.Random(0)
    assert {e.difficulty for e in sampler.sample(50, step=0, rng=rng)} == {1}
    assert {e.difficulty for e in sampler.sample(200, step=5, rng=rng)} == {1, 2}
    assert {e.difficulty for e in sampler.sample(300, step=10, rng=rng)} == {1, 2, 3}
    solved = [e.id for e in examples if e.difficulty == 1]
    for example_id in solved:
        sampler.update(example_id, [True, True])  # success rate 1 -> weight 0 with floor 0
    assert not {e.id for e in sampler.sample(200, step=10, rng=rng)} & set(solved)
    restored = PromptSampler(examples, curriculum="linear", curriculum_steps=10, prioritized=True, floor=0.0)
    restored.load_state_dict(sampler.state_dict())
    assert restored.seen == sampler.seen
    assert informative([0.0, 1.0]) and not informative([1.0, 1.0])


def test_config_errors():
    with pytest.raises(ConfigError, match="rl.loss"):
        load_rl_config(None, ["rl.loss=ppo"])
    with pytest.raises(ConfigError, match="Did you mean"):
        load_rl_config(None, ["rl.temprature=0.5"])
    with pytest.raises(ConfigError, match="eval_samples"):
        load_rl_config(None, ["rl.eval_ks=1,32", "rl.eval_samples=16"])
    with pytest.raises(ConfigError, match="section rl or optim"):
        load_rl_config(None, ["train.max_steps=3"])
    assert load_rl_config(None, ["rl.task_levels=4"]).rl.task_levels == "4"  # a one-level text typed as a number


def _groups(prompts):
    return [Group(str(i), None, p, [Response(), Response()]) for i, p in enumerate(prompts)]


def test_partial_rollouts_continue_to_the_uncut_tokens():
    """Greedy: responses cut by a 3-token budget, continued over later iterations, equal the uncut ones; the
    engine over the live model equals the reference generator."""
    model, tok = tiny_model(1), CharTokenizer()
    prompts = [tok.encode("12+3="), tok.encode("7="), tok.encode("40-1=")]
    engine = EngineBackend(model, tok, max_num_seqs=8, max_cache_tokens=512)
    whole = RolloutBuffer(engine, max_tokens=10, temperature=0.0)
    done, _ = whole.run(_groups(prompts), step=0)
    assert len(done) == 3 and not whole.pending
    reference = RolloutBuffer(ReferenceBackend(model, tok), max_tokens=10, temperature=0.0)
    ref_done, _ = reference.run(_groups(prompts), step=0)
    assert [[r.token_ids for r in g.responses] for g in ref_done] == [[r.token_ids for r in g.responses] for g in done]
    cut = RolloutBuffer(engine, max_tokens=10, segment_tokens=3, temperature=0.0)
    finished, iterations = cut.run(_groups(prompts), step=0)[0], 1
    assert cut.pending, "the budget should leave responses unfinished"
    while cut.pending:
        finished += cut.run([], step=iterations)[0]
        iterations += 1
    assert iterations > 1
    by_id = {g.id: g for g in finished}
    for g in done:
        assert [r.token_ids for r in by_id[g.id].responses] == [r.token_ids for r in g.responses]
        assert all(r.segments > 1 for r in by_id[g.id].responses if len(r.token_ids) > 3)


def test_seer_rollout_options_keep_greedy_rollouts():
    """rl.speculative / rl.scheduling / rl.chunk_tokens reach the engine: greedy rollouts with Seer's suffix
    drafts over a prompt's group, context-aware scheduling and divided rollout equal the plain engine's."""
    model, tok = tiny_model(1), CharTokenizer()
    prompts = [tok.encode("12+3="), tok.encode("7="), tok.encode("40-1=")]
    plain = RolloutBuffer(EngineBackend(model, tok, max_num_seqs=8, max_cache_tokens=512), max_tokens=10,
                          temperature=0.0).run(_groups(prompts), step=0)[0]
    seer = EngineBackend(model, tok, max_num_seqs=8, max_cache_tokens=512, speculative="suffix",
                         num_speculative_tokens=3, scheduling="context_aware", chunk_tokens=4)
    done = RolloutBuffer(seer, max_tokens=10, temperature=0.0).run(_groups(prompts), step=0)[0]
    assert [[r.token_ids for r in g.responses] for g in done] == [[r.token_ids for r in g.responses] for g in plain]
    assert seer.engine.scheduler.policy == "context_aware" and seer.engine.drafter is not None
    run = load_rl_config(None, [*TOY, "rl.speculative=ngram", "rl.scheduling=context_aware", "rl.chunk_tokens=8"])
    assert (run.rl.speculative, run.rl.scheduling, run.rl.chunk_tokens) == ("ngram", "context_aware", 8)


def _accuracy_curve(tmp_path, loss, task, steps=30):
    trainer = toy_trainer(tmp_path, [f"rl.loss={loss}", f"rl.steps={steps}", "rl.prompts_per_step=16"], task=task,
                          name=f"{loss}-{task.__class__.__name__}")
    return [trainer.train_step()["accuracy"] for _ in range(steps)]


@pytest.mark.parametrize("loss", ["k1.5", "grpo"])
def test_rl_raises_reward_and_fails_with_the_sign_flipped(tmp_path, loss):
    """From chance (1/16) on copy-the-digit, a short run lifts accuracy clearly; with the reward's sign flipped
    (the advantage's sign flipped) the same run drives it down."""
    curve = _accuracy_curve(tmp_path, loss, CopyDigit())
    start, end = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert start < 0.15 and end > start + 0.2, curve
    flipped = _accuracy_curve(tmp_path, loss, Flipped())
    assert sum(flipped[-5:]) / 5 < 0.05, flipped


def _records(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "reward_mean" in r}


def test_resume_mid_run_gives_identical_rewards_and_losses(tmp_path):
    settings = ["rl.steps=6", "rl.prompts_per_step=4", "rl.segment_tokens=1", "rl.loss=grpo",
                "rl.length_penalty=0.1", "rl.prioritized=true", "rl.dynamic_sampling=true"]
    whole = toy_trainer(tmp_path, settings, name="whole")
    whole.fit()
    first = toy_trainer(tmp_path, settings, name="cut")
    for _ in range(3):
        first.log(first.train_step())
    assert first.buffer.pending, "partial rollouts should leave work for the resumed run"
    assert first.save() == tmp_path / "cut" / "checkpoints" / "step-3"
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step-3"
    shutil.copytree(tmp_path / "cut" / "checkpoints" / "step-3", tmp_path / "old" / "checkpoint")  # pre-rel layout
    assert toy_trainer(tmp_path, settings, name="old", resume=True).step == 3
    resumed = toy_trainer(tmp_path, settings, name="cut", resume=True, seed=5)  # other init: weights come from disk
    assert resumed.step == 3
    resumed.fit()
    a, b = _records(tmp_path / "whole"), _records(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert sum(r["groups"] for r in a.values()) >= 4 and any(r["loss"] != 0 for r in a.values()), a
    for step in a:
        for key in ("reward_mean", "accuracy", "length_mean", "groups", "groups_finished"):
            assert a[step][key] == b[step][key] or (a[step][key] != a[step][key] and b[step][key] != b[step][key]), \
                (step, key)  # equal, or both nan (no group finished yet)
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-7), step
    with pytest.raises(Exception, match="already holds an RL run"):
        toy_trainer(tmp_path, settings, name="cut")


def test_cli_on_a_kimi_tiktoken_base_keeps_its_tokenizer_files(tmp_path):
    """`nanokimi rl` from a base that ships Kimi's tiktoken.model + tokenizer_config.json (no tokenizer.json):
    it trains, and its checkpoints carry the same tokenizer files, which load to the same ids."""
    from test_chat import write_kimi_tokenizer

    from nanokimi.checkpoint import save_checkpoint
    from nanokimi.cli import main
    from nanokimi.config import ModelConfig
    from nanokimi.data import TiktokenTokenizer, load_tokenizer
    from nanokimi.model import build_model

    write_kimi_tokenizer(tmp_path / "kimi")
    tok = load_tokenizer(tmp_path / "kimi")
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=256)
    base = save_checkpoint(tmp_path / "base", build_model(cfg))
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (base / name).write_bytes((tmp_path / "kimi" / name).read_bytes())
    out = tmp_path / "run"
    assert main(["rl", "--ckpt", str(base), "--task", "ladder", "--out", str(out), "--no-progress", "rl.steps=1",
                 "rl.task_levels=1-2", "rl.task_per_level=2", "rl.max_tokens=6", "rl.prompts_per_step=2",
                 "rl.samples_per_prompt=2", "rl.eval_per_level=1", "rl.eval_samples=2", "rl.eval_ks=1,2"]) == 0
    step = out / "checkpoints" / "step-1"
    assert not (step / "tokenizer.json").exists()
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (step / name).read_bytes() == (base / name).read_bytes()
    again = load_tokenizer(step)
    assert isinstance(again, TiktokenTokenizer) and again.encode("a = 3 + 4") == tok.encode("a = 3 + 4")


def test_cli_ladder_end_to_end(tmp_path, capsys):
    from nanokimi.checkpoint import save_checkpoint
    from nanokimi.cli import main
    from nanokimi.config import ModelConfig
    from nanokimi.data import Tokenizer
    from nanokimi.model import build_model
    from nanokimi.tasks import get_task

    task = get_task("ladder", levels="1-2", per_level=4)
    tok = Tokenizer.train([task.sft_text(e) for e in task.export(100)], vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=256)
    save_checkpoint(tmp_path / "base", build_model(cfg), None, tmp_path / "tokenizer.json")
    out = tmp_path / "run"
    args = ["rl", "--ckpt", str(tmp_path / "base"), "--task", "ladder", "--out", str(out), "--no-progress",
            "rl.steps=2", "rl.task_levels=1-2", "rl.task_per_level=4", "rl.max_tokens=12", "rl.prompts_per_step=2",
            "rl.samples_per_prompt=2", "rl.eval_per_level=1", "rl.eval_samples=2", "rl.eval_ks=1,2", "rl.loss=grpo",
            "rl.kl_coef=0.1", "rl.eval_every=1"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 2]
    assert "eval_pass@2_L2" in records[0] and "kl_ref" in records[1] and "logprob_gap" in records[1]
    assert "eval_pass@1_L1" in records[1] and "reward_mean" in records[1]  # rl.eval_every
    assert (out / "checkpoints" / "step-2" / "model.safetensors").is_file() and (out / "config.toml").is_file()
    assert main(args) == 2
    assert "already holds an RL run" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    assert main(["plot", str(out), "--out", str(tmp_path / "rl.png")]) == 0 and (tmp_path / "rl.png").is_file()
    assert main(["rl", "--ckpt", str(tmp_path / "base"), "--task", "sudoku", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["rl", "--out", str(out), "--resume", "--no-progress", "rl.steps=3"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-2:] == [3, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record_gradients(trainer) -> list:
    """Keep the flattened whole gradients each optimizer step sees (Adam's first step hides their scale)."""
    from nanokimi.post.rl.loop import full_tensor

    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(torch.cat([full_tensor(p.grad).flatten() for p in trainer.model.parameters()]))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _two_rank_check(rank, world_size, root, fsdp: bool) -> dict | None:
    """One update on 2 ranks against one process on the union of their groups; with FSDP also a save, a resume
    and one more step on both. Returns the comparison on rank 0."""
    import torch.distributed as dist

    settings = ["rl.steps=3", "rl.prompts_per_step=8", "rl.loss=grpo", "rl.aggregation=token-mean",
                "rl.samples_per_prompt=16", "rl.dynamic_sampling=true",  # every rank's groups carry signal
                "optim.qk_clip_tau=1e-6", f"rl.fsdp={str(fsdp).lower()}"]  # QK-Clip clips: ranks must agree
    name = "fsdp" if fsdp else "replicated"
    trainer = toy_trainer(root, settings, name=name, rank=rank, world_size=world_size)
    start = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    scored, _, _ = trainer.rollout()
    union = [s for part in trainer._all_gather(scored) for s in part]
    signal = trainer._all_gather(sum(informative(s["rewards"].tolist()) for s in scored))
    grads = _record_gradients(trainer)
    trainer.update(scored)
    trainer.step += 1
    weights = _weights(trainer.policy)
    both = [None] * world_size
    dist.all_gather_object(both, weights)
    out = None
    if rank == 0:
        single = toy_trainer(root, settings, name=f"single-{name}")
        single.model.load_state_dict(start)
        single_grads = _record_gradients(single)
        single.update(union)
        reference = _weights(single.model)
        out = {"grad_vs_single": ((grads[0] - single_grads[0]).norm() / single_grads[0].norm()).item(),
               "ranks_equal": (both[0] - both[1]).abs().max().item(),
               "vs_single": (weights - reference).abs().max().item(),
               "moved": (weights - torch.cat([v.flatten() for v in start.values()])).abs().max().item(),
               "informative_groups_per_rank": signal}
    if fsdp:
        trainer.save()
        resumed = toy_trainer(root, settings, name=name, rank=rank, world_size=world_size, resume=True, seed=7)
        same_weights = (_weights(resumed.policy) - weights).abs().max().item()
        a, b = trainer.train_step(), resumed.train_step()
        if rank == 0:
            out.update(resumed_weights=same_weights, resumed_loss=(a["loss"], b["loss"]),
                       resumed_reward=(a["reward_mean"], b["reward_mean"]), groups=a["groups"])
    return out


def _two_rank_worker(rank, world_size, port, root, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {mode: _two_rank_check(rank, world_size, root, mode == "fsdp") for mode in ("replicated", "fsdp")}
        if rank == 0:
            queue.put(results)
        dist.barrier()  # leave together: a rank tearing gloo down while its peer still works aborted it (rarely)
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_rollouts_and_sum_gradients(tmp_path):
    """2 gloo ranks, each rolling out 4 of the 8 prompt groups, replicated and FSDP2-sharded: both ranks take
    the same step, and it equals one process's step on the union of their groups (global denominators, summed
    gradients, shared QK-Clip statistics); a sharded run saves and resumes to the same next step."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_two_rank_worker, args=(2, _free_port(), tmp_path, queue), nprocs=2, join=True)
    results = queue.get()
    for mode, result in results.items():
        assert result["ranks_equal"] == 0.0, (mode, result)
        assert result["moved"] > 1e-4, (mode, result)
        assert result["grad_vs_single"] < 1e-5, (mode, result)
        assert result["vs_single"] < 1e-4, (mode, result)  # 1% of one AdamW step (lr 0.01)
        assert min(result["informative_groups_per_rank"]) >= 1, (mode, result)
    fsdp = results["fsdp"]
    assert fsdp["resumed_weights"] == 0.0 and fsdp["groups"] >= 2, fsdp
    assert fsdp["resumed_reward"][0] == fsdp["resumed_reward"][1], fsdp
    assert fsdp["resumed_loss"][0] == pytest.approx(fsdp["resumed_loss"][1], rel=1e-5, abs=1e-7), fsdp


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny"])
def test_engine_sees_in_place_updates_on_cuda(preset):
    """CUDA graphs captured before an optimizer step read the live weights after it: the engine's log-probs of
    its own samples match the trainer's forward under the new weights, and not under the old ones."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from nanokimi.config import ModelConfig
    from nanokimi.model import build_model
    from nanokimi.optim import build_optimizer
    from nanokimi.post.rl.losses import token_logprobs

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, vocab_size=CharTokenizer.vocab_size, max_position_embeddings=128)
    model, tok = build_model(cfg, device="cuda"), CharTokenizer()
    prompts = [tok.encode(p) for p in ("12+3=", "7=", "40-1=", "9=")]
    engine = EngineBackend(model, tok, max_num_seqs=16, max_cache_tokens=2048)
    requests = [(p, 12, i) for i, p in enumerate(prompts)]
    engine.generate(requests, temperature=1.0)  # captures the decode graphs

    @torch.no_grad()
    def forward_logprobs(prompt, tokens):
        ids = torch.tensor([prompt + tokens], device="cuda")
        logits = model(ids[:, :-1])
        return token_logprobs(logits, ids[:, 1:])[0, len(prompt) - 1:].tolist()

    before = [(p, t) for p, (t, _, _) in zip(prompts, engine.generate(requests, temperature=1.0))]
    old = [forward_logprobs(p, t) for p, t in before]
    optimizer = build_optimizer(model, name="muon", lr=0.05)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (4, 16), device="cuda")
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    model.eval()
    after = engine.generate(requests, temperature=1.0)
    gap, moved = 0.0, 0.0
    for prompt, (tokens, logprobs, _), (old_prompt, old_tokens), old_logprobs in zip(prompts, after, before, old):
        new = forward_logprobs(prompt, tokens)
        gap = max(gap, max(abs(a - b) for a, b in zip(logprobs, new)))
        stale = forward_logprobs(old_prompt, old_tokens)
        moved = max(moved, max(abs(a - b) for a, b in zip(stale, old_logprobs)))
    assert gap < 2e-2, gap
    assert moved > 0.2, moved  # the update changed the log-probs far more than the tolerance


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])  # SIGUSR1: Slurm's warning before pre-emption
def test_a_stop_signal_saves_and_resume_continues(tmp_path, name):
    import signal
    import threading

    from nanokimi.train.trainer import TrainingError

    settings = ["rl.steps=100000", "rl.prompts_per_step=2"]
    trainer = toy_trainer(tmp_path, settings)
    threading.Timer(1.0, os.kill, (os.getpid(), getattr(signal, name))).start()
    with pytest.raises(TrainingError, match=f"stopped by {name} at step"):
        trainer.fit(evaluate=False)
    assert 0 < trainer.step < 100000 and (trainer.checkpoint_dir / "trainer.pt").is_file()
    assert trainer.checkpoint_dir.name == f"step-{trainer.step}"
    resumed = toy_trainer(tmp_path, ["rl.steps=" + str(trainer.step + 1), "rl.prompts_per_step=2"], resume=True)
    assert resumed.step == trainer.step
    assert resumed.fit(evaluate=False)["step"] == trainer.step + 1


@pytest.mark.slow
def test_rl_ladder_benchmark_smoke(tmp_path):
    """benchmarks/rl_ladder.py end to end on the CPU (tiny model, seconds of pretraining): it runs and reports."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "rl_ladder.py"), "--smoke", "--workers", "1",
                           "--pretrain-seconds", "6", "--rl-steps", "2", "--out", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((Path(tempfile.gettempdir()) / "nanokimi-quick" / "rl_ladder.json").read_text())
    assert set(result["methods"]) == {"k1.5", "grpo"} and result["edge_levels"]
    assert all(m["steps"] == 2 and "pass@1" in m["eval"]["all"] for m in result["methods"].values())
    assert result["offline_engine"]["float32"]["tokens_per_s"] > 0
    assert -1 <= result["edge_sharpening_ceiling"] <= 1
    assert all(0 < m["practised"]["problems"] <= 15 and 0 <= m["practised"]["pass@1"] <= 1
               for m in result["methods"].values())
    assert all(0 <= g["edge_lift_se"] < 1 and math.isfinite(g["edge_pass@1_lift"]) for g in result["goals"].values())


def test_loss_mask_covers_the_latest_segment_and_micro_batches_add_up(tmp_path):
    """Partial rollouts train on the on-policy segment only (or on everything with loss_on_old_segments), and
    micro-batches sharing the batch's denominators give the whole batch's gradient."""
    def scored_groups(trainer):
        tok = trainer.tokenizer
        groups = []
        for g in range(2):
            responses = [Response(token_ids=tok.encode(text), engine_logprobs=[None] * len(text), segment_start=2,
                                  finish_reason="stop") for text in ("12+3", "4", "=7-", "99")]
            group = Group(f"g{g}", CopyDigit().examples()[g], trainer.encode(CopyDigit().examples()[g]), responses)
            groups.append(trainer._score(group))
        return groups

    trainer = toy_trainer(tmp_path, ["rl.samples_per_prompt=4", "rl.loss=grpo"], name="seg")
    batch = trainer._batch(scored_groups(trainer))
    assert batch["mask"].sum(-1).tolist() == [2, 0, 1, 0] * 2  # tokens from index 2 on
    everything = toy_trainer(tmp_path, ["rl.samples_per_prompt=4", "rl.loss_on_old_segments=true"], name="all")
    assert everything._batch(scored_groups(everything))["mask"].sum(-1).tolist() == [4, 1, 3, 2] * 2
    for loss in ("k1.5", "grpo"):
        grads = []
        for micro in (0, 4):
            t = toy_trainer(tmp_path, ["rl.samples_per_prompt=4", f"rl.loss={loss}", "rl.loss_on_old_segments=true",
                                       f"rl.micro_batch={micro}"], name=f"{loss}{micro}")
            seen = _record_gradients(t)
            t.update(scored_groups(t))
            grads.append(seen[0])
        assert grads[0].norm() > 0
        assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8), loss


def test_resume_of_a_missing_run_and_a_missing_task_are_one_line(tmp_path, capsys):
    from nanokimi.cli import main
    assert main(["rl", "--out", str(tmp_path / "nope"), "--resume"]) == 2
    assert f"--resume: '{tmp_path / 'nope'}' holds no RL run" in capsys.readouterr().err
    assert main(["rl", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # no --task: not a default run
    assert "nanokimi rl needs a task: --task" in capsys.readouterr().err


def test_epochs_pass_over_the_same_minibatches_again_off_policy(tmp_path):
    """rl.epochs=3 takes 3 x updates_per_step optimizer steps on one rollout batch: its first step is the one-pass
    run's first step (same groups, same weights), a later pass over that minibatch sees the moved policy (another
    gradient, kl_old > 0), and epochs=0 is a config error."""
    settings = ["rl.prompts_per_step=8", "rl.updates_per_step=2", "rl.loss=grpo", "rl.dynamic_sampling=true"]
    runs = {}
    for epochs in (1, 3):
        trainer = toy_trainer(tmp_path, [*settings, f"rl.epochs={epochs}"], name=f"epochs{epochs}")
        seen = _record_gradients(trainer)
        runs[epochs] = (trainer.train_step(), seen)
    (one, one_grads), (three, three_grads) = runs[1], runs[3]
    assert one["updates"] == len(one_grads) == 2 and three["updates"] == len(three_grads) == 6
    assert one_grads[0].norm() > 0 and torch.equal(one_grads[0], three_grads[0])
    assert not torch.allclose(three_grads[2], three_grads[0])  # minibatch 0 again, under the updated policy
    assert three["kl_old"] > one["kl_old"] >= 0
    with pytest.raises(ConfigError, match="rl.epochs"):
        load_rl_config(None, ["rl.epochs=0"])
