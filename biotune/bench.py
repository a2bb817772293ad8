"""Speed benchmark behind ``biotune bench`` / ``make bench``.

Times fitness evaluations of a preset exactly as a search runs them (same data, folds, trainer and
evaluator, a throw-away store): a full fine-tuning genome and a few seeded random genomes, all on
fold 0, measured side by side in one process.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import pandas as pd

from . import config as cfg
from .data import make_folds
from .experiment import load_inputs
from .fitness import Evaluator
from .ga import random_genome
from .genome import encode, num_genes
from .methods import get_method
from .store import RunStore


def run_bench(preset: str = "cpu", evaluations: int = 3, overrides: list[str] | None = None,
              seed: int = 0) -> pd.DataFrame:
    config = cfg.resolve(preset, overrides=overrides)
    config.ga.cache = False
    started = time.perf_counter()
    model, dataset = load_inputs(config)
    load_seconds = time.perf_counter() - started
    folds = make_folds(dataset.train.labels, dataset.val.labels, config.ga.train_split, seed=config.data.split_seed)
    blocks = [b.name for b in model.blocks]
    full = encode(get_method("full").plan(model), config.ga.encoding)
    rng = random.Random(seed)
    genomes = [("full fine-tuning", full)] + [
        (f"random genome {i + 1}", random_genome(num_genes(len(blocks), config.ga.encoding), len(blocks),
                                                 config.ga.encoding, rng)) for i in range(evaluations)]
    rows = []
    with tempfile.TemporaryDirectory() as folder, RunStore(Path(folder) / "bench.sqlite") as store:
        store.create_run("bench", kind="search", method="biotune", config=config.to_dict(), meta={})
        evaluator = Evaluator(model=model, dataset=dataset, folds=folds, config=config, store=store,
                              run_id="bench", progress=False)
        for label, genes in genomes:
            evaluator(genes, fold=0, generation=0, individual=len(rows), role="trial")
            row = store.evaluation("bench", evaluator.seq - 1)
            images = sum(s["train_images"] for s in row["per_seed"])
            train_seconds = sum(s["seconds"] for s in row["per_seed"])
            rows.append({"evaluation": label, "trained_blocks": sum(row["trained"]),
                         "epochs": sum(s["epochs"] for s in row["per_seed"]), "seconds": round(row["seconds"], 2),
                         "train_images": images, "images_per_s": round(images / train_seconds, 1),
                         "val_macro_acc": round(row["val_macro_acc"], 4)})
    table = pd.DataFrame(rows)
    summary = {"evaluation": f"mean ({preset}, {config.model.name}, {config.data.image_size or 'native'} px, "
                             f"{len(folds[0].train_idx)} train images, device {config.train.device})",
               "seconds": round(table["seconds"].mean(), 2),
               "train_images": int(table["train_images"].sum()),
               "images_per_s": round(table["train_images"].sum() / table["seconds"].sum(), 1)}
    table = pd.concat([table, pd.DataFrame([summary])], ignore_index=True)
    table.attrs["load_seconds"] = load_seconds
    return table
