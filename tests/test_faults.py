"""Faults a user meets in the first hour (issue #20): crashes at every file system operation of a save,
SIGTERM / SIGINT at random steps and during a save, damaged files of each kind, a torn metrics line, a source
edited between runs, a one-document corpus, and a table of CLI mistakes. Each ends in a run that resumes with
the uninterrupted run's losses, or in a one-line error (exit code 2, no traceback) that names the fix."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanokimi import checkpoint as ckpt
from nanokimi.checkpoint import load_trainer_state, resolve_checkpoint
from nanokimi.cli import main

SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.mixers=KA", "model.num_heads=2", "model.kv_lora_rank=16",
         "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.kda_num_heads=2",
         "model.kda_head_dim=8", "model.intermediate_size=64", "model.num_experts=4", "model.moe_intermediate_size=16",
         "train.batch_size=2", "train.seq_len=16", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
         "train.save_every=2", "train.sample_tokens=0", "data.vocab_size=280", "optim.warmup_steps=2",
         "optim.lr=0.01", "train.device=cpu"]
STEPS = 6


def write_corpus(path: Path, seed: int = 0, paragraphs: int = 400) -> Path:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven experts route tokens".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(paragraphs)) + "\n")
    return path


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOKIMI_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_train(out, corpus, *extra):
    return main(["train", "--out", str(out), "--no-progress", f"data.source={corpus}", *SMALL,
                 f"train.max_steps={STEPS}", *extra])


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def assert_same_losses(a: dict, b: dict):
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def one_line_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    line = [l for l in err.splitlines() if l.startswith("nanokimi: error:")]
    assert line, err
    for word in words:
        assert word in line[-1], (word, line[-1])
    return line[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (its losses) and a corpus, shared by the tests below (each copies what it changes)."""
    root = tmp_path_factory.mktemp("reference")
    old = os.environ.get("NANOKIMI_CACHE")
    os.environ["NANOKIMI_CACHE"] = str(root / "cache")
    try:
        corpus = write_corpus(root / "corpus.txt")
        assert cli_train(root / "whole", corpus) == 0
    finally:
        if old is None:
            os.environ.pop("NANOKIMI_CACHE")
        else:
            os.environ["NANOKIMI_CACHE"] = old
    return {"root": root, "corpus": corpus, "losses": losses(root / "whole"), "run": root / "whole"}


def copy_run(reference, dest: Path) -> Path:
    shutil.copytree(reference["run"], dest)
    return dest


class Crash(BaseException):
    """What a kill -9 does to the saving code: nothing after this point runs (cleanup included)."""


class CrashAt:
    """Counts the file system operations of a save and raises Crash at operation `at` (and at every one after
    it, so no cleanup can run either)."""

    def __init__(self, monkeypatch, at: int | None):
        self.at, self.count, self.crashed = at, 0, False
        for owner, name in [(Path, "rename"), (Path, "mkdir"), (Path, "write_text"), (ckpt.os, "replace"),
                            (ckpt.os, "fsync"), (ckpt.shutil, "rmtree"), (ckpt.shutil, "copyfile"),
                            (ckpt, "save_model"), (ckpt.torch, "save")]:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def op(*args, **kwargs):
            if self.crashed or self.count == self.at:
                self.crashed = True
                raise Crash()
            self.count += 1
            return fn(*args, **kwargs)
        return op


def _trainer(root, out, corpus, resume):
    from nanokimi.train.config import load_run_config
    from nanokimi.train.trainer import Trainer

    run = load_run_config(None, None, [f"data.source={corpus}", *SMALL, f"train.max_steps={STEPS}"])
    return Trainer(run, out, resume=resume, progress=False)


