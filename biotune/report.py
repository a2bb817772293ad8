"""Tables read from the run store only (no training): what the notebooks and figures show.

Every finished run becomes one row with its numbers (test accuracy mean and std over seeds of
the setting chosen on validation, trainable share, budget, seconds) and a ``variant`` name
derived from its config, so a figure can tell "no LR genes" or "N=10, T=4" from plain BioTune
without any bookkeeping outside the store.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import config as cfg
from .methods import list_methods
from .store import RunStore


def _titled(names, titles: dict[str, str]) -> dict[str, str]:
    """Name -> what tables and figures call it, for every name given: the titled ones first, in the
    order of ``titles`` (the order figures hand out colours), then the others under their own name."""
    return {**{name: title for name, title in titles.items() if name in names},
            **{name: name for name in names if name not in titles}}


# The names come from the config's searchers and the method registry; the titles are presentation.
SEARCHER_NAMES = _titled(cfg.CHOICES["ga.searcher"], {"biotune": "BioTune", "random": "random search",
                                                      "tpe": "TPE", "cmaes": "CMA-ES"})
BASELINE_NAMES = _titled(list_methods(), {
    "full": "full fine-tuning", "linear_probe": "linear probing", "lp_ft": "LP-FT", "l2_sp": "L2-SP",
    "l1_sp": "L1-SP", "autorgn": "AutoRGN", "lora": "LoRA", "adafilter": "AdaFilter"})

# Titles of the named BioTune variants of a study or batch (batch.BIOTUNE_VARIANTS holds their switches).
VARIANT_TITLES = {"biotune_robust": "BioTune, robust (ours)", "biotune_head": "BioTune, head trained",
                  "biotune_rescore": "BioTune, re-scored top k", "biotune_wholeval": "BioTune, whole-validation fitness",
                  "biotune_bits": "BioTune, freeze bits"}

# The paper's reported test accuracies (docs/results.md, "The paper's reported numbers";
# presumably ResNet-50): BioTune and full fine-tuning on nine datasets, every baseline on
# Flowers-102. Long form: dataset, variant, value.
_PAPER_BIOTUNE_FULL = {"flowers102": (91.68, 85.33), "fgvc_aircraft": (64.40, 58.68), "isic2020": (82.90, 78.91),
                       "dtd": (69.27, 68.03), "cifar10": (96.09, 95.65), "stl10": (97.50, 97.33),
                       "mnist": (99.13, 98.96), "usps": (97.57, 97.05), "svhn": (95.85, 96.08)}
_PAPER_FLOWERS = {"l1_sp": 87.82, "lora": 86.01, "autorgn": 85.5, "l2_sp": 85.29, "linear_probe": 82.72}
PAPER_RESULTS = pd.DataFrame(
    [(d, "BioTune", b) for d, (b, _) in _PAPER_BIOTUNE_FULL.items()]
    + [(d, BASELINE_NAMES["full"], f) for d, (_, f) in _PAPER_BIOTUNE_FULL.items()]
    + [("flowers102", BASELINE_NAMES[method], value) for method, value in _PAPER_FLOWERS.items()],
    columns=["dataset", "variant", "paper_test_macro_acc"]).assign(model="resnet50", preset="paper")


def variant(config: dict) -> str:
    """A short name for what a run changes relative to its preset's BioTune: the row label of
    ablation tables (a baseline's is its ``BASELINE_NAMES`` entry)."""
    ga = config["ga"]
    if ga["searcher"] != "biotune":
        return SEARCHER_NAMES[ga["searcher"]]
    preset = cfg.PRESETS.get(config["preset"], {}).get("ga", {})
    default = cfg.GAConfig()
    parts = []
    if ga["encoding"] != "full":
        parts.append(ga["encoding"].replace("_", " ").replace("lr", "LR"))
    if ga["ga_variant"] != "improved":
        parts.append(f"{ga['ga_variant']} GA")
    if ga.get("final_selection", "best_so_far") != "best_so_far":
        parts.append(f"re-scored top {ga['rescore_k']}")
    if ga.get("fitness_val", "fold") != "fold":
        parts.append(f"{ga['fitness_val']}-validation fitness")
    if ga.get("prune"):
        parts.append("pruned")
    if ga.get("breeding", "steady") != "steady":
        parts.append(f"{ga['breeding']} breeding")
    sizes = {key: preset.get(key, getattr(default, key)) for key in ("population", "generations", "elites")}
    if ga["population"] != sizes["population"] or ga["generations"] != sizes["generations"]:
        parts.append(f"N={ga['population']}, T={ga['generations']}")
    if ga["elites"] != sizes["elites"]:
        parts.append(f"E={ga['elites']}")
    return "BioTune" + (f" ({', '.join(parts)})" if parts else "")


def summary(store: str | Path | None = None, run_ids: list[str] | None = None, *,
            preset: str | None = None) -> pd.DataFrame:
    """One numeric row per run (the given ones, else every finished run, optionally of one preset)."""
    with RunStore(store) as db:
        if run_ids is None:
            runs = db.runs()
            runs = runs[(runs["status"] == "finished") & ((runs["preset"] == preset) if preset else True)]
            run_ids = runs["run_id"].tolist()
        rows = [_summary_row(db.run(run_id), db.finals(run_id), db.evaluations(run_id)) for run_id in run_ids]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """``summary``'s table for reading: accuracies as "mean±std" percent strings (the ``_std``
    columns folded in), shares, fitness and seconds rounded."""
    return table.assign(
        test_macro_acc=[mean_std(m, s) for m, s in zip(table["test_macro_acc"], table["test_macro_acc_std"])],
        test_top1=[mean_std(m, s) for m, s in zip(table["test_top1"], table["test_top1_std"])],
        val_macro_acc=(100 * table["val_macro_acc"].astype(float)).round(2),
        trainable_share=table["trainable_share"].astype(float).round(4),
        best_fitness=table["best_fitness"].astype(float).round(4), seconds=table["seconds"].round(1),
    ).drop(columns=["test_macro_acc_std", "test_top1_std"])


SUMMARY_COLUMNS = ["run_id", "kind", "method", "variant", "dataset", "model", "preset", "setting", "seeds",
                   "test_macro_acc", "test_macro_acc_std", "test_top1", "test_top1_std", "val_macro_acc",
                   "trainable_share",
                   "best_fitness", "evaluations", "search_seconds", "final_seconds", "seconds", "train_runs",
                   "device"]


def _summary_row(run: dict, finals: pd.DataFrame, evaluations: pd.DataFrame) -> dict:
    chosen = finals[finals["selected"] == 1]
    ok = chosen[chosen["status"] == "ok"]
    search_seconds, final_seconds = float(evaluations["seconds"].sum()), float(finals["seconds"].sum())
    return {
        "run_id": run["run_id"], "kind": run["kind"], "method": run["method"],
        "variant": (variant(run["config"]) if run["kind"] == "search"
                    else BASELINE_NAMES.get(run["method"], run["method"])),
        "dataset": run["dataset"], "model": run["model"], "preset": run["preset"],
        "setting": chosen["setting"].iloc[0] if len(chosen) else None, "seeds": len(ok),
        "test_macro_acc": ok["test_macro_acc"].mean(), "test_macro_acc_std": ok["test_macro_acc"].std(ddof=1),
        "test_top1": ok["test_top1"].mean(), "test_top1_std": ok["test_top1"].std(ddof=1),
        "trainable_share": chosen["trainable_share"].mean() if len(chosen) else None,
        "val_macro_acc": ok["val_macro_acc"].mean(),  # the final protocol's, beside its test score
        # the search's pick: with ga.final_selection=rescore_top_k its mean over every fold, not the minimum seen
        "best_fitness": (run["result"] or {}).get("best_fitness", evaluations["fitness"].min() if len(evaluations) else None)
        if run["kind"] == "search" else None,
        "evaluations": len(evaluations), "search_seconds": search_seconds, "final_seconds": final_seconds,
        "seconds": search_seconds + final_seconds,
        "train_runs": int(evaluations["train_runs"].sum() + finals["train_runs"].sum()),
        "device": run["meta"].get("device"),
    }


def search_history(store: str | Path | None, run_ids: list[str]) -> pd.DataFrame:
    """Every evaluation of the given searches with its run's dataset and variant, and the best
    fitness so far: the data of a convergence plot against evaluations spent."""
    with RunStore(store) as db:
        frames = []
        for run_id in run_ids:
            run = db.run(run_id)
            frame = db.evaluations(run_id).sort_values("seq")
            frames.append(frame.assign(dataset=run["dataset"], model=run["model"], variant=variant(run["config"]),
                                       best_so_far=frame["fitness"].cummin(), spent=frame["seq"] + 1))
    if not frames:  # the columns the figures read, also without searches
        return pd.DataFrame(columns=["run_id", "seq", "fitness", "seconds", "train_runs", "cache_hit", "dataset",
                                     "model", "variant", "best_so_far", "spent"])
    return pd.concat(frames, ignore_index=True)


def generation_log(store: str | Path | None, run_ids: list[str]) -> pd.DataFrame:
    """The GA logbooks (best, mean, std per generation) of the given BioTune searches."""
    with RunStore(store) as db:
        frames = [db.generations(run_id).assign(run_id=run_id, dataset=db.run(run_id)["dataset"])
                  for run_id in run_ids if db.run(run_id)["method"] == "biotune"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def best_recipes(store: str | Path | None, run_ids: list[str]) -> pd.DataFrame:
    """Block by block (in model order), the learning-rate multiplier of each search's best genome;
    NaN where the block is frozen. One row per (run, block)."""
    rows = []
    with RunStore(store) as db:
        for run_id in run_ids:
            run = db.run(run_id)
            for order, (block, value) in enumerate(run["result"]["recipe"].items()):
                rows.append({"run_id": run_id, "dataset": run["dataset"], "model": run["model"],
                             "variant": variant(run["config"]), "order": order, "block": block,
                             "multiplier": None if value == "frozen" else float(value)})
    return pd.DataFrame(rows, columns=["run_id", "dataset", "model", "variant", "order", "block", "multiplier"])


def gate_usage(store: str | Path | None, run_ids: list[str]) -> pd.DataFrame:
    """AdaFilter's per-layer gate usage on the test split (``gate_usage.csv`` of each run folder), for
    the setting chosen on validation: one row per (run, seed, gated layer), layers in forward order."""
    frames = []
    with RunStore(store) as db:
        for run_id in run_ids:
            run = db.run(run_id)
            file = Path(run["config"]["results_dir"]) / run_id / "gate_usage.csv"
            chosen = db.finals(run_id).query("selected == 1")["setting"]
            if run["method"] == "adafilter" and file.is_file() and len(chosen):
                usage = pd.read_csv(file).drop_duplicates(["setting", "seed", "layer"], keep="last")  # a rerun seed
                usage = usage[usage["setting"] == chosen.iloc[0]]
                frames.append(usage.assign(run_id=run_id, dataset=run["dataset"], model=run["model"],
                                           order=usage.groupby("seed").cumcount()))
    columns = ["run_id", "dataset", "model", "seed", "order", "layer", "filters", "share_mean", "share_std",
               *GATE_COMPARISONS]
    # runs made before the comparisons were reported lack them: NaN there
    return pd.concat(frames, ignore_index=True).reindex(columns=columns) if frames else pd.DataFrame(columns=columns)


GATE_COMPARISONS = ["changing_share", "untrained_share_mean", "untrained_share_std", "untrained_changing_share",
                    "test_macro_acc", "majority_mask_test_macro_acc"]


def with_paper(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (from ``summary``) with the paper's number (percent) beside each row whose setting
    matches the paper's (ResNet-50 under the paper preset, same dataset and method); NaN elsewhere."""
    return table.merge(PAPER_RESULTS, on=["dataset", "model", "preset", "variant"], how="left")


def mean_std(mean: float, std: float) -> str:
    """``0.8512, 0.004 -> "85.12±0.40"`` (percent); ``n/a`` without a value."""
    if pd.isna(mean):
        return "n/a"
    return f"{100 * mean:.2f}±{100 * (0.0 if pd.isna(std) else std):.2f}"
