"""The ``biotune`` command line: a thin layer over the library (the only place that prints)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

import pandas as pd

from . import config as cfg
from .executors import TrainingFailedError

PRESETS = list(cfg.PRESETS)


def _overrides(tokens: list[str]) -> list[str]:
    """``--ga.population 8`` / ``--ga.population=8`` -> ``ga.population=8``; anything else is an error."""
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            raise SystemExit(f"biotune: unrecognised argument {token!r}; config overrides look like "
                             "--section.key VALUE, e.g. --ga.population 8")
        if "=" in token:
            pairs.append(token[2:])
            i += 1
        elif i + 1 < len(tokens):
            pairs.append(f"{token[2:]}={tokens[i + 1]}")
            i += 2
        else:
            raise SystemExit(f"biotune: {token} needs a value")
    return pairs


def _print_table(frame: pd.DataFrame) -> None:
    with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200):
        print(frame.to_string(index=False))


def _add_executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=cfg.CHOICES["run.executor"],
                        help="where training runs execute (default serial); same as --run.executor")
    parser.add_argument("--workers", type=int, metavar="N", help="training runs at once; same as --run.workers")


def _executor_overrides(args) -> list[str]:
    pairs = []
    if getattr(args, "executor", None):
        pairs.append(f"run.executor={args.executor}")
    if getattr(args, "workers", None) is not None:
        pairs.append(f"run.workers={args.workers}")
    return pairs


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_executor_options(parser)
    parser.add_argument("--dataset", help="dataset name (biotune datasets) or a path: .npz, .csv or an image folder")
    parser.add_argument("--model", help="model name (biotune models) or any timm model name")
    parser.add_argument("--preset", choices=PRESETS, help="config preset (default: cpu)")
    parser.add_argument("--config", help="YAML file with sections data/model/train/ga")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biotune", description="BioTune: evolutionary selective fine-tuning of pretrained CNNs.",
        epilog="Config overrides: any --section.key VALUE, e.g. --ga.population 8 --train.seeds [1,2]")
    parser.add_argument("--store", help="run store (SQLite file); default results/runs.sqlite")
    parser.add_argument("--results-dir", help="folder for run folders (default results/)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("datasets", help="list dataset names")
    sub.add_parser("models", help="list registered model names")
    describe = sub.add_parser("describe", help="a model's blocks: name, parameters, share")
    describe.add_argument("model")
    describe.add_argument("--num-classes", type=int, default=1000)

    search = sub.add_parser("search", help="run a BioTune search (or --resume one)")
    _add_run_options(search)
    search.add_argument("--searcher", choices=cfg.CHOICES["ga.searcher"],
                        help="BioTune's GA (default) or a baseline at its budget; same as --ga.searcher")
    search.add_argument("--resume", metavar="RUN_ID", help="continue a killed or interrupted run")
    search.add_argument("--final", action="store_true", help="run the final protocol after the search")

    final = sub.add_parser("final", help="final protocol (docs/algorithm.md §7) for a finished search")
    final.add_argument("run_id")
    final.add_argument("--quiet", action="store_true")
    _add_executor_options(final)

    baseline = sub.add_parser("baseline", help="a baseline through the same final protocol")
    baseline.add_argument("--method", required=True, help="full, linear_probe, lp_ft, l2_sp, l1_sp, autorgn, lora, adafilter")
    baseline.add_argument("--no-grid", action="store_true",
                          help="train the method's default hyperparameters only, not its grid")
    _add_run_options(baseline)

    sub.add_parser("runs", help="list runs with their status")
    compare = sub.add_parser("compare", help="one table for several runs")
    compare.add_argument("run_ids", nargs="+")

    demo = sub.add_parser("demo", help="small search + final protocol vs full FT and linear probing")
    demo.add_argument("--preset", default="demo", choices=PRESETS)
    demo.add_argument("--quiet", action="store_true")
    _add_executor_options(demo)

    bench = sub.add_parser("bench", help="seconds per fitness evaluation: a plain PyTorch loop, the levers off, "
                                         "the exact levers, pruning, side by side")
    bench.add_argument("--preset", choices=PRESETS, help="default: cpu (demo with --parallel)")
    bench.add_argument("--evaluations", type=int, default=3, help="random genomes besides full fine-tuning")
    bench.add_argument("--json", metavar="FILE", help="also write every row and the summary of ratios here")
    bench.add_argument("--parallel", action="store_true",
                       help="instead: one search with each executor (serial, process, ray; 1 and 2 workers), "
                            "side by side (default preset here: demo)")
    bench.add_argument("--schedule", action="store_true",
                       help="instead: the bound on a search's parallel speed-up from its batches, for 1-32 runs at "
                            "once (default preset here: paper); computed, nothing trains")
    bench.add_argument("--methods", nargs="+", metavar="METHOD",
                       help="instead: one training run of each method side by side, e.g. --methods full adafilter")

    notebooks = sub.add_parser("notebooks", help="run a plan of notebooks through papermill")
    notebook_commands = notebooks.add_subparsers(dest="notebooks_command", required=True)
    run_plan = notebook_commands.add_parser("run", help="execute a plan (notebooks/smoke.yaml, cpu.yaml, paper.yaml)")
    run_plan.add_argument("plan", help="YAML plan: name, parameters, runs of {notebook, name, parameters}")
    run_plan.add_argument("--only", action="append", metavar="NAME", help="run only this entry, or every entry of this notebook (repeatable)")
    run_plan.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                          help="parameter for every selected notebook, value parsed as YAML (e.g. device=cuda)")
    run_plan.add_argument("--force", action="store_true", help="rerun notebooks that finished before")
    run_plan.add_argument("--output-dir", default="results/notebooks", help="executed notebooks go to DIR/<plan name>/")
    run_plan.add_argument("--kernel", default="python3", help="Jupyter kernel (default: this Python)")
    params = notebook_commands.add_parser("params", help="a notebook's parameters, defaults and help")
    params.add_argument("notebook")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if rest and args.command not in ("search", "baseline", "bench", "final", "demo"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    overrides = (_overrides(rest) + ([f"results_dir={args.results_dir}"] if args.results_dir else [])
                 + _executor_overrides(args))
    try:
        return _run(args, overrides, rest)
    # Bad input of every kind (config, data, store, checkpoint, plan) raises one of these with a
    # message that says what to do; anything else is a bug and keeps its traceback.
    except (ValueError, KeyError, OSError, TrainingFailedError) as error:
        print(f"biotune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("biotune: interrupted; finished evaluations are kept in the run store", file=sys.stderr)
        return 130


def _run(args, overrides: list[str], rest: list[str]) -> int:
    from . import experiment
    from .data import list_datasets
    from .genome import recipe_table
    from .models import create_model, list_models
    from .store import RunStore

    progress = not getattr(args, "quiet", False)
    if args.command == "datasets":
        print("\n".join(list_datasets()))
    elif args.command == "models":
        print("\n".join(list_models()))
        print("(and any timm model name, blocks from its stage grouping)")
    elif args.command == "describe":
        model = create_model(args.model, args.num_classes, weights=None)
        table = pd.DataFrame(model.describe())
        table["share"] = (100 * table["share"]).map("{:.2f}%".format)
        table["params"] = table["params"].map("{:,}".format)
        print(f"{args.model} with a {args.num_classes}-class head: {model.num_params:,} parameters "
              f"in {len(model.blocks)} blocks")
        _print_table(table)
    elif args.command == "search":
        if args.searcher:
            overrides = [*overrides, f"ga.searcher={args.searcher}"]
        result = experiment.search(args.dataset, args.model, args.preset, config_file=args.config,
                                   overrides=overrides, resume=args.resume, store=args.store, progress=progress)
        print(f"run {result.run_id}: best fitness {result.best_fitness:.4f}; outputs in {result.folder}")
        for block, value in recipe_table(result.recipe).items():
            print(f"  {block:24s} {value}")
        if args.final:
            _print_table(experiment.final(result.run_id, store=args.store, progress=progress,
                                          overrides=_executor_overrides(args)))
    elif args.command == "final":  # the stored config, with other run.* settings only
        _print_table(experiment.final(args.run_id, store=args.store, progress=progress,
                                      overrides=_overrides(rest) + _executor_overrides(args)))
    elif args.command == "baseline":
        run_id, finals = experiment.run_baseline(args.method, args.dataset, args.model, args.preset or "cpu",
                                                 config_file=args.config, overrides=overrides,
                                                 grid=[{}] if args.no_grid else None,
                                                 store=args.store, progress=progress)
        print(f"run {run_id}")
        _print_table(finals)
    elif args.command == "runs":
        with RunStore(args.store) as store:
            _print_table(store.runs())
    elif args.command == "compare":
        _print_table(experiment.compare(args.run_ids, store=args.store))
    elif args.command == "demo":
        table, folder = experiment.demo(preset=args.preset, store=args.store, progress=progress, overrides=overrides)
        _print_table(table)
        print(f"convergence figure and tables: {folder}")
    elif args.command == "notebooks":
        return _notebooks(args)
    elif args.command == "bench":
        from .bench import method_costs, parallel_bench, run_bench, schedule_speedups

        if args.schedule:
            _print_table(schedule_speedups(args.preset or "paper", overrides=overrides))
            return 0
        if args.parallel:
            table, summary = parallel_bench(args.preset or "demo", overrides, json_file=args.json)
            _print_table(table)
            print(json.dumps(summary, indent=2))
            return 0
        args.preset = args.preset or "cpu"
        if args.methods:
            _print_table(method_costs(args.preset, tuple(args.methods), overrides).round(3))
            return 0
        if args.evaluations < 0:
            raise cfg.ConfigError(f"--evaluations must be >= 0, got {args.evaluations}")
        table, summary = run_bench(preset=args.preset, evaluations=args.evaluations, overrides=overrides,
                                   json_file=args.json)
        _print_table(table.round({"seconds": 2, "images_per_s": 1, "val_macro_acc": 4}))
        print(json.dumps(summary, indent=2))
    return 0


def _notebooks(args) -> int:
    """`notebooks run`: the summary table, exit status 1 if any notebook failed; `notebooks params`."""
    try:
        from . import notebooks
    except ImportError as error:
        raise SystemExit(f"biotune: error: `biotune notebooks` needs the notebooks extra ({error}): "
                         "pip install -c constraints.txt -e '.[notebooks]'") from error
    if args.notebooks_command == "params":
        _print_table(pd.DataFrame([{"name": name, **info} for name, info in
                                   notebooks.notebook_parameters(args.notebook).items()]))
        return 0
    extra = {}
    for pair in args.parameter:
        name, separator, raw = pair.partition("=")
        if not separator or not name.isidentifier():
            raise cfg.ConfigError(f"-p {pair!r}: expected NAME=VALUE with a parameter name, e.g. -p device=cuda "
                                  "or -p 'overrides={train.max_epochs: 3}'")
        extra[name] = cfg.load_yaml(raw, f"-p {name}") if raw else None
    summary = notebooks.run_plan(args.plan, output_dir=args.output_dir, force=args.force, only=args.only,
                                 extra_parameters=extra, kernel_name=args.kernel)
    _print_table(summary)
    failed = summary[summary["status"] == "failed"]
    if len(failed):
        print(f"biotune: {len(failed)} of {len(summary)} notebooks failed: {', '.join(failed['name'])}; "
              "the executed copies above show the failing cell", file=sys.stderr)
        return 1
    return 0