def test_a_kill_between_any_two_file_operations_of_a_save_keeps_a_resumable_run(env, reference, monkeypatch):
    """Resume at step 4, train to 6, crash the save of step 6 at each of its file operations in turn: the run
    resumes from step 6 or step 4, and from there it gives the uninterrupted run's losses."""
    monkeypatch.setenv("NANOKIMI_CACHE", str(reference["root"] / "cache"))
    base = env / "base"
    copy_run(reference, base)
    latest = base / "checkpoints"
    for step in list(latest.iterdir()):
        if step.name not in ("step-4",):
            shutil.rmtree(step) if step.is_dir() else step.unlink()
    ckpt.write_latest(latest, "step-4")
    with monkeypatch.context() as m:  # a clean save, to count its operations
        trainer = _trainer(env, env / "count", reference["corpus"], resume=False)
        counter = CrashAt(m, None)
        trainer.save()
        total = counter.count
    assert total >= 10
    want = reference["losses"]
    for at in range(total + 1):
        out = env / f"crash{at}"
        shutil.copytree(base, out)
        trainer = _trainer(env, out, reference["corpus"], resume=True)
        got = {}
        for step in (5, 6):
            got[step] = trainer.train_step()
        with monkeypatch.context() as m:
            CrashAt(m, at)
            if at < total:
                with pytest.raises(Crash):
                    trainer.save()
            else:
                trainer.save()
        found = resolve_checkpoint(out)  # what generate and eval read
        resumed = _trainer(env, out, reference["corpus"], resume=True)
        assert resumed.step in (4, 6) and found.name == f"step-{resumed.step}", (at, found, resumed.step)
        if at == total:
            assert resumed.step == 6
        while resumed.step < STEPS:
            step = resumed.step + 1
            got[step] = resumed.train_step()
        for step, loss in got.items():
            assert abs(loss - want[step]) <= 1e-6 * abs(want[step]), (at, step, loss, want[step])


def test_keep_checkpoints_and_latest(env, reference):
    steps = sorted(p.name for p in (reference["run"] / "checkpoints").iterdir())
    assert steps == ["latest", "step-4", "step-6"]  # saves at 2, 4, 6; keep_checkpoints=2
    assert (reference["run"] / "checkpoints" / "latest").read_text().strip() == "step-6"
    out = env / "keep3"
    assert cli_train(out, reference["corpus"], "train.keep_checkpoints=3") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-2", "step-4", "step-6"]


def test_stale_or_missing_latest_falls_back_to_the_newest_complete_step(env, reference, capsys):
    out = copy_run(reference, env / "run")
    (out / "checkpoints" / "latest").write_text("step-99\n")
    (out / "checkpoints" / "step-8.tmp").mkdir()  # a save that never finished
    with pytest.warns(UserWarning, match="newest complete checkpoint"):
        assert resolve_checkpoint(out).name == "step-6"
    (out / "checkpoints" / "latest").unlink()
    with pytest.warns(UserWarning):
        assert main(["generate", "--ckpt", str(out), "--max-new-tokens", "3", "--seed", "0"]) == 0


def test_old_single_checkpoint_layout_still_loads(env, reference, capsys):
    out = env / "old"
    out.mkdir()
    shutil.copytree(reference["run"] / "checkpoints" / "step-6", out / "checkpoint")
    assert resolve_checkpoint(out) == out / "checkpoint"
    assert main(["generate", "--ckpt", str(out), "--max-new-tokens", "3", "--seed", "0"]) == 0


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_at_a_random_step_saves_and_resumes_exactly(env, reference, monkeypatch, capsys, signame):
    from nanokimi.train.trainer import Trainer

    stop_after = random.Random(signame).randint(1, STEPS - 1)
    original = Trainer.train_step

    def step_then_signal(self):
        loss = original(self)
        if self.step == stop_after:
            os.kill(os.getpid(), getattr(signal, signame))
        return loss

    out = env / "run"
    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    line = one_line_error(capsys, cli_train(out, reference["corpus"]), f"at step {stop_after}", "--resume")
    assert ("interrupted" if signame == "SIGINT" else f"stopped by {signame}") in line
    assert load_trainer_state(resolve_checkpoint(out))["step"] == stop_after
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_losses(losses(out), reference["losses"])


def test_ctrl_c_during_a_save_finishes_it_and_a_second_one_stops_at_once(env, reference, monkeypatch, capsys):
    real = ckpt.write_checkpoint_files
    presses = {"n": 0}

    def press_ctrl_c_while_saving(*args, **kwargs):
        if presses["n"] < presses.get("max", 1):
            presses["n"] += 1
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr("nanokimi.train.trainer.write_checkpoint_files", press_ctrl_c_while_saving)
    out = env / "run"
    one_line_error(capsys, cli_train(out, reference["corpus"]), "interrupted at step 3")  # saved at 2, stopped at 3
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-2", "step-3"]
    monkeypatch.setattr("nanokimi.train.trainer.write_checkpoint_files", real)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_losses(losses(out), reference["losses"])

    def press_twice(*args, **kwargs):  # the second press aborts the save: the earlier checkpoint stays
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr("nanokimi.train.trainer.write_checkpoint_files", press_twice)
    again = env / "again"
    one_line_error(capsys, cli_train(again, reference["corpus"]), "interrupted twice", "no checkpoint was saved")
    assert not list((again / "checkpoints").glob("*.tmp"))


