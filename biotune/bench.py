"""Speed benchmarks behind ``biotune bench`` / ``make bench``: ratios measured side by side in one
process, so a machine that slows down slows every path alike.

``run_bench`` (``bench evaluations``) runs four paths on the same genomes (full fine-tuning and
seeded random ones), fold 0 and seeds, interleaved genome by genome:
- ``plain loop``: the anchor, fine-tuning as a user writes it (PIL images through per-sample
  transforms and a DataLoader, NCHW float32, the whole network every epoch), same recipe;
- ``levers off``: the search's Evaluator, ``train.channels_last`` and ``train.prefix_cache`` off;
- ``exact levers``: the Evaluator as a search runs it (prefix cache filled by the genomes before);
- ``pruning``: the exact levers plus ``ga.prune`` after a warm-up of one run.
``parallel_bench``, ``schedule_speedups`` and ``method_costs`` are the other modes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from sklearn.metrics import balanced_accuracy_score

from . import config as cfg
from .data import make_folds
from .experiment import load_data, load_inputs
from .fitness import Evaluator
from .ga import random_genome
from .genome import decode, encode, num_genes
from .hooks import cosine_factor, plan_param_groups
from .methods import get_method
from .store import RunStore
from .train import (
    autocast,
    fresh_net,
    resolve_amp,
    resolve_device,
    set_learning_rates,
    set_train_mode,
)

PATHS = ("plain loop", "levers off", "exact levers", "pruning")
LEVERS = {"levers off": {"train.channels_last": False, "train.prefix_cache": False, "train.cudnn_benchmark": False},
          "exact levers": {}, "pruning": {"ga.prune": True, "ga.prune_warmup": 1}}


def run_bench(preset: str = "cpu", evaluations: int = 3, overrides: list[str] | None = None,
              seed: int = 0, json_file: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per genome and path, and the summary of ratios (also written to ``json_file``)."""
    config = cfg.resolve(preset, overrides=[*(overrides or []), "ga.cache=false"])
    model, dataset = load_inputs(config)
    folds = make_folds(dataset.train.labels, dataset.val.labels, config.ga.train_split, seed=config.data.split_seed)
    blocks = [b.name for b in model.blocks]
    rng = random.Random(seed)
    genomes = [("full fine-tuning", encode(get_method("full").plan(model), config.ga.encoding))] + [
        (f"random genome {i + 1}", random_genome(num_genes(len(blocks), config.ga.encoding), len(blocks),
                                                 config.ga.encoding, rng)) for i in range(evaluations)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        evaluators = {path: _evaluator(config, changes, model, dataset, folds, Path(folder) / f"{index}.sqlite")
                      for index, (path, changes) in enumerate(LEVERS.items())}
        for label, genes in genomes:
            plan = decode(genes, blocks, config.ga.encoding)
            rows.append({"path": PATHS[0], "genome": label, **_plain_loop(model, dataset, plan, config.train, folds[0])})
            for path, evaluator in evaluators.items():
                rows.append({"path": path, "genome": label, **_evaluate(evaluator, genes)})
        for evaluator in evaluators.values():
            evaluator.store.close()
    table = pd.DataFrame(rows).assign(
        images_per_s=lambda t: t["train_images"] / t["seconds"],
        trained_blocks=lambda t: t["genome"].map(
            {label: sum(decode(genes, blocks, config.ga.encoding).trained_mask()) for label, genes in genomes}))
    summary = {**_summary(table, config, len(folds[0].train_idx)), **_resize_cost(config, folds[0], table)}
    if json_file is not None:
        Path(json_file).write_text(json.dumps({"summary": summary, "rows": table.to_dict("records")}, indent=2))
    return table, summary


PARALLEL = (("serial", 1, None), ("serial", 1, "per worker"), ("process", 1, None), ("process", 2, None),
            ("ray", 1, None), ("ray", 2, None))


def parallel_bench(preset: str = "demo", overrides: list[str] | None = None,
                   json_file: str | Path | None = None, runs=PARALLEL) -> tuple[pd.DataFrame, dict]:
    """One search timed with each of ``runs`` (executor, workers, threads), one after another:
    seconds, evaluations per minute, speed-up over serial, and whether its evaluations equal the
    serial run's on as many torch threads per training run (a run's floats depend on its threads).
    threads None: the default; "per worker": a serial run on the threads each of two workers gets.
    Ray's start-up is timed on its own."""
    from .executors import make_executor, threads_per_run
    from .experiment import search

    base = cfg.resolve(preset, overrides=overrides)
    rows, serial_by_threads, ray_started = [], {}, False
    with tempfile.TemporaryDirectory() as folder:
        for executor, workers, threads in runs:
            changes = [*(overrides or []), f"executor.kind={executor}", f"executor.workers={workers}",
                       f"results_dir={folder}/results"]
            if threads == "per worker":
                changes.append(f"train.num_threads={threads_per_run(cfg.ExecutorConfig(workers=2), base.train)}")
            config = cfg.resolve(preset, overrides=changes)
            ray_start = None
            if executor == "ray" and not ray_started:
                started = time.perf_counter()
                make_executor(config.executor, config.train)  # starts the local Ray the searches then share
                ray_start, ray_started = time.perf_counter() - started, True
            started = time.perf_counter()
            result = search(preset=preset, overrides=changes, store=Path(folder) / f"{len(rows)}.sqlite", progress=False)
            seconds = time.perf_counter() - started
            evaluations = result.evaluations[["seq", "genes", "fold", "fitness", "train_runs"]].to_dict("records")
            run_threads = threads_per_run(config.executor, config.train) if executor != "serial" else (
                config.train.num_threads or torch.get_num_threads())
            if executor == "serial":
                serial_by_threads[run_threads] = (seconds, evaluations)
            reference = serial_by_threads.get(run_threads)
            rows.append({"executor": executor, "workers": workers, "threads_per_run": int(run_threads),
                         "seconds": round(seconds, 1), "evaluations": len(evaluations),
                         "evaluations_per_minute": round(60 * len(evaluations) / seconds, 2),
                         "train_runs": int(result.evaluations["train_runs"].sum()),
                         "best_fitness": result.best_fitness,
                         "equals_serial_same_threads": None if reference is None else reference[1] == evaluations,
                         **({"ray_start_seconds": round(ray_start, 1)} if ray_start is not None else {})})
    table = pd.DataFrame(rows)
    serial_seconds = table["seconds"].iloc[0]
    table["speedup_vs_serial"] = (serial_seconds / table["seconds"]).round(2)
    same_threads = table["threads_per_run"].map(lambda threads: serial_by_threads.get(threads, (math.nan,))[0])
    table["speedup_vs_serial_same_threads"] = (same_threads / table["seconds"]).round(2)
    summary = {"preset": preset, "model": base.model.name, "device": str(resolve_device(base.train.device)),
               "cores": os.cpu_count(), "serial_seconds": float(serial_seconds),
               "all_equal_serial_same_threads": bool(table["equals_serial_same_threads"].dropna().all()),
               "speedup_vs_serial": {f"{r.executor} x{r.workers}, {r.threads_per_run} threads": float(r.speedup_vs_serial)
                                     for r in table.iloc[1:].itertuples()},
               "speedup_vs_serial_same_threads": {
                   f"{r.executor} x{r.workers}, {r.threads_per_run} threads": float(r.speedup_vs_serial_same_threads)
                   for r in table.iloc[1:].itertuples() if r.executor != "serial"}}
    if json_file is not None:
        Path(json_file).write_text(json.dumps({"summary": summary, "rows": table.to_dict("records")}, indent=2,
                                              default=str))
    return table, summary


def schedule_speedups(preset: str = "paper", workers: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 32),
                      overrides: list[str] | None = None) -> pd.DataFrame:
    """The arithmetic of a parallel search: for each number of runs at once (k), the rounds of
    training runs a search needs when a batch of b evaluations x s seeds takes ceil(b*s / k)
    rounds, against b*s rounds one after another, for steady and generational breeding. An upper
    bound: it assumes runs of equal length (a batch waits for its slowest run) and no cache hits."""
    from .ga import evaluation_batches

    config = cfg.resolve(preset, overrides=overrides)
    n_folds, seeds = cfg.num_folds(config.ga.train_split), len(config.train.seeds)
    rows = []
    for breeding in cfg.CHOICES["ga.breeding"]:
        batches = evaluation_batches(dataclasses.replace(config.ga, breeding=breeding), n_folds)
        runs = sum(size * seeds for _, _, size in batches)
        for k in workers:
            rounds = sum(math.ceil(size * seeds / k) for _, _, size in batches)
            rows.append({"breeding": breeding, "runs_at_once": k, "evaluations": sum(b[2] for b in batches),
                         "training_runs": runs, "rounds": rounds, "speedup_bound": round(runs / rounds, 2)})
    return pd.DataFrame(rows)


