"""Every searcher and baseline on one dataset under one preset, then one `biotune compare` table.

    .venv/bin/python scripts/compare_methods.py --dataset digits --preset demo
    python scripts/compare_methods.py --dataset fashion_mnist --preset cpu --jobs 11 \\
        --set train.device=cuda --set train.num_threads=1        # a GPU box, rows in parallel
    python scripts/compare_methods.py --dataset fashion_mnist --preset paper --jobs 8 \\
        --executor ray --gpus-per-row 0.5                          # Ray: RAY_ADDRESS or a local Ray

Each row goes through the same data, trainer, seeds and final protocol; the searchers spend
BioTune's budget; baselines with hyperparameters train their whole grid (counted). Rows already
in the store with the same config are reused and unfinished ones resumed, so rerunning the
command after a kill continues where it stopped.
"""
import argparse
import sys

import biotune
from biotune.batch import ROW_EXECUTORS, SEARCHERS
from biotune.report import BASELINE_NAMES

BASELINES = tuple(BASELINE_NAMES)  # every registered method, in the order tables list them

if __name__ == "__main__":  # the parallel rows run in spawned processes that import this file
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--store", default="results/runs.sqlite")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process or Ray task")
    parser.add_argument("--executor", choices=ROW_EXECUTORS, default="process",
                        help="how rows run at once: processes on this machine, or Ray tasks (RAY_ADDRESS or a local Ray)")
    parser.add_argument("--gpus-per-row", type=float, default=0.0, help="with --executor ray: GPUs each row asks for")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every row, e.g. train.device=cuda")
    args = parser.parse_args()

    rows = [{"method": method, "dataset": args.dataset, "model": args.model, "preset": args.preset,
             "overrides": args.set} for method in (*SEARCHERS, *BASELINES)]
    outcome = biotune.run_many(rows, jobs=args.jobs, executor=args.executor, gpus_per_row=args.gpus_per_row,
                               store=args.store, progress=args.jobs == 1)
    failed = outcome[outcome["status"] != "ok"]
    done = outcome.loc[outcome["status"] == "ok", "run_id"].tolist()
    table = biotune.compare(done, store=args.store)
    print(table.drop(columns=["run_id", "dataset", "model"]).to_string(index=False))
    print("biotune compare " + " ".join(done))
    if len(failed):
        print(failed[["method", "error"]].to_string(index=False), file=sys.stderr)
        sys.exit(1)
