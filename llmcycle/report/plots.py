"""The plots of `llmcycle report`, drawn with matplotlib's Agg backend into PNG bytes.

Each function takes what the report collected (runs with their metrics.jsonl rows, the variant rows)
and returns a Plot: PNG bytes, or None with a one-line note saying why there is nothing to draw. A plot
without data is never drawn empty. matplotlib is imported here only, when a report is made.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

# Stage colours, the same in every plot so a stage is recognisable at a glance.
STAGE_COLOURS = {"pretrain": "#7f7f7f", "prompt": "#1f77b4", "tune": "#2ca02c", "align": "#d62728",
                 "optimize": "#9467bd", "eval": "#8c564b", "augment": "#e377c2"}
# metrics.jsonl keys that a PPO step logs (llmcycle/stages/align/ppo.py); runs with them get the PPO plot.
PPO_KEYS = ("reward_mean", "kl")


@dataclass
class Plot:
    name: str          # file stem in the Markdown report's folder, and the --json "plots" entry
    title: str
    png: bytes | None  # None: omitted, and `note` says why
    note: str = ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: a report is made in terminals and CI
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_curves(runs) -> Plot:
    """Training loss (solid) and validation loss (dashed, dots) against the step, a panel per stage.
    `runs`: (label, stage, metrics rows) of every run that logged a loss; PPO runs have their own plot."""
    title = "Training and validation loss"
    curves = [(label, stage, rows) for label, stage, rows in runs
              if not any(k in r for r in rows for k in PPO_KEYS)
              and (_series(rows, "loss")[0] or _series(rows, "val_loss")[0])]
    if not curves:
        return Plot("loss", title, None, "no run logged a training loss in its metrics.jsonl "
                    "(pretrain, tune and distill runs do)")
    plt = _pyplot()
    stages = list(dict.fromkeys(stage for _, stage, _ in curves))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages) + 1, 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for i, (label, _, rows) in enumerate(c for c in curves if c[1] == stage):
            colour = f"C{i % 10}"
            ax.plot(*_series(rows, "loss"), color=colour, label=f"{label} train")
            steps, val = _series(rows, "val_loss")
            if steps:
                ax.plot(steps, val, "o--", color=colour, label=f"{label} val")
        ax.set(title=stage, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return Plot("loss", title, _png(fig))


def _reward_keys(rows) -> list[str]:
    """The per-reward means a GRPO / RLOO step logs (reward_<name>_mean), in first-seen order."""
    keys = {}
    for row in rows:
        for key in row:
            if key.startswith("reward_") and key.endswith("_mean") and key != "reward_mean":
                keys[key] = True
    return list(keys)


def ppo_curves(runs) -> Plot:
    """The mean reward per step (PPO: score minus the KL penalty, and the score alone; GRPO / RLOO: the
    weighted sum, and each reward), and the KL to the reference."""
    title = "Policy reward and KL (PPO, GRPO, RLOO)"
    curves = [(label, rows) for label, _, rows in runs
              if _series(rows, "reward_mean")[0] or _series(rows, "kl")[0]]
    if not curves:
        return Plot("ppo", title, None, "no align run logged PPO / GRPO steps (reward_mean / kl in metrics.jsonl)")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, rows) in enumerate(curves):
        colour = f"C{i % 10}"
        left.plot(*_series(rows, "reward_mean"), color=colour, label=f"{label} reward")
        steps, score = _series(rows, "score_mean")
        if steps:
            left.plot(steps, score, "--", color=colour, label=f"{label} score")
        for style, key in zip(("--", ":", "-.") * 3, _reward_keys(rows)):
            left.plot(*_series(rows, key), style, color=colour, label=f"{label} {key[7:-5]}")
        right.plot(*_series(rows, "kl"), color=colour, label=label)
    left.set(title="reward per response", xlabel="step", ylabel="reward")
    right.set(title="KL to the reference policy", xlabel="step", ylabel="KL (PPO: per response; GRPO: per token)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return Plot("ppo", title, _png(fig))


def quality_bars(rows: list[dict], threshold: float | None) -> Plot:
    """The headline metric per variant with its 95% interval; the success threshold as a line."""
    rows = [r for r in rows if isinstance(r.get("quality"), (int, float)) and r.get("headline")]
    names = sorted({r["headline"] for r in rows})
    title = f"{'/'.join(names) or 'quality'} per variant"
    if not rows:
        return Plot("quality", title, None, "no evaluated run: nothing to compare")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.3))
    y = list(range(len(rows)))[::-1]  # first row at the top, as in the table
    ax.barh(y, [r["quality"] for r in rows], color=[STAGE_COLOURS.get(r["stage"], "C0") for r in rows])
    for yi, r in zip(y, rows):
        if r.get("ci"):
            ax.plot(r["ci"], [yi, yi], color="black", lw=1.2)
    if threshold is not None:
        ax.axvline(threshold, color="black", ls=":", label=f"success threshold {threshold:g}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=7)
    ax.set_xlabel(f"{'/'.join(names)} (bar) with 95% interval (line)")
    ax.grid(axis="x", alpha=0.3)
    return Plot("quality", title, _png(fig))


def quality_scatter(name: str, rows: list[dict], key: str, unit: str, budget: float | None,
                    threshold: float | None, missing_note: str) -> Plot:
    """Quality against a cost (latency or size), one point per variant, coloured by stage; the
    budget and the success threshold as dotted lines, so the acceptable corner is visible."""
    title = f"Quality vs {unit}"
    points = [r for r in rows if isinstance(r.get("quality"), (int, float)) and r.get("headline")
              and isinstance(r.get(key), (int, float))]
    if not points:
        return Plot(name, title, None, missing_note)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for stage in dict.fromkeys(r["stage"] for r in points):
        mine = [r for r in points if r["stage"] == stage]
        ax.scatter([r[key] for r in mine], [r["quality"] for r in mine], label=stage,
                   color=STAGE_COLOURS.get(stage, "C0"), zorder=3)
    # Variants of one stage on one model (prompt variants) share an x: name only the best of them,
    # or their labels pile up into an unreadable smear.
    best: dict[tuple, dict] = {}
    for r in points:
        spot = (r["stage"], round(r[key], 1))
        if spot not in best or r["quality"] > best[spot]["quality"]:
            best[spot] = r
    for r in best.values():
        ax.annotate(r["label"], (r[key], r["quality"]), fontsize=7, xytext=(5, 2), textcoords="offset points")
    if budget is not None:
        ax.axvline(budget, color="black", ls=":", lw=1, label=f"budget {budget:g}")
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls=":", lw=1, label=f"threshold {threshold:g}")
    ax.set(xlabel=unit, ylabel="/".join(sorted({r["headline"] for r in points})))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return Plot(name, title, _png(fig))