def method_costs(preset: str = "cpu", methods: tuple[str, ...] = ("full", "adafilter"),
                 overrides: list[str] | None = None) -> pd.DataFrame:
    """Seconds and training images per second of one training run of each method (its default
    setting), side by side on fold 0 with the preset's first seed: what a method costs per image
    against full fine-tuning (AdaFilter runs a pretrained and a fine-tuned conv for every filter)."""
    config = cfg.resolve(preset, overrides=overrides)
    model, dataset = load_inputs(config)
    fold = make_folds(dataset.train.labels, dataset.val.labels, config.ga.train_split, seed=config.data.split_seed)[0]
    rows = []
    for name in methods:
        result = get_method(name).fit(model, dataset, config.train, config.train.seeds[0], train_idx=fold.train_idx,
                                      val_idx=fold.val_idx, progress=False)
        rows.append({"method": name, "epochs": result.epochs, "seconds": result.seconds,
                     "train_images": result.train_images, "images_per_s": result.train_images / result.seconds,
                     "trainable_share": result.trainable_params / model.num_params,
                     "val_macro_acc": result.val.get("macro_acc")})
    table = pd.DataFrame(rows)
    return table.assign(seconds_per_image_vs_first=lambda t: (t["seconds"] / t["train_images"])
                        / (t["seconds"].iloc[0] / t["train_images"].iloc[0]))


