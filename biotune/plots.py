"""Figure functions: each takes tidy DataFrames from the run store and returns a figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from .report import BASELINE_NAMES, SEARCHER_NAMES, VARIANT_TITLES


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


def _colours(labels) -> dict:
    """A colour per label that is the same in every figure for the searchers and baselines (other
    labels, such as ablation variants, take the next colours in order)."""
    palette = sns.color_palette("colorblind") + sns.color_palette("dark") + sns.color_palette("pastel")
    known = [*SEARCHER_NAMES.values(), *BASELINE_NAMES.values()]
    others = [label for label in dict.fromkeys(labels) if label not in known]
    return {label: palette[i % len(palette)] for i, label in enumerate(known + others)}


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``label`` per row: the variant, prefixed by the model when there are several."""
    several_models = frame["model"].nunique() > 1
    return frame.assign(label=(frame["model"] + " · " + frame["variant"]) if several_models else frame["variant"])


def save(fig: plt.Figure, folder: str | Path, name: str) -> list[Path]:
    """Write ``name``.png (for the README and notebooks) and ``name``.pdf (for papers)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    return paths


def searcher_convergence(history: pd.DataFrame, logbooks: pd.DataFrame | None = None) -> plt.Figure:
    """Per dataset (columns): best-so-far fitness against evaluations spent, one line per search
    variant (and model, when there are several) (top); BioTune's best and mean population fitness
    per generation (bottom).

    ``history`` is ``report.search_history``; ``logbooks`` is ``report.generation_log``.
    """
    set_style()
    datasets = sorted(history["dataset"].unique())
    panels = 2 if logbooks is not None and len(logbooks) else 1
    fig, axes = plt.subplots(panels, len(datasets), figsize=(5.2 * len(datasets), 3.8 * panels), squeeze=False)
    history = _labelled(history)
    colours = _colours(history["label"])
    for column, dataset in enumerate(datasets):
        spent = axes[0, column]
        for label, frame in history[history["dataset"] == dataset].groupby("label", sort=True):
            spent.step(frame["spent"], frame["best_so_far"], where="post", label=label, color=colours[label])
        spent.set(xlabel="fitness evaluations spent", ylabel="best fitness so far", title=dataset)
        spent.legend(fontsize="x-small")
        if panels == 2:
            per_generation = axes[1, column]
            for run_id, log in logbooks[logbooks["dataset"] == dataset].groupby("run_id", sort=False):
                line, = per_generation.plot(log["generation"], log["best"], marker="o", label=f"best {run_id[-4:]}")
                per_generation.plot(log["generation"], log["mean"], linestyle="--", color=line.get_color(),
                                    label=f"mean {run_id[-4:]}")
            per_generation.xaxis.set_major_locator(MaxNLocator(integer=True))
            per_generation.set(xlabel="generation (-1: initial population)", ylabel="population fitness",
                               title=f"{dataset}: BioTune per generation")
            per_generation.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def recipe_heatmap(recipes: pd.DataFrame) -> plt.Figure:
    """One panel per model. Rows: the best genome of each search (dataset, variant); columns:
    the model's blocks in order; cells: the block's learning-rate multiplier, grey where frozen.

    ``recipes`` is ``report.best_recipes``.
    """
    set_style()
    models = list(dict.fromkeys(recipes["model"]))
    grids = []
    for model in models:
        frame = recipes[recipes["model"] == model]
        frame = frame.assign(row=frame["dataset"] + " · " + frame["variant"])
        blocks = frame.sort_values("order").drop_duplicates("block")["block"].tolist()
        grid = frame.pivot_table(index="row", columns="block", values="multiplier", aggfunc="first", dropna=False)
        grids.append((model, grid.reindex(columns=blocks).astype(float)))
    width = max(1.1 * grid.shape[1] + 3 for _, grid in grids)
    fig, axes = plt.subplots(len(grids), 1, squeeze=False, figsize=(width, sum(0.55 * len(g) + 1.6 for _, g in grids)),
                             height_ratios=[len(g) + 2 for _, g in grids])
    for ax, (model, grid) in zip(axes[:, 0], grids):
        sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", cbar_kws={"label": "LR multiplier"},
                    vmin=0, vmax=recipes["multiplier"].max(), linewidths=0.5, linecolor="white", ax=ax)
        ax.set_facecolor("0.85")  # frozen blocks show the grey background
        ax.grid(False)
        ax.tick_params(axis="y", rotation=0)
        ax.set(xlabel="block (grey: frozen)", ylabel="", title=f"{model}: best genome per search")
    fig.tight_layout()
    return fig


def accuracy_vs_share(table: pd.DataFrame) -> plt.Figure:
    """Test macro accuracy (mean ± std over seeds) against the share of parameters trained, one
    marker per run; ``table`` is ``report.summary``."""
    set_style()
    datasets = sorted(table["dataset"].unique())
    several_models = table["model"].nunique() > 1  # then the marker tells the model
    style = "model" if several_models else "variant"
    # the same orders and palette on every panel give a variant the same colour and marker everywhere
    orders = {"hue_order": list(dict.fromkeys(table["variant"])), "palette": _colours(table["variant"]),
              "style_order": list(dict.fromkeys(table[style]))}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets) + 1.6, 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        frame = table[table["dataset"] == dataset]
        ax.errorbar(frame["trainable_share"], 100 * frame["test_macro_acc"],
                    yerr=100 * frame["test_macro_acc_std"].fillna(0), fmt="none", ecolor="0.6")
        sns.scatterplot(data=frame.assign(accuracy=100 * frame["test_macro_acc"]), x="trainable_share",
                        y="accuracy", hue="variant", style=style, **orders, s=70, ax=ax,
                        legend=ax is axes[0, -1])
        ax.set(xlabel="share of parameters trained", ylabel="test macro accuracy (%)", title=dataset)
    # outside the panels: inside, it hid the markers it names
    sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1), fontsize="x-small", frameon=False)
    fig.tight_layout()
    return fig


def ablation_bars(table: pd.DataFrame) -> plt.Figure:
    """Test macro accuracy per search variant (bars, ± std over seeds) with each variant's budget
    in evaluations written on its bar; ``table`` is ``report.summary`` of the ablation runs."""
    set_style()
    datasets = sorted(table["dataset"].unique())
    table = _labelled(table)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 0.45 * table["label"].nunique() + 2),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        frame = table[table["dataset"] == dataset].sort_values("label")
        accuracy = 100 * frame["test_macro_acc"]
        ax.barh(frame["label"], accuracy, xerr=100 * frame["test_macro_acc_std"].fillna(0), color="C0", alpha=0.8)
        for y, (value, budget) in enumerate(zip(accuracy, frame["evaluations"])):
            ax.text(value, y, f" {value:.1f} ({budget} ev.)", va="center", fontsize="x-small")
        low = accuracy.min()
        ax.set_xlim(max(0, low - 10), min(100, accuracy.max() + 6))
        ax.invert_yaxis()  # first variant (plain BioTune) on top
        ax.set(xlabel="test macro accuracy (%)", ylabel="", title=dataset)
    fig.tight_layout()
    return fig


def gate_usage(usage: pd.DataFrame) -> plt.Figure:
    """AdaFilter, per gated layer in forward order: the share of fine-tuned filters an example uses
    on the test split (mean over examples, band: ± their std) and the share of filters whose choice
    changes across examples, for the learned gates and for the same gate network before training;
    in the title, test macro accuracy with the learned gates and with a fixed per-filter majority
    mask. One panel per dataset and model."""
    set_style()
    panels = list(usage.groupby(["dataset", "model"], sort=True).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (dataset, model) in zip(axes[0], panels):
        frame = usage[(usage["dataset"] == dataset) & (usage["model"] == model)]
        per_layer = frame.groupby("order").mean(numeric_only=True)
        for prefix, label, style in (("", "learned", "-"), ("untrained_", "untrained", "--")):
            if per_layer[f"{prefix}share_mean"].isna().all():  # a run made before untrained gates were reported
                continue
            mean, std = per_layer[f"{prefix}share_mean"], per_layer[f"{prefix}share_std"]
            line, = ax.plot(per_layer.index, mean, style, marker=".", label=f"{label}: share used (± std across examples)")
            ax.fill_between(per_layer.index, (mean - std).clip(0), (mean + std).clip(upper=1), alpha=0.2,
                            color=line.get_color())
            if not per_layer[f"{prefix}changing_share"].isna().all():
                ax.plot(per_layer.index, per_layer[f"{prefix}changing_share"], style, color=line.get_color(), alpha=0.5,
                        marker="x", label=f"{label}: share of filters changing across examples")
        title = f"{dataset} · {model}"
        if not per_layer["majority_mask_test_macro_acc"].isna().all():
            title += (f"\ntest macro acc {100 * per_layer['test_macro_acc'].mean():.1f} learned, "
                      f"{100 * per_layer['majority_mask_test_macro_acc'].mean():.1f} majority mask")
        ax.set(xlabel="gated conv layer (input to output)", ylabel="share of filters", title=title, ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def time_per_evaluation(history: pd.DataFrame) -> plt.Figure:
    """Seconds per fitness evaluation that trained (cache hits and genomes that train no block
    left out), per search variant and dataset; ``history`` is ``report.search_history``."""
    set_style()
    trained = _labelled(history[history["train_runs"] > 0])
    fig, ax = plt.subplots(figsize=(7, 0.4 * trained["label"].nunique() * trained["dataset"].nunique() + 2))
    sns.boxplot(data=trained, x="seconds", y="label", hue="dataset", ax=ax, fliersize=2)
    ax.set(xlabel="seconds per fitness evaluation", ylabel="", title="time per evaluation")
    fig.tight_layout()
    return fig


def _method_names(methods: pd.Series) -> pd.Series:
    return methods.map(lambda m: SEARCHER_NAMES.get(m) or BASELINE_NAMES.get(m) or VARIANT_TITLES.get(m) or m)


def _dataset_name(dataset: str) -> str:
    """A dataset's name, or a user file's name rather than its whole path."""
    return Path(dataset).name if "/" in dataset else dataset


def study_means(summary: pd.DataFrame, metric: str = "test") -> plt.Figure:
    """A study's mean macro accuracy per method with its 95% interval, one panel per dataset;
    ``summary`` is the study's summary.csv (n in each label: one seed is no interval)."""
    set_style()
    table = summary[summary["metric"] == metric]
    datasets = list(dict.fromkeys(table["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    colours = _colours(_method_names(table["method"]))
    for ax, dataset in zip(axes[0], datasets):
        rows = table[table["dataset"] == dataset].reset_index(drop=True)
        names = _method_names(rows["method"])
        for y, (row, name) in enumerate(zip(rows.itertuples(), names)):
            low, high = (row.ci_low, row.ci_high) if pd.notna(row.ci_low) else (row.mean, row.mean)
            ax.errorbar(100 * row.mean, y, xerr=[[100 * (row.mean - low)], [100 * (high - row.mean)]], fmt="o",
                        capsize=3, color=colours[name])
        ax.set_yticks(range(len(rows)), [f"{name} (n={n})" for name, n in zip(names, rows["n"])])
        ax.invert_yaxis()
        ax.set(xlabel=f"{metric} macro accuracy (%), mean and 95% interval", title=_dataset_name(dataset))
    fig.tight_layout()
    return fig


def paired_differences(paired: pd.DataFrame, reference: str, metric: str = "test") -> plt.Figure:
    """Each method minus ``reference`` on the same cells (dataset and seed), per dataset and over
    all cells, with the 95% interval of the mean difference and the Wilcoxon p-value."""
    set_style()
    table = paired[(paired["metric"] == metric) & (paired["reference"] == reference)].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(table) + 1.2))
    labels = [f"{name} | {dataset} (n={n}, p={p:.2g})" for name, dataset, n, p in
              zip(_method_names(table["method"]), table["dataset"].map(_dataset_name), table["n"], table["p_value"])]
    for y, row in enumerate(table.itertuples()):
        low, high = (row.ci_low, row.ci_high) if pd.notna(row.ci_low) else (row.mean_diff, row.mean_diff)
        ax.errorbar(100 * row.mean_diff, y, xerr=[[100 * (row.mean_diff - low)], [100 * (high - row.mean_diff)]],
                    fmt="o", capsize=3, color="C0" if row.dataset != "all" else "C3")
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(range(len(table)), labels, fontsize="small")
    ax.invert_yaxis()
    name = _method_names(pd.Series([reference])).iloc[0]
    ax.set(xlabel=f"{metric} macro accuracy minus {name}'s (points), 95% interval", title=f"paired against {name}")
    fig.tight_layout()
    return fig
