"""NBCE on many-shot in-context lookup: accuracy vs number of examples, NBCE vs truncation to the last window.

Task: each prompt shows N examples, one per line, of a fresh random mapping key -> label (one of 200 key
characters, then its digit), then asks one of the keys (the last line is the key alone; the label comes
next). A small character-level model is pretrained in this script on lines of such mappings that fit one
window, keys repeating, loss on every label: a repeated key's label is predictable, a new key's is noise, so a
window without the key is unsure. Then, for N beyond the window, it answers with NBCE over all windows
(nbce_window = W) or with the last window alone (truncation: what plain decoding of a cut prompt sees).

    python benchmarks/nbce_icl.py            # one GPU, a few minutes
    python benchmarks/nbce_icl.py --batch 32 --train-seconds 1100   # the 2-core CPU, ~20 minutes
    python benchmarks/nbce_icl.py --smoke    # CPU, under a minute: runs end to end, numbers meaningless
"""
import argparse
import math
import random
import time

import perf_common  # noqa: F401  (puts the repository root on sys.path)
import torch

from nanokimi import ModelConfig, build_model
from nanokimi.infer import LLM, SamplingParams
from nanokimi.infer.nbce import nbce_windows
from perf_common import environment, print_table, results_path, write_results

KEYS = "".join(chr(0x100 + i) for i in range(200))  # 200 one-character keys
DIGITS = "0123456789"
ALPHABET = DIGITS + "\n" + KEYS


class CharTokenizer:
    """One id per character; id 0 ends a text."""
    eot_id = 0
    stop_ids = {0}
    vocab_size = len(ALPHABET) + 1

    def encode(self, text):
        return [ALPHABET.index(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i - 1] for i in ids if 0 < i <= len(ALPHABET))


def episode(rng: random.Random, n: int) -> tuple[list[str], dict]:
    """n lines 'KL' (a key character, its digit label) of a fresh random mapping."""
    keys = rng.sample(KEYS, n)
    mapping = {k: rng.choice(DIGITS) for k in keys}
    return [f"{k}{mapping[k]}\n" for k in keys], mapping


def training_batch(rng: random.Random, tok, batch: int, lines: int, device):
    """Rows of `lines` lines 'KL' whose keys are drawn, with repeats, from a fresh mapping of 2..2*lines keys
    (the size log-uniform: rows with few keys repeat them often, which is what teaches the lookup; with the size
    uniform, most labels were new and a 4-layer model stayed at chance for 6,000 steps); the loss is on every
    label. A label whose key was shown before is predictable; one whose key is new is noise, so the model
    learns to be unsure when the key is not in its window. Also returns the loss floor: the share of labels
    whose key is new, times ln 10."""
    rows, targets, new = [], [], 0
    for _ in range(batch):
        _, mapping = episode(rng, round(math.exp(rng.uniform(math.log(2), math.log(2 * lines)))))
        keys = list(mapping)
        ids, tgt, seen = [], [], set()
        for _ in range(lines):
            key = rng.choice(keys)
            new += key not in seen
            seen.add(key)
            ids += tok.encode(f"{key}{mapping[key]}\n")
            tgt += [tok.encode(mapping[key])[0], -100, -100]  # the label is predicted at its key
        rows.append(ids[:-1])
        targets.append(tgt[:-1])
    floor = new / (batch * lines) * math.log(10)
    return torch.tensor(rows, device=device), torch.tensor(targets, device=device), floor