def test_sigterm_to_a_real_process_saves_and_the_run_resumes_exactly(env, reference):
    out = env / "run"
    cmd = [sys.executable, "-m", "nanokimi.cli", "train", "--out", str(out), "--no-progress",
           f"data.source={reference['corpus']}", *SMALL, f"train.max_steps={STEPS}", "train.stop_at=0",
           "train.log_every=1"]
    # a slow step (an injected sleep) leaves time to signal mid-run
    code = ("import sys, time, runpy; from nanokimi.train.trainer import Trainer; step = Trainer.train_step\n"
            "def slow(self):\n    time.sleep(0.3)\n    return step(self)\n"
            "Trainer.train_step = slow; sys.argv = sys.argv[1:]; runpy.run_module('nanokimi.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code, *cmd[2:]], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                 "NANOKIMI_CACHE": str(reference["root"] / "cache")})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "stopped by SIGTERM at step" in err and "Traceback" not in err, err
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_losses(losses(out), reference["losses"])


def test_a_run_that_died_before_its_first_save_can_start_again(env, reference, capsys):
    out = env / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "tokens": 32}\n')
    (out / "checkpoints" / "step-2.tmp").mkdir(parents=True)
    one_line_error(capsys, main(["train", "--out", str(out), "--resume", "--no-progress",
                                 f"data.source={reference['corpus']}", *SMALL]), "no checkpoint", "without --resume")
    with pytest.warns(UserWarning, match="starting it over"):
        assert cli_train(out, reference["corpus"]) == 0
    assert_same_losses(losses(out), reference["losses"])


def test_torn_metrics_line_is_skipped_with_a_warning(env, reference, capsys):
    out = copy_run(reference, env / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    with pytest.warns(UserWarning, match="line 7 is not a metrics record"):
        assert main(["plot", str(out), "--out", str(env / "loss.png")]) == 0
    with pytest.warns(UserWarning, match="not a metrics record"):
        assert main(["train", "--out", str(out), "--resume", "--no-progress", "train.max_steps=7"]) == 0
    assert sorted(losses(out)) == list(range(1, 8))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" + data[8:64])


@pytest.mark.parametrize("name, how", [("model.safetensors", "truncate"), ("model.safetensors", "garbage"),
                                       ("trainer.pt", "truncate"), ("config.json", "garbage"),
                                       ("tokenizer.json", "truncate")])
def test_damaged_checkpoint_files_give_one_line_errors(env, reference, capsys, name, how):
    out = copy_run(reference, env / "run")
    _damage(out / "checkpoints" / "step-6" / name, how)
    commands = {"generate": ["generate", "--ckpt", str(out), "--max-new-tokens", "3"],
                "eval": ["eval", "--ckpt", str(out), "--batches", "1", "--seq-len", "16"],
                "resume": ["train", "--out", str(out), "--resume", "--no-progress", "train.max_steps=8"]}
    if name == "trainer.pt":
        commands.pop("generate")  # generate needs only the weights
    if name in ("tokenizer.json", "config.json"):
        commands.pop("resume")  # training reads the data's tokenizer and the run's config.toml: resume works
    for command in commands.values():
        one_line_error(capsys, main(command), str(out / "checkpoints" / "step-6"))
    if name in ("model.safetensors", "trainer.pt"):  # the fix the message names: drop the damaged step
        shutil.rmtree(out / "checkpoints" / "step-6")
        with pytest.warns(UserWarning, match="step-4"):
            assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
        assert_same_losses(losses(out), reference["losses"])


def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(env, reference, monkeypatch,
                                                                                     capsys):
    from nanokimi.train import trainer as trainer_module

    real = trainer_module.write_checkpoint_files

    def full(folder, *args, **kwargs):
        if folder.name == "step-4.tmp":
            raise OSError(28, "No space left on device", str(folder / "model.safetensors"))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "write_checkpoint_files", full)
    out = env / "run"
    one_line_error(capsys, cli_train(out, reference["corpus"]), "No space left on device", "step-4.tmp",
                   "previous checkpoint", "step-2", "--resume")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["latest", "step-2"] or \
        sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2"]
    monkeypatch.setattr(trainer_module, "write_checkpoint_files", real)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_losses(losses(out), reference["losses"])


