"""Figure functions: each takes tidy DataFrames from the run store and returns a figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def set_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def convergence(evaluations: pd.DataFrame, title: str = "") -> plt.Figure:
    """Left: best-so-far fitness against evaluations spent. Right: best and mean per generation.

    ``evaluations`` is ``RunStore.evaluations(run_id)`` (one or several runs; one line per run).
    """
    set_style()
    fig, (spent, per_gen) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run_id, frame in evaluations.groupby("run_id", sort=False):
        frame = frame.sort_values("seq")
        label = run_id if evaluations["run_id"].nunique() > 1 else "best so far"
        spent.step(frame["seq"] + 1, frame["fitness"].cummin(), where="post", label=label)
        by_generation = frame.groupby("generation")["fitness"]
        per_gen.plot(by_generation.min().index, by_generation.min().values, marker="o", label=f"best {label}")
        per_gen.plot(by_generation.mean().index, by_generation.mean().values, marker=".", linestyle="--",
                     label=f"mean {label}")
    spent.set(xlabel="fitness evaluations spent", ylabel="fitness (1 - val macro acc)", title="best so far")
    per_gen.set(xlabel="generation (-1: initial population)", ylabel="fitness", title="per generation")
    spent.legend(fontsize="small")
    per_gen.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
