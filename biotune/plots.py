"""Figure functions: each takes tidy DataFrames from the run store and returns a figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator


def set_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def convergence(evaluations: pd.DataFrame, generations: pd.DataFrame | None = None,
                title: str = "") -> plt.Figure:
    """Left: best-so-far fitness against evaluations spent (one line per run).
    Right (with a GA logbook): the population's best and mean ± std fitness per generation.

    ``evaluations`` is ``RunStore.evaluations(...)``; ``generations`` the run's logbook
    (``RunStore.generations(run_id)``), generation -1 being the initial population.
    """
    set_style()
    panels = 2 if generations is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    spent = axes[0, 0]
    for run_id, frame in evaluations.groupby("run_id", sort=False):
        frame = frame.sort_values("seq")
        spent.step(frame["seq"] + 1, frame["fitness"].cummin(), where="post", label=run_id)
    spent.set(xlabel="fitness evaluations spent", ylabel="best fitness so far", title="best so far")
    spent.legend(fontsize="x-small")
    if generations is not None:
        per_generation = axes[0, 1]
        x = generations["generation"]
        per_generation.plot(x, generations["best"], marker="o", label="best")
        per_generation.plot(x, generations["mean"], marker=".", linestyle="--", label="mean")
        per_generation.fill_between(x, generations["mean"] - generations["std"],
                                    generations["mean"] + generations["std"], alpha=0.2, label="mean ± std")
        per_generation.xaxis.set_major_locator(MaxNLocator(integer=True))
        per_generation.set(xlabel="generation (-1: initial population)", ylabel="population fitness",
                           title="per generation")
        per_generation.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