def test_an_edited_source_is_prepared_again(env, capsys):
    corpus = write_corpus(env / "corpus.txt")
    assert cli_train(env / "a", corpus, "train.stop_at=2") == 0
    os.utime(corpus, (time.time() + 5, time.time() + 5))  # touched only: the prepared tokens are reused
    data_dir = Path(load_trainer_state(resolve_checkpoint(env / "a"))["data_dir"])
    created = json.loads((data_dir / "manifest.json").read_text())["created"]
    assert cli_train(env / "b", corpus, "train.stop_at=1") == 0
    assert json.loads((data_dir / "manifest.json").read_text())["created"] == created
    write_corpus(corpus, seed=1, paragraphs=450)  # edited: prepared again, new runs and resumed ones go on
    assert cli_train(env / "c", corpus, "train.stop_at=1") == 0
    with pytest.warns(UserWarning, match="the data changed since the checkpoint"):
        assert main(["train", "--out", str(env / "a"), "--resume", "--no-progress"]) == 0
    assert max(losses(env / "a")) == STEPS


def test_a_single_document_corpus_is_split_by_position(env, capsys):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    one_doc = env / "one.txt"  # no blank line anywhere, ~120 KB
    one_doc.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1600)) + "\n")
    one_line = env / "line.txt"  # a single line
    one_line.write_text(" ".join(rng.choice(words) for _ in range(15000)))
    for corpus in (one_doc, one_line):
        out = env / corpus.stem
        assert cli_train(out, corpus, "train.max_steps=3") == 0
        assert "val_bpb" in losses(out) or "val_bpb" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    tiny = env / "tiny.txt"
    tiny.write_text("just one short document without any break\n")
    one_line_error(capsys, cli_train(env / "tiny", tiny), "validation split", "bigger source")
    assert not (env / "tiny" / "metrics.jsonl").exists()


def test_overrides_before_and_after_options_and_preset_with_resume(env, reference, capsys):
    out = copy_run(reference, env / "run")
    assert main(["train", "train.max_steps=7", "--out", str(out), "--resume", "train.log_every=1",
                 "--no-progress"]) == 0
    assert max(losses(out)) == 7
    with pytest.warns(UserWarning, match="--preset gpt-124m is ignored with --resume"):
        assert main(["train", "--preset", "gpt-124m", "--out", str(out), "--resume", "--no-progress",
                     "train.max_steps=8"]) == 0
    err = capsys.readouterr().err
    assert "resuming tiny at step 7" in err and "gpt-124m" not in err.split("resuming")[1].splitlines()[0]


def test_stop_at_belongs_to_the_invocation_and_val_is_always_reported(env, reference, capsys):
    out = env / "run"
    assert cli_train(out, reference["corpus"], "train.stop_at=1", "train.eval_every=100") == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "loss nan" not in printed and "byte nan" not in printed
    assert "stop_at = 0" in (out / "config.toml").read_text()
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "train.eval_every=3"]) == 0
    assert_same_losses(losses(out), reference["losses"])
    assert "loss nan" not in capsys.readouterr().out


def _sharded_lookalike(reference, root: Path) -> Path:
    step = root / "sharded" / "checkpoints" / "step-6"
    (step / "sharded").mkdir(parents=True)
    shutil.copy(reference["run"] / "checkpoints" / "step-6" / "config.json", step)
    (step / "sharded" / ".metadata").write_bytes(b"")
    ckpt.write_latest(step.parent, "step-6")
    return root / "sharded"


def _hf_folder(root: Path) -> Path:
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "kimi_linear", "architectures": ["KimiLinear"],
                                                "attn_res": "none"}))
    (hf / "model.safetensors").write_bytes(b"")
    return hf


