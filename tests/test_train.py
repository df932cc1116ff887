"""End to end through the CLI on a small corpus: train, resume, generate, eval, plot, and the errors."""
import json
import warnings
from pathlib import Path

import pytest

from nanokimi.cli import main
from nanokimi.checkpoint import load_trainer_state, resolve_checkpoint

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
SMALL_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.mixers=KA", "model.num_heads=2",
               "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
               "model.v_head_dim=16", "model.kda_num_heads=2", "model.kda_head_dim=16",
               "model.intermediate_size=128", "model.num_experts=4", "model.moe_intermediate_size=32"]
FAST = ["train.batch_size=4", "train.seq_len=32", "train.log_every=1", "train.eval_every=5",
        "train.eval_batches=2", "train.save_every=5", "train.sample_tokens=0", "data.vocab_size=300",
        "optim.warmup_steps=3", "optim.lr=0.01"]


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOKIMI_CACHE", str(tmp_path / "cache"))
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text()[:120_000]
    else:
        text = "\n\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(3000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def train(out, corpus, *extra):
    return main(["train", "--out", str(out), "--no-progress", f"data.source={corpus}", *SMALL_MODEL, *FAST, *extra])


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def test_train_generate_eval_plot(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train(out, corpus, "train.max_steps=25") == 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 25 and "val_bpb" in records[-1]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(records[0])
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert (out / "checkpoints" / "latest").is_file() and (out / "config.toml").is_file()
    capsys.readouterr()

    assert main(["generate", "--ckpt", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")

    assert main(["eval", "--ckpt", str(out), "--batches", "2", "--batch-size", "2", "--seq-len", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["val_bpb"] < 20

    png = tmp_path / "loss.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_checkpoint_exports_to_transformers(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    import torch

    from nanokimi.checkpoint import load_model_checkpoint

    out = tmp_path / "run"
    assert train(out, corpus, "train.max_steps=3") == 0
    assert main(["convert", "--to-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    ours = load_model_checkpoint(resolve_checkpoint(out)).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_resumed_run_equals_uninterrupted(tmp_path, corpus):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(whole, corpus, "train.max_steps=12") == 0
    assert train(parts, corpus, "train.max_steps=12", "train.stop_at=7") == 0
    assert max(losses(parts)) == 7
    assert main(["train", "--out", str(parts), "--resume", "--no-progress", "train.stop_at=0"]) == 0
    a, b = losses(whole), losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def test_cuda_graph_option_on_cpu_warns_and_trains_the_same(tmp_path, corpus):
    plain, graphed = tmp_path / "plain", tmp_path / "graphed"
    assert train(plain, corpus, "train.max_steps=5") == 0
    with pytest.warns(UserWarning, match="CapturedStep: the parameters are not all on a CUDA device"):
        assert train(graphed, corpus, "train.max_steps=5", "optim.cuda_graph=true") == 0
    a, b = losses(plain), losses(graphed)
    assert sorted(a) == sorted(b) == list(range(1, 6))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.gpu
@pytest.mark.parametrize("graph", ["optim.cuda_graph=true", "train.cuda_graph=true"])
def test_cuda_graph_training_on_gpu_follows_the_eager_run(tmp_path, corpus, graph):
    # QK-Clip (tau low enough to clip) and MoE router-bias updates run between the captured optimizer steps, or
    # inside the captured whole step
    extra = ["train.max_steps=8", "train.device=cuda", "optim.qk_clip_tau=5", "optim.router_bias_rate=0.01"]
    eager = ["train.compile=false", "train.cuda_graph=false", "optim.cuda_graph=false"]
    graphed_settings = ["train.compile=false", graph] + (["train.cuda_graph=false"] if "optim" in graph else [])
    eager_dir, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert train(eager_dir, corpus, *extra, *eager) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(graphed, corpus, *extra, *graphed_settings) == 0
    assert not [w for w in caught if "CapturedStep" in str(w.message) or "TrainStep" in str(w.message)]
    a, b = losses(eager_dir), losses(graphed)
    assert sorted(a) == sorted(b) == list(range(1, 9))  # 3 eager warm-up steps, then captured and replayed
    for step in a:  # bf16 autocast and atomics: close, not bitwise
        assert abs(a[step] - b[step]) <= 2e-2 * abs(a[step]), (step, a[step], b[step])


def test_help_shows_every_default(capsys):
    from nanokimi.cli import main
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS default 200" in text and "--top-k TOP_K default 0" in text


@pytest.mark.parametrize("args, message", [
    (["train.max_stps=3"], "Did you mean 'train.max_steps'"),
    (["trian.max_steps=3"], "Did you mean 'train'"),
    (["train.max_steps=lots"], "train.max_steps must be int"),
    (["model.hiden_size=3"], "Did you mean 'model.hidden_size'"),
    (["data.source=/no/such/corpus.txt"], "/no/such/corpus.txt"),
])
def test_bad_input_gives_one_clear_error(tmp_path, corpus, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "r"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_corpus_and_occupied_output_dir(tmp_path, corpus, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--out", str(tmp_path / "r"), f"data.source={empty}"]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    out = tmp_path / "run"
    assert train(out, corpus, "train.max_steps=2") == 0
    capsys.readouterr()
    assert train(out, corpus, "train.max_steps=2") == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume", "--no-progress",
                 f"data.source={corpus}"]) == 2
    assert "no checkpoint to continue from" in capsys.readouterr().err


def test_corrupted_shard_is_detected(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train(out, corpus, "train.max_steps=1") == 0
    data_dir = Path(load_trainer_state(resolve_checkpoint(out))["data_dir"])
    shard = sorted(data_dir.glob("train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert train(tmp_path / "again", corpus, "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert shard.name in err and "Traceback" not in err


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path, corpus, capsys):
    code = train(tmp_path / "nan", corpus, "train.max_steps=6", "optim.name=adamw", "optim.lr=1e30",
                 "train.grad_clip=0", "optim.warmup_steps=0", "optim.qk_clip=false")
    err = capsys.readouterr().err
    assert code == 2 and "at step" in err and "checkpoint" in err


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-X", "faulthandler", "-m", "nanokimi.cli", "train", "--out", str(out), "--no-progress",
           f"data.source={corpus}", *SMALL_MODEL, *FAST, "train.max_steps=100000"]
    # a shell's background job (e.g. `bash .ci/run &`) ignores SIGINT, and so would the child: restore it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where the run is (faulthandler dumps every thread on SIGABRT)
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the run did not exit within 120 s of Ctrl-C; its threads' stacks:\n{err[-8000:]}")
    assert proc.returncode == 2 and "interrupted at step" in err and "Traceback" not in err
    assert load_trainer_state(resolve_checkpoint(out))["step"] >= 3
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_kernel_and_muon_execution_settings_reach_the_model_and_the_optimizer(tmp_path, corpus):
    from nanokimi.config import ConfigError
    from nanokimi.model.attn_res import AttentionResiduals
    from nanokimi.train.config import load_run_config
    from nanokimi.train.trainer import Trainer

    settings = [*SMALL_MODEL, *FAST, f"data.source={corpus}", "model.attn_res=block", "model.attn_res_blocks=2",
                "train.attn_res_storage=fp32", "train.attn_res_fuse_norm=false", "optim.muon_side_stream=false",
                "optim.muon_combo_kernels=false"]
    trainer = Trainer(load_run_config(None, None, settings), tmp_path / "run", progress=False)
    residuals = [m for m in trainer.model.modules() if isinstance(m, AttentionResiduals)]
    assert residuals and all(m.storage == "fp32" and m.fuse_norm is False for m in residuals)
    execution = trainer.optimizer.optimizers["muon"].execution
    assert not execution.side_stream and not execution.combo_kernels and execution.overlap_passes

    old = tmp_path / "old.toml"  # a run config written before the kernel settings left [model]
    old.write_text('[model]\nattn_res = "block"\nattn_res_storage = "fp32"\nattn_res_fuse_norm = false\n')
    with pytest.warns(UserWarning) as caught:
        run = load_run_config(None, str(old))
    assert {str(w.message).split(" is ")[0] for w in caught} == {"config key 'model.attn_res_storage'",
                                                                  "config key 'model.attn_res_fuse_norm'"}
    assert (run.train.attn_res_storage, run.train.attn_res_fuse_norm, run.model.attn_res) == ("fp32", False, "block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_run_config(None, str(old), ["train.attn_res_storage=auto"]).train.attn_res_storage == "auto"
    with pytest.raises(ConfigError, match="train.attn_res_storage='bf16' must be one of auto, auto-all, fp32"):
        load_run_config(None, None, ["train.attn_res_storage=bf16"])
