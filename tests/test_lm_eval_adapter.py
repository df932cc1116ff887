"""The lm-evaluation-harness adapter: its methods against hand computation, and lm_eval end to end on a local
task (no hub). Skipped when lm_eval is not installed (`pip install -e ".[lmeval]"`)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[lmeval]'")

from nanokimi.checkpoint import save_checkpoint  # noqa: E402
from nanokimi.config import ModelConfig  # noqa: E402
from nanokimi.data import Tokenizer  # noqa: E402
from nanokimi.model import build_model  # noqa: E402
from nanokimi.tasks.lm_eval_adapter import NanokimiLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the cat sat on the mat. " * 4, "a dog ran in the park. " * 4, "answer: yes or no. " * 4]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmeval")
    tokenizer = Tokenizer.train(TEXTS, vocab_size=280)
    tokenizer.save(folder / "tokenizer.json")
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, mixers="KA",
                             num_heads=2, num_experts=0, first_k_dense=2, intermediate_size=64,
                             max_position_embeddings=16)
    torch.manual_seed(0)
    return save_checkpoint(folder / "checkpoint", build_model(cfg), tokenizer_file=folder / "tokenizer.json")


def request(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_by_hand(checkpoint):
    lm = NanokimiLM(ckpt=str(checkpoint), device="cpu")
    tok, model = lm.tokenizer, lm.model
    ids = [tok.eot_id] + tok.encode("the cat sat on the mat.")
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]  # [T-1, V]
    per_token = [float(logprobs[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    context_len = 1 + len(tok.encode("the cat sat"))
    assert ids[1:context_len] == tok.encode("the cat sat")
    (score, greedy), = lm.loglikelihood([request("the cat sat", " on the mat.")])
    assert score == pytest.approx(sum(per_token[context_len - 1:]), abs=1e-4)
    want_greedy = all(int(logprobs[t].argmax()) == ids[t + 1] for t in range(context_len - 1, len(ids) - 1))
    assert greedy == want_greedy
    (rolling,) = lm.loglikelihood_rolling([request("the cat sat on the mat.")])
    assert rolling == pytest.approx(sum(per_token), abs=1e-4)


def test_loglikelihood_rolling_windows_score_every_token_once(checkpoint):
    lm = NanokimiLM(ckpt=str(checkpoint), device="cpu")  # 16 positions: this text takes several windows
    text = TEXTS[0] + TEXTS[1]
    ids = [lm.tokenizer.eot_id] + lm.tokenizer.encode(text)
    assert len(ids) > 40
    expected = 0.0
    for target in range(1, len(ids)):  # each token predicted from at most 16 previous ones, as the windows do
        window_end = min(len(ids), ((target - 1) // 16 + 1) * 16 + 1)
        start = max(0, window_end - 17)
        expected += float(lm._token_logprobs(ids[start:window_end])[0][target - start - 1])
    assert lm.loglikelihood_rolling([request(text)])[0] == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_stops(checkpoint):
    from nanokimi.infer.generate import generate

    lm = NanokimiLM(ckpt=str(checkpoint), device="cpu")
    ids = lm.tokenizer.encode("the cat")
    out = generate(lm.model, torch.tensor([ids]), 6, temperature=0.0)[0, len(ids):].tolist()
    full = lm.tokenizer.decode(out[:out.index(lm.tokenizer.eot_id)] if lm.tokenizer.eot_id in out else out)
    texts = lm.generate_until([request("the cat", {"until": [], "max_gen_toks": 6}),
                               request("the cat", {"until": [full[2:4]] if len(full) > 4 else ["\x00"],
                                                   "max_gen_toks": 6})])
    assert texts[0] == full
    long_context = lm.generate_until([request(TEXTS[0] * 3, {"until": [], "max_gen_toks": 6})])[0]
    kept = lm.tokenizer.encode(TEXTS[0] * 3)[-10:]  # 16 positions - 6 new tokens
    cut = lm.tokenizer.encode(lm.tokenizer.decode(kept))
    new = generate(lm.model, torch.tensor([cut]), 6, temperature=0.0)[0, len(cut):].tolist()
    eot = lm.tokenizer.eot_id
    assert long_context == lm.tokenizer.decode(new[:new.index(eot)] if eot in new else new)
    assert texts[1] == (full[:full.find(full[2:4])] if len(full) > 4 else full)


def test_lm_eval_simple_evaluate_with_a_local_task(checkpoint, tmp_path):
    rows = [{"question": "the cat sat on the", "choices": [" mat.", " dog."], "label": 0},
            {"question": "a dog ran in the", "choices": [" park.", " cat."], "label": 0}]
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "nk_local_mc.yaml").write_text(
        "task: nk_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "nk_local_gen.yaml").write_text(
        "task: nk_local_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: generate_until\ndoc_to_text: \"{{{{question}}}}\"\n"
        "doc_to_target: \"{{choices[0]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    output = lm_eval.simple_evaluate(model="nanokimi", model_args=f"ckpt={checkpoint}", device="cpu",
                                     tasks=["nk_local_mc", "nk_local_gen"], task_manager=manager,
                                     bootstrap_iters=0, log_samples=True)
    results = output["results"]
    assert 0.0 <= results["nk_local_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["nk_local_gen"]
    lm = NanokimiLM(ckpt=str(checkpoint), device="cpu")
    for sample in output["samples"]["nk_local_mc"]:
        scores = [score for score, _ in lm.loglikelihood([request(sample["doc"]["question"], c)
                                                          for c in sample["doc"]["choices"]])]
        assert sample["acc"] == float(max(range(2), key=scores.__getitem__) == sample["doc"]["label"])


def test_lm_eval_cli_entry_point_registers_the_model():
    """`python -m nanokimi.tasks.lm_eval_adapter ...` is lm_eval's CLI with the nanokimi class registered."""
    code = ("import sys; import nanokimi.tasks.lm_eval_adapter as a; from lm_eval.api.registry import get_model; "
            "assert get_model('nanokimi') is a.NanokimiLM; sys.argv = ['x', '--help']; a.main()")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "lm-eval" in proc.stdout, proc.stderr[-2000:]