def _other_tokenizer_data(reference, root: Path) -> Path:
    from nanokimi.data import prepare

    prepare(reference["corpus"], root / "other", vocab_size=300, progress=False)
    return root / "other"


RUN, CORPUS = "{run}", "{corpus}"
MISTAKES = [  # (arguments, words the one-line error must hold)
    (["train", "train.log_every=0"], ["train.log_every=0", ">= 1"]),
    (["train", "train.eval_every=0"], ["train.eval_every=0"]),
    (["train", "train.save_every=0"], ["train.save_every=0"]),
    (["train", "train.eval_batches=0"], ["train.eval_batches=0"]),
    (["train", "optim.lr=-0.01"], ["optim.lr=-0.01", "positive"]),
    (["train", "optim.weight_decay=-1"], ["optim.weight_decay=-1"]),
    (["train", "optim.beta2=1.0"], ["optim.beta2=1.0", "[0, 1)"]),
    (["train", "train.device=tpu"], ["train.device='tpu'", "'cpu'"]),
    (["train", "data.vocab_size=1000000000"], ["data.vocab_size=1000000000", "at most"]),
    (["train", "model.vocab_size=1000000000"], ["model.vocab_size=1000000000"]),
    (["generate", "--ckpt", RUN, "--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    (["generate", "--ckpt", RUN, "--top-p", "0"], ["--top-p 0.0"]),
    (["generate", "--ckpt", RUN, "--top-p", "1.5"], ["--top-p 1.5"]),
    (["generate", "--ckpt", RUN, "--top-k", "-3"], ["--top-k -3"]),
    (["chat", RUN, "--repetition-penalty", "0"], ["repetition_penalty must be > 0"]),
    (["generate", "--ckpt", RUN, "--repetition-penalty", "-1"], ["--repetition-penalty -1.0", "> 0"]),
    (["generate", "--ckpt", RUN, "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
    (["generate", "--ckpt", RUN, "--prompt", "caf\udce9"], ["not valid UTF-8"]),
    (["generate", "--ckpt", "{root}/nowhere"], ["nowhere", "does not exist"]),
    (["generate", "--ckpt", "{sharded}"], ["sharded checkpoint", "python -m nanokimi.train.sharded_checkpoint"]),
    (["eval", "--ckpt", RUN, "--batches", "0"], ["--batches 0", ">= 1"]),
    (["eval", "--ckpt", RUN, "--data", "{other}"], ["another tokenizer", "--data FILE_OR_FOLDER"]),
    (["train", "--out", RUN, "--resume", "model.hidden_size=64"], ["model.hidden_size=32 there, 64 now",
                                                                   "start a new --out"]),
    (["train", "--out", RUN, "--resume", "optim.name=adamw"], ["optim.name=muon", "resume with"]),
    (["train", "--out", RUN], ["already holds a training run", "--resume"]),
    (["convert", "--to-hf", "{hf}", "--out", "{root}/export"], ["Hugging Face checkpoint", "--from-hf"]),
]


def test_cli_mistakes_give_exit_code_2_and_one_line(env, reference, capsys):
    run = copy_run(reference, env / "run")
    paths = {"run": run, "corpus": reference["corpus"], "root": env, "sharded": _sharded_lookalike(reference, env),
             "hf": _hf_folder(env), "other": _other_tokenizer_data(reference, env)}
    for args, words in MISTAKES:
        argv = [a.format(**paths) for a in args]
        if argv[0] == "train" and "--out" not in argv:
            argv += ["--out", str(env / "fresh"), "--no-progress", f"data.source={reference['corpus']}"]
        elif argv[0] == "train":
            argv.append("--no-progress")
        try:
            one_line_error(capsys, main(argv), *words)
        except AssertionError as e:
            raise AssertionError(f"{argv}: {e}") from None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_cuda_without_a_gpu(env, reference, capsys):
    one_line_error(capsys, cli_train(env / "r", reference["corpus"], "train.device=cuda"), "no CUDA GPU",
                   "train.device=cpu")


def test_unexpected_failures_are_one_line_unless_debugging(env, monkeypatch, capsys):
    from nanokimi import cli

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "cmd_model_info", broken)
    assert main(["model", "info"]) == 1
    err = capsys.readouterr().err
    assert "nanokimi: error: KeyError: 'boom'" in err and "NANOKIMI_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("NANOKIMI_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["model", "info"])