def pretrain(model, tok, steps: int, seconds: float, batch: int, lines: int, device,
             lr: float) -> tuple[list[float], list[float]]:
    """AdamW for `steps` steps or `seconds` seconds, whichever ends first, or until the loss is within 0.05 of
    its floor (mean over 100 steps); the learning rate warms up over 50 steps and decays linearly (to a tenth)
    with the share of the budget used. Returns the losses and the floors."""
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    losses, floors = [], []
    model.train()
    started = time.time()
    reported = 0.0
    for step in range(steps):
        used = max((time.time() - started) / seconds, step / steps)
        if used >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * max(0.1, 1 - used)
        x, y, floor = training_batch(rng, tok, batch, lines, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(x, y, chunk_tokens=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        floors.append(floor)
        if step >= 200 and sum(losses[-100:]) - sum(floors[-100:]) < 0.05 * 100:
            print(f"pretrain step {step}: loss {loss.item():.3f}, within 0.05 of its floor: done", flush=True)
            break
        if used >= reported:
            print(f"pretrain step {step}: loss {loss.item():.3f}, floor {floor:.3f} ({time.time() - started:.0f} s)",
                  flush=True)
            reported += 0.1
    model.eval()
    return losses, floors


def plot(path, counts, results, scores, per_window, window) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in scores:
        ax.plot(counts, [results[f"n{n}"][name] for n in counts], marker="o", label=name)
    ax.axvline(per_window, color="grey", ls=":", label="one window")
    ax.set(xscale="log", xlabel="examples in the prompt", ylabel="accuracy",
           title=f"many-shot lookup, window {window}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--window", type=int, default=64, help="tokens per window (the model's trained length)")
    parser.add_argument("--steps", type=int, default=50_000, help="most pretraining steps")
    parser.add_argument("--train-seconds", type=float, default=240, help="pretraining time budget")
    parser.add_argument("--trials", type=int, default=200, help="prompts per number of examples")
    parser.add_argument("--beta", type=float, default=0.25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=128, help="rows per pretraining step")
    parser.add_argument("--hidden", type=int, default=128, help="model width (4 heads; 2 layers)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    counts = [8, 16, 32, 64, 128]
    if args.smoke:
        args.steps, args.trials, counts = 30, 6, [8, 32]
    tok = CharTokenizer()
    per_window = (args.window - 1) // 3  # examples that fit one window beside the query
    # 2 layers of 128 at 1e-3 learned the lookup on the CPU (loss 1.88 -> 1.54 around step 2,000, floor 0.95);
    # 4 layers of 256 at 2e-3 were still at 1.82 after 6,662 steps on an H100
    hidden = 64 if args.smoke else args.hidden
    cfg = ModelConfig.preset("tiny-dense", vocab_size=CharTokenizer.vocab_size, hidden_size=hidden, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=hidden // 4, intermediate_size=3 * hidden,
                             max_position_embeddings=2 * args.window)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    started = time.time()
    losses, floors = pretrain(model, tok, args.steps, args.train_seconds, 8 if args.smoke else args.batch, per_window, device,
                              args.lr)
    train_s = time.time() - started
    llm = LLM(model, tokenizer=tok, max_cache_tokens=8192, dtype="auto" if device.type == "cpu" else "bfloat16")
    rng = random.Random(1)
    rows, results = [], {}
    for n in counts:
        prompts, labels, truncated = [], [], []
        for _ in range(args.trials):
            lines, mapping = episode(rng, n)
            key = rng.choice(list(mapping))
            prompt = "".join(lines) + key
            windows, _ = nbce_windows(tok, prompt, args.window)
            prompts.append(prompt)
            labels.append(mapping[key])
            truncated.append(tok.decode(windows[-1]))
        greedy = dict(max_tokens=1, temperature=0, ignore_eos=True)
        scores = {}
        for name, texts, params in (
                ("truncation", truncated, SamplingParams(**greedy)),
                ("nbce min_entropy", prompts, SamplingParams(**greedy, nbce_window=args.window, nbce_beta=args.beta)),
                ("nbce mean", prompts, SamplingParams(**greedy, nbce_window=args.window, nbce_beta=args.beta,
                                                      nbce_pooling="mean"))):
            outs = llm.generate(texts, params, use_tqdm=False)
            scores[name] = sum(o.text == label for o, label in zip(outs, labels)) / len(labels)
        windows_used = len(nbce_windows(tok, prompts[0], args.window)[0])
        in_last = min(1.0, per_window / n)
        rows.append([n, windows_used, f"{in_last:.2f}", *(f"{v:.3f}" for v in scores.values())])
        results[f"n{n}"] = {"examples": n, "windows": windows_used, "key_in_last_window": in_last, **scores}
    print_table(["examples", "windows", "P(key in last window)", *scores], rows)
    path = results_path("nbce_icl", args.smoke)
    write_results(path, environment(device), results,
                  extra={"settings": vars(args), "pretrain_seconds": round(train_s, 1), "pretrain_steps": len(losses),
                         "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                         "loss_floor": sum(floors[-20:]) / len(floors[-20:]), "examples_per_window": per_window,
                         "model": {k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "mixers")}})
    try:
        plot(path.with_suffix(".png"), counts, results, scores, per_window, args.window)
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
    print(f"wrote {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
