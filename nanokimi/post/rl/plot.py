"""Curves of RL runs (reward, accuracy, response length, log-prob gap against steps) in one PNG; `nanokimi plot`
uses it when every run given is an RL run."""
from pathlib import Path

from nanokimi.train.plot import read_metrics

PANELS = (("reward_mean", "mean reward"), ("accuracy", "accuracy of the rollouts"),
          ("length_mean", "response length (tokens)"), ("eval_pass@1", "eval pass@1"))


def is_rl_run(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "metrics.jsonl"
    return path.is_file() and any("reward_mean" in r for r in read_metrics(run_dir))


def plot_rl_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FileNotFoundError("plotting needs matplotlib: pip install 'nanokimi[plot]'") from None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 4))
    for run_dir, label in zip(run_dirs, labels or [Path(d).name for d in run_dirs]):
        records = read_metrics(run_dir)
        for ax, (key, title) in zip(axes, PANELS):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None and r[key] == r[key]]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key.startswith("eval") else None)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set(xlabel="RL step", ylabel=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
