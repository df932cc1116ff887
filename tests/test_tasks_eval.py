"""`nanokimi eval --task` end to end on a tiny CPU model, and the evaluation runner with a scripted model."""
import json

import pytest
import torch

from nanokimi.checkpoint import save_checkpoint
from nanokimi.cli import main
from nanokimi.config import ModelConfig
from nanokimi.data import Tokenizer
from nanokimi.model import build_model
from nanokimi.tasks import get_task
from nanokimi.tasks.evaluate import Completion, evaluate_task, format_table, llm_generate_fn, model_generate_fn


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    task = get_task("ladder", levels="1-2", per_level=4)
    texts = [task.sft_text(e) for e in task.export(200)]
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    folder = tmp_path_factory.mktemp("ladder")
    tokenizer.save(folder / "tokenizer.json")
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, mixers="KA",
                             num_heads=2, num_experts=0, first_k_dense=2, intermediate_size=64)
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(folder / "checkpoint", model, tokenizer_file=folder / "tokenizer.json"), tokenizer


def test_eval_task_ladder_end_to_end(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "results.json"
    code = main(["eval", "--ckpt", str(ckpt), "--task", "ladder", "--n", "4", "--k", "1,2,4", "--max-tokens", "12",
                 "--limit", "4", "--out", str(out), "--no-progress", "levels=1-2", "per_level=2"])
    assert code == 0
    table = capsys.readouterr().out
    assert "pass@4" in table and "maj@2" in table and table.count("\n") >= 3
    result = json.loads(out.read_text())
    assert result["settings"]["n"] == 4 and result["settings"]["k"] == [1, 2, 4]
    assert result["settings"]["options"] == {"levels": "1-2", "per_level": 2}
    assert len(result["problems"]) == 4 and {p["difficulty"] for p in result["problems"]} == {1, 2}
    task = get_task("ladder")
    for problem in result["problems"]:
        assert len(problem["samples"]) == 4
        for sample in problem["samples"]:
            assert 0 <= sample["num_tokens"] <= 12
            assert sample["correct"] == task.is_correct(sample["text"], problem["answer"])
    assert set(result["summary"]["levels"]) == {"1", "2"}


def test_eval_task_bad_input_is_one_line(tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    for argv, message in [(["--task", "gsm9k"], "unknown task 'gsm9k'"),
                          (["--task", "ladder", "--n", "2", "--k", "4"], "every k must lie in 1..n"),
                          (["--task", "gsm8k"], "pass --data PATH"),
                          (["--task", "math500", "--data", "/nonexistent/m.jsonl"], "does not exist"),
                          (["--task", "ladder", "levels=0-3"], "1..20"),
                          (["--task", "ladder", "bogus"], "key=value")]:
        assert main(["eval", "--ckpt", str(ckpt), "--no-progress"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("nanokimi: error:") and message in err and "\n" not in err


def test_tasks_export_cli(tmp_path, capsys):
    out = tmp_path / "mused.jsonl"
    assert main(["tasks", "export", "mused", "--out", str(out), "--levels", "1-3", "--count", "7", "distractors=1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    task = get_task("mused", levels="1-3", distractors=1)
    assert len(rows) == 7 and {r["difficulty"] for r in rows} == {1, 2, 3}
    assert all(r["text"].startswith("Premises:") and task.is_correct(r["text"], r["answer"]) for r in rows)
    questions = {r["text"].split("?\n")[0] + "?\n" for r in rows}
    assert all(q.endswith("?\n") and "####" not in q for q in questions) and len(questions) == 7
    assert not {e.question for e in task.examples()} & questions
    assert main(["tasks", "export", "gsm8k", "--out", str(out)]) == 2
    assert "generated tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tasks", "export", "ladder", "--out", str(out), "--bogus"])


def test_model_generate_fn_rows_match_single_prompt_generation(tiny_checkpoint):
    """Batched over equal-length prompts and samples, greedy rows equal one prompt at a time."""
    from nanokimi.checkpoint import load_model_checkpoint

    ckpt, tokenizer = tiny_checkpoint
    model = load_model_checkpoint(ckpt).eval()
    prompts = [e.question for e in get_task("ladder", levels="1-3", per_level=2).examples()]
    batched = model_generate_fn(model, tokenizer, max_batch_rows=3)(prompts, 2, 0.0, 8, 0, ())
    for prompt, completions in zip(prompts, batched):
        alone = model_generate_fn(model, tokenizer)([prompt], 1, 0.0, 8, 0, ())[0][0]
        assert [c.text for c in completions] == [alone.text, alone.text]
        assert all(c.num_tokens <= 8 and c.truncated == (c.num_tokens == 8) for c in completions)


def test_evaluate_task_with_a_scripted_model():
    """Samples graded and summarised exactly: level 1 always right, level 2 right once in four."""
    task = get_task("ladder", levels="1-2", per_level=3)
    answers = {e.question: e for e in task.examples()}
    calls = []

    def generate_fn(prompts, n, temperature, max_tokens, seed, stop):
        calls.append((len(prompts), n, temperature, max_tokens, seed, stop))
        out = []
        for prompt in prompts:
            e = answers[prompt]
            right = f"{e.solution}\n\nmore text #### 0"
            wrong = "#### 100000"
            samples = [right] * n if e.difficulty == 1 else [right] + [wrong] * (n - 1)
            out.append([Completion(text, i == n - 1, 10 + i) for i, text in enumerate(samples)])
        return out

    result = evaluate_task(task, generate_fn, n=4, ks=[1, 4], temperature=0.5, max_tokens=32, seed=7,
                           prompts_per_call=4, progress=False)
    assert calls == [(4, 4, 0.5, 32, 7, ("\n\n",)), (2, 4, 0.5, 32, 11, ("\n\n",))]
    levels = result["summary"]["levels"]
    assert levels[1]["pass@1"] == 1.0 and levels[2]["pass@1"] == 0.25 and levels[2]["pass@4"] == 1.0
    assert levels[1]["maj@4"] == 1.0 and levels[2]["maj@4"] == 0.0 and levels[2]["maj@1"] == 0.25
    assert result["summary"]["all"]["mean_tokens"] == 11.5
    assert levels[1]["truncated"] == 0.0  # the stop string cut the last sample, so it was not truncated
    assert levels[2]["truncated"] == 0.25
    assert "\n\n" not in result["problems"][0]["samples"][0]["text"]
    assert format_table(result).splitlines()[0].split()[:4] == ["level", "problems", "pass@1", "pass@4"]


def test_llm_generate_fn_maps_engine_outputs():
    """The engine path (INTERFACES.md: LLM.generate -> RequestOutput.outputs) becomes Completions."""
    from types import SimpleNamespace

    seen = {}

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm=True):
            seen.update(params=params, prompts=prompts)
            return [SimpleNamespace(outputs=[SimpleNamespace(index=1, text="b\n\nx", token_ids=[1, 2, 3],
                                                             finish_reason="length"),
                                             SimpleNamespace(index=0, text="a", token_ids=[1], finish_reason="stop")])
                    for _ in prompts]

    params_cls = lambda **kw: kw  # noqa: E731
    out = llm_generate_fn(FakeLLM(), params_cls)(["p", "q"], 2, 0.7, 16, 3, ("\n\n",))
    assert seen["params"] == {"n": 2, "temperature": 0.7, "max_tokens": 16, "seed": 3, "stop": ["\n\n"]}
    assert out[0] == [Completion("a", False, 1), Completion("b", True, 3)] and len(out) == 2


def _engine_available() -> bool:
    try:
        from nanokimi.infer import LLM, SamplingParams  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _engine_available(), reason="nanokimi.infer.LLM (branch engine) is not merged here")
def test_engine_generate_fn_matches_generate(tiny_checkpoint):
    """The default generate_fn uses the engine when it exists; greedy, it writes what generate() writes."""
    from nanokimi.checkpoint import load_model_checkpoint
    from nanokimi.tasks.evaluate import load_generate_fn

    ckpt, tokenizer = tiny_checkpoint
    engine_fn = load_generate_fn(str(ckpt), device="cpu")
    assert engine_fn.__qualname__.startswith("llm_generate_fn")
    prompts = [e.question for e in get_task("ladder", levels="1-3", per_level=2).examples()]
    by_engine = engine_fn(prompts, 2, 0.0, 8, 0, ("\n\n",))
    by_generate = model_generate_fn(load_model_checkpoint(ckpt).eval(), tokenizer)(prompts, 2, 0.0, 8, 0, ("\n\n",))
    assert [[c.text for c in row] for row in by_engine] == [[c.text for c in row] for row in by_generate]


def test_chat_prompts_are_encoded_with_encode_chat(tiny_checkpoint):
    """A rendered chat template reaches the model as encode_chat's ids (<|im_end|> one id), on both generate_fns."""
    from nanokimi.checkpoint import load_model_checkpoint
    from nanokimi.data.chat import ChatTemplate
    from nanokimi.infer import LLM, SamplingParams

    ckpt, tokenizer = tiny_checkpoint
    rendered = ChatTemplate().render([{"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"},
                                      {"role": "user", "content": "2 + 2"}], add_generation_prompt=True)
    assert tokenizer.encode_chat(rendered) != tokenizer.encode(rendered)
    llm = LLM(str(ckpt), device="cpu")
    sent = []
    generate = llm.generate
    llm.generate = lambda *args, **kwargs: sent.append(kwargs["prompt_token_ids"]) or generate(*args, **kwargs)
    by_engine = llm_generate_fn(llm, SamplingParams)([rendered], 2, 0.0, 6, 0, (), chat=True)
    assert sent == [[tokenizer.encode_chat(rendered)]]
    by_generate = model_generate_fn(load_model_checkpoint(ckpt).eval(), tokenizer)([rendered], 2, 0.0, 6, 0, (),
                                                                                 chat=True)
    assert [[c.text for c in row] for row in by_engine] == [[c.text for c in row] for row in by_generate]


def test_evaluate_task_chat_form():
    """With a chat template, prompts are the task's messages rendered, and no stop strings apply."""
    task = get_task("ladder", levels="2", per_level=2, few_shot=1)
    rendered = []

    class Template:
        def render(self, messages, add_generation_prompt=True):
            assert add_generation_prompt and messages[-1]["role"] == "user"
            text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"
            rendered.append(text)
            return text

    answers = {}

    def generate_fn(prompts, n, temperature, max_tokens, seed, stop, chat=False):
        assert stop == () and prompts == rendered and chat
        return [[Completion("thinking\n\nstill\n#### " + answers[p], False, 5)] * n for p in prompts]

    for e in task.examples():
        answers[Template().render(task.messages(e))] = e.answer
    rendered.clear()
    result = evaluate_task(task, generate_fn, n=2, ks=[1], progress=False, chat_template=Template())
    assert result["summary"]["all"]["pass@1"] == 1.0 and result["settings"]["chat"] is True
    assert result["problems"][0]["prompt"].startswith("<user>") and "<assistant>" in result["problems"][0]["prompt"]
    assert len(task.messages(task.examples()[0])) == 3  # one worked example as an earlier turn


def test_eval_chat_flag_uses_the_checkpoint_template(tiny_checkpoint, tmp_path):
    pytest.importorskip("nanokimi.data.chat", reason="the chat template (branch chat) is not merged here")
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "chat.json"
    assert main(["eval", "--ckpt", str(ckpt), "--task", "ladder", "--chat", "--max-tokens", "6", "--limit", "2",
                 "--out", str(out), "--no-progress", "levels=1", "per_level=2"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["chat"] and result["problems"][0]["prompt"] != get_task("ladder").examples()[0].question
