"""BioTune's pick by the best fitness seen (the paper's rule) against the k best re-scored on every fold.

    .venv/bin/python scripts/selection_rule.py --dataset fashion_mnist --preset demo --seeds 0 1 2 --jobs 2 \\
        --set train.num_threads=1

The best fitness a search sees compares genomes measured on different folds, so a genome that
met an easy fold can win on luck (a winner's curse); ``ga.final_selection=rescore_top_k``
re-evaluates the ``ga.rescore_k`` best distinct genomes on every fold and picks the best mean.
Both rules run from the same GA seed, so their searches are identical up to the re-scoring.
Each row: the search's fitness of its pick, the final protocol's validation and test macro
accuracy (percent), and the evaluations and training runs spent. One GA seed ranks nothing: the
mean over seeds is printed last. Rows already in the store are reused, unfinished ones resumed.
"""
import argparse
import sys

import biotune
from biotune import report

RULES = ("best_so_far", "rescore_top_k")

if __name__ == "__main__":  # the parallel rows run in spawned processes that import this file
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GA seeds (ga.seed)")
    parser.add_argument("--store", default="results/runs.sqlite")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process or Ray task")
    parser.add_argument("--executor", choices=("process", "ray"), default="process",
                        help="how rows run at once: processes on this machine, or Ray tasks (RAY_ADDRESS or a local Ray)")
    parser.add_argument("--gpus-per-row", type=float, default=0.0, help="with --executor ray: GPUs each row asks for")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every row, e.g. train.num_threads=1")
    args = parser.parse_args()

    rows = [{"method": "biotune", "dataset": args.dataset, "model": args.model, "preset": args.preset,
             "overrides": [*args.set, f"ga.seed={seed}", f"ga.final_selection={rule}"], "label": f"{rule} {seed}"}
            for seed in args.seeds for rule in RULES]
    outcome = biotune.run_many(rows, jobs=args.jobs, executor=args.executor, gpus_per_row=args.gpus_per_row,
                               store=args.store, progress=args.jobs == 1)
    done = outcome[outcome["status"] == "ok"]
    table = report.summary(args.store, done["run_id"].tolist()).assign(
        rule=[label.split()[0] for label in done["label"]], ga_seed=[int(label.split()[1]) for label in done["label"]],
        val_macro_acc=lambda t: 100 * t["val_macro_acc"], test_macro_acc=lambda t: 100 * t["test_macro_acc"])
    columns = ["rule", "ga_seed", "best_fitness", "val_macro_acc", "test_macro_acc", "evaluations", "train_runs",
               "run_id"]
    print(table[columns].round(4).to_string(index=False))
    print(table.groupby("rule")[["best_fitness", "val_macro_acc", "test_macro_acc", "evaluations", "train_runs"]]
          .mean().round(4).to_string())
    failed = outcome[outcome["status"] != "ok"]
    if len(failed):
        print(failed[["label", "error"]].to_string(index=False), file=sys.stderr)
        sys.exit(1)
