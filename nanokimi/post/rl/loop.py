"""The RL trainer: prompts -> k rollouts each from the live policy -> rewards from the task's grader ->
advantages -> Muon/AdamW updates, with evaluation (pass@k per level), metrics.jsonl, checkpoints, exact
resume and a clean stop on Ctrl-C / SIGTERM.

Several processes (torchrun): each rank rolls out its share of the prompts and the losses use the global
batch's denominators. With rl.fsdp (the default) the trained model is sharded with the pretraining trainer's
FSDP2 path and each rank's engine generates from a full-weight replica refreshed after every update; without
it every rank holds the whole model (the engine reads it directly) and gradients are summed over ranks.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanokimi.checkpoint import (CHECKPOINTS, load_trainer_state, load_weights, rng_state, run_checkpoint, save_step,
                                 set_rng_state, write_checkpoint_files)
from nanokimi.data.tokenizer import TOKENIZER_FILES
from nanokimi.model.moe import update_router_bias
from nanokimi.post.rl.config import RLRunConfig, rl_to_toml
from nanokimi.post.rl.losses import (group_advantages, grpo_loss, k15_loss, kl_estimate, length_penalty,
                                     token_entropy, token_logprobs)
from nanokimi.post.rl.rollout import EngineBackend, Group, ReferenceBackend, Response, RolloutBuffer, derive_seed
from nanokimi.post.rl.sampler import PromptSampler, informative
from nanokimi.train.distributed import clip_grad_norm_, sync_step_statistics
from nanokimi.train.schedule import lr_factor
from nanokimi.train.trainer import StopSignals, TrainingError


def response_text(tokenizer, token_ids: list[int], stop: tuple[str, ...], stop_ids: set[int]) -> str:
    """The response as the grader reads it: up to a stop token, cut at the first stop string."""
    ids = list(token_ids)
    for i, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:i]
            break
    text = tokenizer.decode(ids)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text


def prompt_ids(tokenizer, task, example) -> list[int]:
    """End-of-text first (pretraining documents follow one), then the task's prompt."""
    return [tokenizer.eot_id] + tokenizer.encode(task.prompt(example))


@torch.no_grad()
def evaluate_pass_at_k(backend, tokenizer, task, examples: list, n: int, max_tokens: int, temperature: float,
                       seed: int) -> list[dict]:
    """Sample n responses per example (seeded per example and sample, so evaluations compare like with like)
    and grade them: [{"difficulty", "samples": [{"correct", "reward", "key", "num_tokens", "truncated"}]}],
    the input of nanokimi.tasks.summarize."""
    stop = tuple(getattr(task, "stop", ()) or ())
    stop_ids = set(getattr(tokenizer, "stop_ids", None) or {tokenizer.eot_id})
    requests = [(prompt_ids(tokenizer, task, e), max_tokens, derive_seed(seed, "eval", e.id, j))
                for e in examples for j in range(n)]
    outputs = backend.generate(requests, temperature, 1.0) if requests else []
    problems = []
    for i, example in enumerate(examples):
        samples = []
        for tokens, _, reason in outputs[i * n:(i + 1) * n]:
            text = response_text(tokenizer, tokens, stop, stop_ids)
            samples.append({"correct": bool(task.is_correct(text, example.answer)),
                            "reward": float(task.reward(text, example.answer)),
                            "key": task.extract(text) if hasattr(task, "extract") else None,
                            "num_tokens": len(tokens), "truncated": reason != "stop"})
        problems.append({"difficulty": example.difficulty, "samples": samples})
    return problems