def _evaluator(config: cfg.Config, changes: dict, model, dataset, folds, store_path: Path) -> Evaluator:
    path_config = cfg.validate(cfg.merge(cfg.from_dict(config.to_dict()), cfg.parse_overrides(changes), "bench"))
    store = RunStore(store_path)
    store.create_run("bench", kind="search", method="biotune", config=path_config.to_dict(), meta={})
    return Evaluator(model=model, dataset=dataset, folds=folds, config=path_config, store=store, run_id="bench",
                     progress=False)


def _evaluate(evaluator: Evaluator, genes) -> dict:
    evaluator(genes, fold=0, generation=0, individual=evaluator.seq, role="trial")
    row = evaluator.store.evaluation("bench", evaluator.seq - 1)
    return {"status": row["status"], "prefix_cache": row["prefix_cache"], "seconds": row["seconds"],
            "epochs": sum(s["epochs"] for s in row["per_seed"]),
            "train_images": sum(s["train_images"] for s in row["per_seed"]), "val_macro_acc": row["val_macro_acc"]}


def _plain_loop(model, dataset, plan, train_cfg: cfg.TrainConfig, fold) -> dict:
    """Each seed trained by the anchor loop: per-sample PIL -> tensor -> normalise in a DataLoader,
    NCHW, every block run forward each step; same recipe as the trainer."""
    if train_cfg.num_threads:  # as the trainer does, so the first path is not timed on other threads
        torch.set_num_threads(train_cfg.num_threads)
    started, device = time.perf_counter(), resolve_device(train_cfg.device)
    amp = resolve_amp(train_cfg.amp, model)
    torch.backends.cudnn.benchmark = False  # no lever here; the trainer sets it per run
    preprocess = dataset.preprocess
    transform = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preprocess.mean, preprocess.std)])

    def samples(split, index) -> _Transformed:  # PIL images, made once, as a dataset read from disk would be
        index = torch.as_tensor(index)
        images = [T.functional.to_pil_image(image) for image in split.images[index]]
        return _Transformed(list(zip(images, split.labels[index].tolist())), transform)

    train_samples, val_samples = samples(dataset.train, fold.train_idx), samples(dataset.val, fold.val_idx)
    val_loader = torch.utils.data.DataLoader(val_samples, batch_size=train_cfg.eval_batch_size)

    per_seed, images_seen, epochs_run = [], 0, 0
    for seed in train_cfg.seeds:
        net = fresh_net(model, seed).to(device)
        frozen = [net.get_submodule(m) for name in plan.frozen for m in model.block(name).modules]
        optimizer = torch.optim.Adam(plan_param_groups(net, model.blocks, plan, train_cfg.base_lr),
                                     lr=train_cfg.base_lr, weight_decay=train_cfg.weight_decay)
        train_loader = torch.utils.data.DataLoader(train_samples, batch_size=train_cfg.batch_size, shuffle=True,
                                                   generator=torch.Generator().manual_seed(seed))
        best, waited = -1.0, 0
        for epoch in range(train_cfg.max_epochs):
            set_train_mode(net, frozen, train_cfg.frozen_bn)
            set_learning_rates(optimizer, train_cfg.base_lr * cosine_factor(epoch, train_cfg.cosine_t_max))
            for images, labels in train_loader:
                with autocast(device, amp):  # bf16 on CUDA, as the trainer; nothing on the CPU
                    loss = F.cross_entropy(net(images.to(device)).float(), labels.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                images_seen += len(labels)
            net.eval()
            predicted, truth = [], []
            with torch.no_grad(), autocast(device, amp):
                for images, labels in val_loader:
                    predicted.append(net(images.to(device)).argmax(1).cpu())
                    truth.append(labels)
            macro = balanced_accuracy_score(torch.cat(truth).numpy(), torch.cat(predicted).numpy())
            epochs_run += 1
            best, waited = (macro, 0) if macro > best + train_cfg.min_delta else (best, waited + 1)
            if waited >= train_cfg.patience:
                break
        per_seed.append(best)
    return {"status": "ok", "prefix_cache": None, "seconds": time.perf_counter() - started, "epochs": epochs_run,
            "train_images": images_seen, "val_macro_acc": statistics.fmean(per_seed)}


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, samples: list, transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, label = self.samples[index]
        return self.transform(image), label


def _resize_cost(config: cfg.Config, fold, table: pd.DataFrame) -> dict:
    """What resizing each batch from the native size costs (data.store_at native, the paper
    preset's storage), on the training device, beside the exact levers' seconds per image."""
    native = load_data(dataclasses.replace(config, data=dataclasses.replace(config.data, store_at="native")))
    images, device = native.train.images[fold.train_idx], resolve_device(config.train.device)
    if images.shape[-1] == native.preprocess.image_size:
        return {"per_batch_resize": "none: the images are stored at the input size"}
    batches = [images[i:i + config.train.batch_size].to(device) for i in range(0, len(images), config.train.batch_size)]
    native.to_input(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        native.to_input(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds_per_image = (time.perf_counter() - started) / len(images)
    levers = table[table["path"] == "exact levers"]
    return {"per_batch_resize": {
        "from": "x".join(map(str, images.shape[1:])), "to": native.preprocess.image_size,
        "seconds_per_1000_images": round(1000 * seconds_per_image, 4),
        "share_of_training_time": round(float(seconds_per_image / (levers["seconds"].sum() / levers["train_images"].sum())), 4)}}


def _summary(table: pd.DataFrame, config: cfg.Config, train_images: int) -> dict:
    """Mean seconds per evaluation and images per second per path, and the ratios that matter."""
    per_path = table.groupby("path", sort=False).agg(seconds=("seconds", "mean"), train_images=("train_images", "sum"),
                                                     total=("seconds", "sum"), val=("val_macro_acc", "mean"))
    seconds = per_path["seconds"].to_dict()
    accuracy = table.pivot(index="genome", columns="path", values="val_macro_acc")
    return {
        "preset": config.preset, "model": config.model.name, "image_size": config.data.image_size,
        "train_images_per_fold": train_images, "device": str(resolve_device(config.train.device)),
        "threads": torch.get_num_threads(), "genomes": int(table["genome"].nunique()),
        "seconds_per_evaluation": {path: round(value, 2) for path, value in seconds.items()},
        "images_per_second": {path: round(row.train_images / row.total, 1) for path, row in per_path.iterrows()},
        "speedup_vs_plain_loop": round(seconds["plain loop"] / seconds["exact levers"], 2),
        "speedup_vs_levers_off": round(seconds["levers off"] / seconds["exact levers"], 2),
        "max_abs_val_macro_acc_diff": round(float((accuracy["exact levers"] - accuracy["levers off"]).abs().max()), 4),
        "pruning_speedup_vs_plain_loop": round(seconds["plain loop"] / seconds["pruning"], 2),
        "pruning_max_abs_val_macro_acc_diff": round(float((accuracy["pruning"] - accuracy["levers off"]).abs().max()), 4),
        "pruned": int((table["status"] == "pruned").sum()),
    }
