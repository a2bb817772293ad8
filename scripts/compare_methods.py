"""Every searcher and baseline on one dataset under one preset, then one `biotune compare` table.

    .venv/bin/python scripts/compare_methods.py --dataset digits --preset demo

Each row goes through the same data, trainer, seeds and final protocol; the searchers spend
BioTune's budget; baselines with hyperparameters train their whole grid (counted).
"""
import argparse

import biotune

SEARCHERS = ("biotune", "random", "tpe", "cmaes")
BASELINES = ("full", "linear_probe", "lp_ft", "l2_sp", "l1_sp", "autorgn", "lora")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dataset", default="fashion_mnist")
parser.add_argument("--preset", default="cpu")
parser.add_argument("--store", default="results/runs.sqlite")
args = parser.parse_args()

run_ids = []
for searcher in SEARCHERS:
    result = biotune.search(args.dataset, preset=args.preset, overrides={"ga.searcher": searcher},
                            store=args.store, progress=False)
    biotune.final(result.run_id, store=args.store, progress=False)
    run_ids.append(result.run_id)
for method in BASELINES:
    run_ids.append(biotune.run_baseline(method, args.dataset, preset=args.preset, store=args.store,
                                        progress=False)[0])
table = biotune.compare(run_ids, store=args.store)
print(table.drop(columns=["run_id", "dataset", "model"]).to_string(index=False))
print("biotune compare " + " ".join(run_ids))