def full_tensor(value):
    """A DTensor gathered whole (collective: every rank must call it), anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class RLTrainer:
    """`model` is trained in place; in one process (or replicated) it is also what the engine generates with.
    `task` has examples(split), prompt(example), reward(response, answer), is_correct(response, answer), `stop`."""

    def __init__(self, run: RLRunConfig, model, tokenizer, task, out_dir: str | Path, *, tokenizer_file=None,
                 ref_model=None, resume: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1,
                 backend: str = "engine"):
        from nanokimi.optim import build_optimizer
        from nanokimi.optim.qk_clip import enable_qk_clip_recording

        self.run, self.cfg = run, run.rl
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.ref_model = ref_model
        self.out, self.tokenizer_file = Path(out_dir), tokenizer_file
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.progress = progress and self.is_main
        self.device = model.embed.weight.device
        self.checkpoints = self.out / CHECKPOINTS
        self.last_good = run_checkpoint(self.out, warn=False)
        holds_run = (self.out / "metrics.jsonl").exists() or self.last_good is not None
        if holds_run and not resume:
            raise TrainingError(f"'{self.out}' already holds an RL run. Pass --resume to continue it, or choose "
                                "another --out.")
        if resume and (self.last_good is None or not (self.last_good / "trainer.pt").is_file()):
            raise TrainingError(f"--resume: '{self.out}' has no checkpoint to continue from (no complete "
                                f"{CHECKPOINTS}/step-N). Start it without --resume.")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.prompts_per_step % world_size:
            raise TrainingError(f"rl.prompts_per_step={self.cfg.prompts_per_step} must be divisible by the number of "
                                f"processes ({world_size}).")
        self.groups_per_rank = self.cfg.prompts_per_step // world_size
        self.sharded = world_size > 1 and self.cfg.fsdp
        self.policy = model  # what the engine generates from
        if self.sharded:
            from nanokimi.train.distributed import shard_model
            self.policy = copy.deepcopy(model).eval()
            shard_model(model, self.device)
        o = run.optim
        self.optimizer = build_optimizer(model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                         betas=(o.beta1, o.beta2), momentum=o.momentum,
                                         muon_execution=o.muon_execution())
        if o.qk_clip:
            enable_qk_clip_recording(model)
        self.stop = tuple(getattr(task, "stop", ()) or ())
        self.stop_ids = set(getattr(tokenizer, "stop_ids", None) or {tokenizer.eot_id})
        self.sampler = PromptSampler(task.examples(split=self.cfg.train_split), curriculum=self.cfg.curriculum,
                                     curriculum_steps=self.cfg.curriculum_steps, prioritized=self.cfg.prioritized)
        self.eval_examples = self._eval_examples()
        k = self.cfg.samples_per_prompt
        if backend == "engine":
            per_seq = self.cfg.max_tokens + max(len(self.encode(e)) for e in self.sampler.examples[:256])
            # at most 1024 sequences at once: the engine's decode CUDA graphs cover batches up to 1024
            seqs = min(1024, max(self.groups_per_rank * k, len(self.eval_examples) * self.cfg.eval_samples))
            cache = self.cfg.max_cache_tokens or (seqs + 8) * (per_seq + 32)
            self.backend = EngineBackend(self.policy, tokenizer, self.stop, max_num_seqs=seqs, max_cache_tokens=cache,
                                         speculative=self.cfg.speculative or None,
                                         num_speculative_tokens=self.cfg.num_speculative_tokens,
                                         scheduling=self.cfg.scheduling, chunk_tokens=self.cfg.chunk_tokens)
        elif backend == "reference":
            self.backend = ReferenceBackend(self.policy, tokenizer, self.stop, self.stop_ids)
        else:
            raise ValueError(f"backend {backend!r} must be 'engine' or 'reference'.")
        self.buffer = RolloutBuffer(self.backend, self.cfg.max_tokens, self.cfg.segment_tokens, self.cfg.temperature,
                                    self.cfg.top_p, self.cfg.seed, tokenizer, self.stop)
        self.step, self.tokens = 0, 0
        torch.manual_seed(self.cfg.seed)
        if resume:
            self._resume()

    def encode(self, example) -> list[int]:
        return prompt_ids(self.tokenizer, self.task, example)

    def _eval_examples(self) -> list:
        counts: dict = {}
        chosen = []
        for example in self.task.examples(split=self.cfg.eval_split):
            level = example.difficulty
            if counts.get(level, 0) < self.cfg.eval_per_level:
                counts[level] = counts.get(level, 0) + 1
                chosen.append(example)
        return chosen

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor)
        return tensor

    def _all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def _new_groups(self, count: int, round_index: int) -> list[Group]:
        if count <= 0:
            return []
        rng = random.Random(f"{self.cfg.seed}:{self.step}:{round_index}:{self.rank}")
        examples = self.sampler.sample(count, self.step, rng)
        k = self.cfg.samples_per_prompt
        return [Group(f"{self.step}.{round_index}.{self.rank}.{i}", e, self.encode(e), [Response() for _ in range(k)])
                for i, e in enumerate(examples)]

    def _score(self, group: Group) -> dict:
        texts = [response_text(self.tokenizer, r.token_ids, self.stop, self.stop_ids) for r in group.responses]
        answer = group.example.answer
        correct = [bool(self.task.is_correct(t, answer)) for t in texts]
        rewards = torch.tensor([float(self.task.reward(t, answer)) for t in texts])
        lengths = torch.tensor([len(r.token_ids) for r in group.responses])
        task_rewards = rewards.clone()
        if self.cfg.length_penalty > 0 and self.step >= self.cfg.length_penalty_warmup:
            rewards = rewards + length_penalty(lengths, torch.tensor(correct), len(texts), self.cfg.length_penalty)
        return {"group": group, "rewards": rewards, "task_rewards": task_rewards, "correct": correct,
                "lengths": lengths, "truncated": [r.finish_reason == "length" for r in group.responses]}

    def rollout(self) -> tuple[list[dict], list[dict], dict]:
        """This rank's scored groups for one update, every group finished in this iteration (dynamic sampling
        drops some of them from the update), and rollout statistics."""
        need = self.groups_per_rank
        start = time.perf_counter()
        fresh = need - len(self.buffer.pending) if self.cfg.segment_tokens > 0 else need
        done, generated = self.buffer.run(self._new_groups(fresh, 0), self.step)
        scored = [self._score(g) for g in done]
        all_scored = list(scored)
        if self.cfg.dynamic_sampling:
            scored = [s for s in scored if informative(s["rewards"].tolist())]
            for round_index in range(1, self.cfg.max_refill_rounds + 1):
                if len(scored) >= need:
                    break
                more, count = self.buffer.run(self._new_groups(need - len(scored), round_index), self.step)
                generated += count
                extra = [self._score(g) for g in more]
                all_scored += extra
                scored += [s for s in extra if informative(s["rewards"].tolist())]
            scored = scored[:need]
        seconds = time.perf_counter() - start
        for results in self._all_gather([(s["group"].example.id, s["correct"]) for s in all_scored]):
            for example_id, correct in results:
                self.sampler.update(example_id, correct)
        stats = {"groups_finished": len(all_scored), "generated": generated, "rollout_s": seconds,
                 "zero_variance": sum(not informative(s["rewards"].tolist()) for s in all_scored)}
        return scored, all_scored, stats

    def _batch(self, scored: list[dict]) -> dict:
        """Padded tensors over every response (group-major): inputs/targets [N, L], masks [N, L]."""
        rows = [(s["group"].prompt_ids, r) for s in scored for r in s["group"].responses]
        width = max((len(p) + len(r.token_ids) - 1 for p, r in rows), default=1)
        n = len(rows)
        inputs = torch.zeros(n, width, dtype=torch.long)
        targets = torch.zeros(n, width, dtype=torch.long)
        loss_mask = torch.zeros(n, width)
        engine_lp = torch.full((n, width), float("nan"))
        for i, (prompt, r) in enumerate(rows):
            seq = prompt + r.token_ids
            inputs[i, :len(seq) - 1] = torch.tensor(seq[:-1])
            targets[i, :len(seq) - 1] = torch.tensor(seq[1:])
            first = len(prompt) - 1  # target index of response token 0
            begin = 0 if self.cfg.loss_on_old_segments else r.segment_start
            loss_mask[i, first + begin:first + len(r.token_ids)] = 1
            seg = [math.nan if v is None else v for v in r.engine_logprobs[r.segment_start:]]
            engine_lp[i, first + r.segment_start:first + len(r.token_ids)] = torch.tensor(seg, dtype=torch.float)
        to = self.device
        rewards = torch.cat([s["rewards"] for s in scored]) if scored else torch.zeros(0)
        return {"inputs": inputs.to(to), "targets": targets.to(to), "mask": loss_mask.to(to),
                "engine_lp": engine_lp.to(to), "rewards": rewards.to(to), "tokens": sum(len(p) + len(r.token_ids)
                                                                                      for p, r in rows)}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _logits(self, model, inputs: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return model(inputs)

    def _micro_slices(self, rows: range) -> list[slice]:
        k = self.cfg.samples_per_prompt
        size = max(k, self.cfg.micro_batch // k * k) if self.cfg.micro_batch else len(rows)
        return [slice(i, min(i + size, rows.stop)) for i in range(rows.start, rows.stop, max(size, 1))]

    @torch.no_grad()
    def _reference_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """log π_old per token (the trainer's forward before the update, at the rollout temperature), log π_ref
        (when a reference model is set) and log π_old at temperature 1 (for the engine gap)."""
        n = batch["inputs"].shape[0]
        old = torch.zeros_like(batch["mask"])
        raw = torch.zeros_like(batch["mask"])
        ref = torch.zeros_like(batch["mask"]) if self.ref_model is not None else None
        for piece in self._micro_slices(range(n)):
            logits = self._logits(self.model, batch["inputs"][piece])
            old[piece] = token_logprobs(logits, batch["targets"][piece], self.cfg.temperature)
            raw[piece] = token_logprobs(logits, batch["targets"][piece])
            if ref is not None:
                ref[piece] = token_logprobs(self._logits(self.ref_model, batch["inputs"][piece]),
                                            batch["targets"][piece], self.cfg.temperature)
        return old, ref, raw

    def update(self, scored: list[dict]) -> dict:
        """One rollout batch -> rl.epochs x rl.updates_per_step optimizer steps (each pass over the same minibatches,
        π_old fixed at the rollout's policy). Returns the update's statistics."""
        cfg, k = self.cfg, self.cfg.samples_per_prompt
        batch = self._batch(scored)
        self.model.train()
        old, ref, raw = self._reference_logprobs(batch)
        mask = batch["mask"]
        seen = mask.bool() & ~batch["engine_lp"].isnan()
        gap = self._all_reduce(torch.stack([(raw - batch["engine_lp"]).abs()[seen].sum(),
                                            seen.sum().float()]).double())
        advantages = None
        if cfg.loss == "grpo" and len(scored):
            advantages = group_advantages(batch["rewards"], k, cfg.std_normalize)
        groups = len(scored)
        chunks = [range(groups * i // cfg.updates_per_step * k, groups * (i + 1) // cfg.updates_per_step * k)
                  for i in range(cfg.updates_per_step)]
        sums = {"loss": 0.0, "entropy": 0.0, "kl_old": 0.0, "clip_fraction": 0.0, "kl_ref": 0.0, "grad_norm": 0.0}
        steps_taken = 0
        factor = lr_factor(self.step, cfg.steps, self.run.optim)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = param_group["initial_lr"] * factor
        for rows in [chunk for _ in range(cfg.epochs) for chunk in chunks]:  # passes after the first: off-policy
            counts = self._all_reduce(torch.tensor([len(rows), mask[rows.start:rows.stop].sum().item()],
                                                   dtype=torch.float64, device=self.device))
            num_seqs, num_tokens = counts[0].item(), counts[1].item()
            if num_seqs == 0:
                continue
            local = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, entropy, kl_old, clip, kl_ref sums
            for piece in self._micro_slices(rows):
                logits = self._logits(self.model, batch["inputs"][piece])
                logp = token_logprobs(logits, batch["targets"][piece], cfg.temperature)
                m = mask[piece]
                if cfg.loss == "k1.5":
                    loss, stats = k15_loss(logp, old[piece], m, batch["rewards"][piece], k, cfg.tau, num_seqs=num_seqs)
                else:
                    loss, stats = grpo_loss(logp, old[piece], m, advantages[piece], cfg.clip_low, cfg.clip_high,
                                            None if ref is None else ref[piece], cfg.kl_coef, cfg.kl_estimator,
                                            cfg.aggregation, cfg.max_tokens, num_seqs, num_tokens)
                (loss * self.world_size if self.sharded else loss).backward()  # FSDP2 averages over ranks
                with torch.no_grad():
                    tokens_here = m.sum()
                    local[0] += loss.detach().double()
                    local[1] += (token_entropy(logits.detach(), cfg.temperature) * m).sum().double()
                    local[2] += (kl_estimate(logp.detach(), old[piece], "k3") * m).sum().double()
                    if "clip_fraction" in stats:
                        local[3] += stats["clip_fraction"].double() * tokens_here.double()
                    if ref is not None:
                        local[4] += (kl_estimate(logp.detach(), ref[piece], "k3") * m).sum().double()
            self._all_reduce(local)
            self._sync_gradients()
            norm = clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._after_optimizer_step()
            self._refresh_policy()
            steps_taken += 1
            sums["loss"] += local[0].item()
            sums["entropy"] += local[1].item() / max(num_tokens, 1)
            sums["kl_old"] += local[2].item() / max(num_tokens, 1)
            sums["clip_fraction"] += local[3].item() / max(num_tokens, 1)
            sums["kl_ref"] += local[4].item() / max(num_tokens, 1)
            sums["grad_norm"] += float(norm)
        out = {name: value / max(steps_taken, 1) for name, value in sums.items()}
        if ref is None:
            out.pop("kl_ref")
        if cfg.loss != "grpo":
            out.pop("clip_fraction")
        out["logprob_gap"] = (gap[0] / gap[1]).item() if gap[1] > 0 else float("nan")
        out["train_tokens"] = self._all_reduce(torch.tensor(float(batch["tokens"]), device=self.device)).item()
        out["updates"] = steps_taken
        if not math.isfinite(out["loss"]):
            raise TrainingError(f"the RL loss became {out['loss']} at step {self.step + 1}; lower optim.lr.")
        return out

    def _sync_gradients(self) -> None:
        """Make the step's QK-Clip max logits and MoE expert loads global, so every rank takes the same step,
        and (replicated) sum gradients over ranks: local losses already carry the global denominators."""
        if self.world_size == 1:
            return
        sync_step_statistics(self.model)
        if self.sharded:  # FSDP2 reduce-scattered them in the backward
            return
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._all_reduce(p.grad)

    def _after_optimizer_step(self) -> None:
        o = self.run.optim
        if o.router_bias_rate > 0:
            update_router_bias(self.model, o.router_bias_rate)
        if o.qk_clip:
            from nanokimi.optim.qk_clip import apply_qk_clip
            apply_qk_clip(self.model, o.qk_clip_tau)

    @torch.no_grad()
    def _refresh_policy(self) -> None:
        """Copy the sharded model's weights and buffers, gathered whole, into the engine's replica."""
        if self.policy is self.model:
            return
        target = self.policy.state_dict()
        for name, value in self.model.state_dict().items():
            target[name].copy_(full_tensor(value))

    def train_step(self) -> dict:
        """One iteration: rollout, scoring, update. Returns the step's record."""
        scored, finished_groups, roll = self.rollout()
        start = time.perf_counter()
        upd = self.update(scored)
        train_s = time.perf_counter() - start
        local = [(s["task_rewards"].tolist(), s["rewards"].tolist(), s["correct"], s["lengths"].tolist(),
                  s["truncated"]) for s in finished_groups]
        gathered = self._all_gather((local, roll))
        rewards = [x for part, _ in gathered for g in part for x in g[1]]
        task_rewards = [x for part, _ in gathered for g in part for x in g[0]]
        correct = [x for part, _ in gathered for g in part for x in g[2]]
        lengths = [x for part, _ in gathered for g in part for x in g[3]]
        truncated = [x for part, _ in gathered for g in part for x in g[4]]
        finished = sum(r["groups_finished"] for _, r in gathered)
        generated = sum(r["generated"] for _, r in gathered)
        rollout_s = max(r["rollout_s"] for _, r in gathered)
        self.step += 1
        self.tokens += generated

        def average(values):  # nan when no group finished (partial rollouts still in flight)
            return sum(values) / len(values) if values else float("nan")

        mean = average(rewards)
        trained = self._all_reduce(torch.tensor(float(len(scored)), device=self.device)).item()
        record = {"step": self.step, "loss": upd["loss"], "lr": self.optimizer.param_groups[0]["lr"],
                  "tokens": self.tokens, "reward_mean": mean,
                  "reward_std": average([(r - mean) ** 2 for r in rewards]) ** 0.5,
                  "task_reward_mean": average(task_rewards), "accuracy": average(correct),
                  "length_mean": average(lengths), "length_max": max(lengths, default=0),
                  "truncated": average(truncated), "groups_finished": finished, "groups": int(trained),
                  "zero_variance_share": sum(r["zero_variance"] for _, r in gathered) / max(finished, 1),
                  "rollout_s": rollout_s, "train_s": train_s,
                  "rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
                  "train_tokens_per_s": upd["train_tokens"] / max(train_s, 1e-9),
                  **{k: v for k, v in upd.items() if k not in ("loss", "train_tokens")}}
        return record

    def evaluate(self, task=None, examples=None) -> dict:
        """pass@k per level (rl.eval_samples samples each at rl.eval_temperature) on `examples` of `task`
        (default: rl.eval_per_level problems per level of the RL task's eval split), split over the ranks."""
        task = task or self.task
        examples = self.eval_examples if examples is None else examples
        mine = examples[self.rank::self.world_size]
        problems = evaluate_pass_at_k(self.backend, self.tokenizer, task, mine, self.cfg.eval_samples,
                                      self.cfg.max_tokens, self.cfg.eval_temperature, self.cfg.seed)
        from nanokimi.tasks import summarize
        return summarize([p for part in self._all_gather(problems) for p in part], self.run.eval_ks())

    @staticmethod
    def flat_eval(summary: dict) -> dict:
        out = {f"eval_{key}": value for key, value in summary["all"].items() if key.startswith(("pass@", "mean_"))}
        for level, row in summary["levels"].items():
            out.update({f"eval_{key}_L{level}": value for key, value in row.items() if key.startswith("pass@")})
        return out

    def save(self) -> Path:
        """RUN/checkpoints/step-N (see nanokimi.checkpoint): one single-process checkpoint (whole weights and
        optimizer state, written by rank 0) whatever the number of ranks; a sharded run gathers its optimizer
        state first (every rank calls this)."""
        pending = self._all_gather(self.buffer.state_dict())
        optimizer_state = self.optimizer.state_dict()
        if self.sharded:
            optimizer_state = {name: {"state": {i: {k: full_tensor(v) for k, v in values.items()}
                                                for i, values in opt["state"].items()},
                                      "param_groups": opt["param_groups"]} for name, opt in optimizer_state.items()}
        state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                 "pending": pending, "rng": rng_state(), "optimizer": optimizer_state,
                 "run": self.run.to_dict(), "world_size": self.world_size}

        def write(tmp: Path) -> None:
            if self.is_main:
                source = None if self.tokenizer_file is None else Path(self.tokenizer_file)
                write_checkpoint_files(tmp, self.policy, state, source if source and source.is_file() else None)
                if source is not None and source.is_dir():  # the base's tokenizer files, whichever format
                    for name in TOKENIZER_FILES:
                        if (source / name).is_file():
                            shutil.copyfile(source / name, tmp / name)

        self.last_good = save_step(self.out, self.step, write, keep=self.cfg.keep_checkpoints, is_main=self.is_main,
                                   barrier=self._barrier)
        return self.last_good

    @property
    def checkpoint_dir(self) -> Path:
        """The newest checkpoint of this run (the step folder `latest` names), or where they go."""
        return self.last_good or self.checkpoints

    def _resume(self) -> None:
        path = run_checkpoint(self.out)
        state = load_trainer_state(path)
        if state.get("world_size", 1) != self.world_size:
            raise TrainingError(f"{path} was saved by {state.get('world_size', 1)} process(es); "
                                f"resume it with the same number (got {self.world_size}).")
        if self.sharded:
            from nanokimi.train.sharded_checkpoint import load_into
            load_into(path, self.model, self.optimizer)  # each rank keeps its shards
            self._refresh_policy()
        else:
            load_weights(self.model, path, self.device, fix=f"delete {path} to resume from the step before it",
                         check=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.buffer.load_state_dict(state["pending"][self.rank])
        set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        metrics = self.out / "metrics.jsonl"
        if self.is_main and metrics.exists():  # drop lines logged after the checkpoint
            lines = [l for l in metrics.read_text().splitlines() if l and json.loads(l)["step"] <= self.step]
            metrics.write_text("".join(l + "\n" for l in lines))

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self, evaluate: bool = True) -> dict:
        """Run to rl.steps (or rl.time_limit_s), evaluating before, every rl.eval_every steps and after
        (before and after only when `evaluate`)."""
        cfg = self.cfg
        if self.is_main:
            (self.out / "config.toml").write_text(rl_to_toml(self.run))
        result = {}
        if evaluate and self.step == 0:
            result["eval_before"] = self.evaluate()
            self.log({"step": 0, "tokens": 0, **self.flat_eval(result["eval_before"])})
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        summary = None
        stopped = False
        with StopSignals() as stop:
            while self.step < cfg.steps:
                record = self.train_step()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    record.update(self.flat_eval(self.evaluate()))
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.log(record)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.3f}",
                                len=f"{record['length_mean']:.0f}", gap=f"{record['logprob_gap']:.1e}")
                bar.update(1)
                out_of_time = cfg.time_limit_s > 0 and time.perf_counter() - started > cfg.time_limit_s
                flags = torch.tensor([float(out_of_time), float(stop.received is not None)], device=self.device)
                out_of_time, stopped = (bool(x) for x in self._all_reduce(flags).tolist())  # every rank agrees
                if stopped or out_of_time:
                    break
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
            bar.close()
            if stopped:
                path = self.save()
                raise TrainingError(f"stopped by {stop.received or 'a signal to another rank'} at step {self.step}; "
                                    f"saved {path}. Continue with --resume.")
            if evaluate:
                summary = self.evaluate()
                self.log({"step": self.step, "tokens": self.tokens, **self.flat_eval(summary)})
            self.save()
        result.update({"step": self.step, "tokens": self.tokens, "eval_after": summary})
        return result
