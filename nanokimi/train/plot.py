"""Loss curves of one or more runs against tokens seen, in one PNG."""
import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{run_dir}' is not a training run folder.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[str], out: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FileNotFoundError("plotting needs matplotlib: pip install 'nanokimi[plot]'") from None
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        label = Path(run_dir).name
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        val = [(r["tokens"], r["val_bpb"]) for r in records if "val_bpb" in r]
        if train:
            train_ax.plot(*zip(*train), label=label)
        if val:
            val_ax.plot(*zip(*val), marker="o", label=label)
    train_ax.set(xlabel="tokens", ylabel="train loss (nats/token)", title="training loss")
    val_ax.set(xlabel="tokens", ylabel="validation bits per byte", title="validation")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
