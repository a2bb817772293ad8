"""The ``biotune`` command line: a thin layer over the library, and the only place that prints.

Each command has an ``_add_<command>`` function that builds its parser and a handler that argparse
picks (``set_defaults(handler=...)``); ``main`` parses the line and calls that handler.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import pandas as pd

from . import config as cfg
from . import experiment, tables
from .batch import ROW_EXECUTORS, row_methods
from .data import list_datasets
from .executors import TrainingFailedError
from .genome import recipe_table
from .methods import list_methods
from .models import create_model, list_models
from .store import RunStore
from .study import REFERENCES, run_study

PRESETS = list(cfg.PRESETS)
STUDY_METHODS = ("biotune", "biotune_robust", "random", "full", "linear_probe", "l2_sp")
# `biotune bench MODE`, each with its default preset; without a mode it is `evaluations`
BENCH_PRESETS = {"evaluations": "cpu", "parallel": "demo", "schedule": "paper", "methods": "cpu"}
NO_STORE = "it reads and writes no run store"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(_with_bench_mode(sys.argv[1:] if argv is None else list(argv), parser))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if rest and not args.takes_overrides:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    _refuse_global_flags(args, parser)
    if args.store is None and args.results_dir is not None:  # as a config's store_path: the one store of that folder
        args.store = str(Path(args.results_dir) / "runs.sqlite")
    overrides = (_overrides(rest) + ([f"results_dir={args.results_dir}"] if args.results_dir else [])
                 + _executor_overrides(args))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            return args.handler(args, overrides) or 0
    # Bad input of every kind (config, data, store, checkpoint, plan) raises one of these with a
    # message that says what to do; anything else is a bug and keeps its traceback.
    except BrokenPipeError:  # `biotune runs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except (ValueError, KeyError, OSError, TrainingFailedError) as error:
        print(f"biotune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("biotune: interrupted; finished evaluations are kept in the run store", file=sys.stderr)
        return 130


def _show_warning(show, message, category, *where, **options) -> None:
    """A config key under its old name in one line, as the CLI's errors; other warnings as ``show`` does."""
    if issubclass(category, cfg.DeprecatedKey):
        print(f"biotune: warning: {message}", file=sys.stderr)
    else:
        show(message, category, *where, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biotune", description="BioTune: evolutionary selective fine-tuning of pretrained CNNs.",
        epilog="Config overrides: any --section.key VALUE, e.g. --ga.population 8 --train.seeds [1,2]")
    _add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_datasets, _add_models, _add_describe, _add_search, _add_final, _add_baseline, _add_runs,
                _add_compare, _add_study, _add_demo, _add_bench, _add_notebooks, _add_data):
        add(sub)
    for command in _leaf_parsers(parser):  # the global flags after the command work too: search --store S
        _add_global_options(command, argparse.SUPPRESS)
    return parser


def _command(sub, name: str, help: str, handler=None, *, store: bool = False, overrides: bool = False,
             no_store: str = NO_STORE) -> argparse.ArgumentParser:
    """A command's parser. ``store``: --store and --results-dir mean something to it (elsewhere they
    are refused, ``no_store`` saying why); ``overrides``: it takes config overrides."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(handler=handler, uses_store=store, takes_overrides=overrides, no_store=no_store)
    return parser


# ---------------------------------------------------------------------------------------------
# options several commands share

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
    parser.add_argument("--executor", choices=cfg.CHOICES["executor.kind"],
                        help="where training runs execute (default serial); same as --executor.kind")
    parser.add_argument("--workers", type=int, metavar="N", help="training runs at once; same as --executor.workers")
    parser.add_argument("--gpus", type=_gpu_list, metavar="0,1,...",
                        help="GPUs the training runs go to, one worker pinned to each (default: every visible GPU; "
                             "'all' resets a stored choice); same as --executor.gpus")
    parser.add_argument("--runs-per-gpu", type=int, metavar="N",
                        help="training runs sharing each GPU, each held to 1/N of its memory; "
                             "same as --executor.runs_per_gpu")


def _gpu_list(text: str) -> str:
    """``0,1,3`` -> the YAML list ``[0,1,3]``; ``all`` -> null (every visible GPU)."""
    if text.strip() == "all":
        return "null"
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected GPU indices separated by commas, e.g. 0,1,2,3 (or all), got {text!r}")
    return "[" + ",".join(parts) + "]"


def _executor_overrides(args) -> list[str]:
    pairs = []
    if getattr(args, "executor", None):
        pairs.append(f"executor.kind={args.executor}")
    if getattr(args, "workers", None) is not None:
        pairs.append(f"executor.workers={args.workers}")
    if getattr(args, "gpus", None) is not None:
        pairs.append(f"executor.gpus={args.gpus}")
    if getattr(args, "runs_per_gpu", None) is not None:
        pairs.append(f"executor.runs_per_gpu={args.runs_per_gpu}")
    return pairs


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_executor_options(parser)
    parser.add_argument("--dataset", help="dataset name (biotune datasets) or a path: .npz, .csv or an image folder")
    parser.add_argument("--model", help="model name (biotune models) or any timm model name")
    parser.add_argument("--preset", choices=PRESETS, help="config preset (default: cpu)")
    parser.add_argument("--config", help="YAML file with sections data/model/train/ga")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


# ---------------------------------------------------------------------------------------------
# the global flags: --store, --results-dir, -v, before or after the command

def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    """--store, --results-dir and -v on the main parser (default None) and again on every command
    (default SUPPRESS, so a command's absent flag does not hide the main parser's)."""
    parser.add_argument("--store", default=default, help="run store (SQLite file); default results/runs.sqlite")
    parser.add_argument("--results-dir", default=default, help="folder for run folders (default results/)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False if default is None else default)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Name -> parser of the commands under ``parser`` (empty for a command without any)."""
    nested = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return nested[0].choices if nested else {}


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers a command line ends in: `search`, `notebooks run`, `bench parallel`, ..."""
    leaves = []
    for command in dict.fromkeys(_subcommands(parser).values()):
        leaves += _leaf_parsers(command) if _subcommands(command) else [command]
    return leaves


def _refuse_global_flags(args, parser: argparse.ArgumentParser) -> None:
    """A global flag where it means nothing is refused rather than ignored. Without --store, the
    store is <results-dir>/runs.sqlite, so --results-dir also locates a store."""
    for name, flag in (("store", "--store"), ("results_dir", "--results-dir")):
        if getattr(args, name, None) is not None and not args.uses_store:
            commands = sorted(command for command, its in _subcommands(parser).items() if its.get_default("uses_store"))
            parser.error(f"{flag} has no effect on `biotune {args.command}` ({args.no_store}); it is for "
                         f"{', '.join(commands)}")


# ---------------------------------------------------------------------------------------------
# names: datasets, models, describe

def _add_datasets(sub) -> None:
    datasets = _command(sub, "datasets", "list dataset names; `datasets describe NAME`: its splits' sizes and bytes",
                        _datasets, overrides=True)
    datasets.add_argument("action", nargs="?", choices=["list", "describe"], default="list")
    datasets.add_argument("name", nargs="?", help="with describe: a dataset name or path")
    datasets.add_argument("--preset", choices=PRESETS, default="cpu", help="with describe: whose input size and storage")
    datasets.add_argument("--model", help="with describe: whose input size (default: the preset's model)")


def _datasets(args, overrides: list[str]) -> None:
    if args.action == "describe":
        _describe_dataset(args, overrides)
        return
    if args.name:
        raise cfg.ConfigError(f"`biotune datasets` takes no name; describe one with: biotune datasets describe {args.name}")
    print("\n".join(list_datasets()))


def _describe_dataset(args, overrides: list[str]) -> None:
    """Each split's images and the bytes they take in memory, on disk and at the model input."""
    if not args.name:
        raise cfg.ConfigError("datasets describe needs a dataset name or path, e.g. biotune datasets describe svhn")
    config = cfg.resolve(args.preset, overrides=experiment.run_overrides(args.name, args.model, overrides, None))
    dataset = experiment.load_data(config)
    table = pd.DataFrame(dataset.describe())
    print(f"{dataset.name} for {config.model.name} at {dataset.preprocess.image_size} px "
          f"(preset {args.preset}, data.store_at {config.data.store_at}), cached under {config.data.root}/cache")
    for column in ("array_bytes", "disk_bytes", "at_input_bytes"):
        table[column.replace("_bytes", "_MB")] = table.pop(column).map(
            lambda b: "-" if b is None or pd.isna(b) else f"{b / 2**20:,.1f}")
    _print_table(table)


def _add_models(sub) -> None:
    _command(sub, "models", "list registered model names", _models)


def _models(args, overrides: list[str]) -> None:
    print("\n".join(list_models()))
    print("(and any timm model name, blocks from its stage grouping)")


def _add_describe(sub) -> None:
    describe = _command(sub, "describe", "a model's blocks: name, parameters, share", _describe)
    describe.add_argument("model")
    describe.add_argument("--num-classes", type=int, default=1000)


def _describe(args, overrides: list[str]) -> None:
    model = create_model(args.model, args.num_classes, weights=None)
    table = pd.DataFrame(model.describe())
    table["share"] = (100 * table["share"]).map("{:.2f}%".format)
    table["params"] = table["params"].map("{:,}".format)
    print(f"{args.model} with a {args.num_classes}-class head: {model.num_params:,} parameters "
          f"in {len(model.blocks)} blocks")
    _print_table(table)


# ---------------------------------------------------------------------------------------------
# runs: search, final, baseline, runs, compare, study, demo

def _add_search(sub) -> None:
    search = _command(sub, "search", "run a BioTune search (or --resume one)", _search, store=True, overrides=True)
    _add_run_options(search)
    search.add_argument("--searcher", choices=cfg.CHOICES["ga.searcher"],
                        help="BioTune's GA (default) or a baseline at its budget; same as --ga.searcher")
    search.add_argument("--resume", metavar="RUN_ID", help="continue a killed or interrupted run")
    search.add_argument("--final", action="store_true", help="run the final protocol after the search")


def _search(args, overrides: list[str]) -> None:
    if args.searcher:
        overrides = [*overrides, f"ga.searcher={args.searcher}"]
    result = experiment.search(args.dataset, args.model, args.preset, config_file=args.config, overrides=overrides,
                               resume=args.resume, store=args.store, progress=_progress(args))
    print(f"run {result.run_id}: best fitness {result.best_fitness:.4f}; outputs in {result.folder}")
    for block, value in recipe_table(result.recipe).items():
        print(f"  {block:24s} {value}")
    if args.final:
        _print_table(experiment.final(result.run_id, store=args.store, progress=_progress(args),
                                      overrides=_executor_overrides(args)))


def _add_final(sub) -> None:
    final = _command(sub, "final", "final protocol (docs/algorithm.md §7) for a finished search", _final,
                     store=True, overrides=True)
    final.add_argument("run_id")
    final.add_argument("--quiet", action="store_true")
    _add_executor_options(final)


def _final(args, overrides: list[str]) -> None:  # the stored config, with other executor.* settings only
    _print_table(experiment.final(args.run_id, store=args.store, progress=_progress(args), overrides=overrides))


def _add_baseline(sub) -> None:
    baseline = _command(sub, "baseline", "a baseline through the same final protocol", _baseline,
                        store=True, overrides=True)
    baseline.add_argument("--method", required=True, help=", ".join(list_methods()))
    baseline.add_argument("--no-grid", action="store_true",
                          help="train the method's default hyperparameters only, not its grid")
    _add_run_options(baseline)


def _baseline(args, overrides: list[str]) -> None:
    run_id, finals = experiment.run_baseline(args.method, args.dataset, args.model, args.preset or "cpu",
                                             config_file=args.config, overrides=overrides,
                                             grid=[{}] if args.no_grid else None,
                                             store=args.store, progress=_progress(args))
    print(f"run {run_id}")
    _print_table(finals)


def _add_runs(sub) -> None:
    _command(sub, "runs", "list runs with their status", _runs, store=True)


def _runs(args, overrides: list[str]) -> None:
    with RunStore(args.store) as store:
        _print_table(store.runs())


def _add_compare(sub) -> None:
    compare = _command(sub, "compare", "one table for several runs", _compare, store=True)
    compare.add_argument("run_ids", nargs="+")


def _compare(args, overrides: list[str]) -> None:
    _print_table(experiment.compare(args.run_ids, store=args.store))


def _add_study(sub) -> None:
    study = _command(sub, "study", "datasets x methods x seeds with intervals and paired tests "
                                   "(results/study/NAME/: rows, summary, paired CSVs and figures)", _study,
                     store=True, overrides=True)
    study.add_argument("--name", help="the study's folder under results/study/ (default: the preset's name)")
    study.add_argument("--datasets", nargs="+", required=True, metavar="DATASET",
                       help="dataset names (biotune datasets) or paths: .npz, .csv or an image folder")
    study.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), metavar="METHOD",
                       help=f"searchers, BioTune variants and baselines: {', '.join(row_methods())} "
                            f"(default: {' '.join(STUDY_METHODS)})")
    study.add_argument("--seeds", type=int, default=3, help="matched cells: search, training and split seeds (default 3)")
    study.add_argument("--references", nargs="+", default=None, metavar="METHOD",
                       help=f"methods every other is paired against (default: {' '.join(REFERENCES)})")
    study.add_argument("--model", help="model name (biotune models) or any timm model name")
    study.add_argument("--preset", choices=PRESETS, default="cpu", help="config preset (default: cpu)")
    study.add_argument("--jobs", type=int, default=1, help="rows at once, each in its own process")
    study.add_argument("--executor", dest="row_executor", choices=ROW_EXECUTORS, default="process",
                       help="how rows run at once (default process)")
    study.add_argument("--gpus", dest="row_gpus", type=_gpu_list, metavar="0,1,...",
                       help="GPUs the rows go to (default: every visible GPU)")


def _study(args, overrides: list[str]) -> None:
    """Run or continue a study; print its test summary and paired comparisons."""
    tables, folder = run_study(args.name or args.preset, args.datasets, args.methods, args.seeds, preset=args.preset,
                               model=args.model, overrides=overrides, references=tuple(args.references or REFERENCES),
                               jobs=args.jobs, executor=args.row_executor, gpus=cfg.load_yaml(args.row_gpus or "null", "--gpus"),
                               store=args.store, progress=args.jobs == 1)
    for key in ("summary", "paired"):
        _print_table(tables[key].query("metric == 'test'").drop(columns="metric").round(4))
    failed = tables["rows"].query("status != 'ok'")
    if len(failed):
        print(f"biotune: {len(failed)} row(s) failed; their errors are in {folder / 'rows.csv'}", file=sys.stderr)
    print(f"tables and figures: {folder}")


def _add_demo(sub) -> None:
    demo = _command(sub, "demo", "small search + final protocol vs full FT and linear probing", _demo,
                    store=True, overrides=True)
    demo.add_argument("--preset", default="demo", choices=PRESETS)
    demo.add_argument("--quiet", action="store_true")
    _add_executor_options(demo)


def _demo(args, overrides: list[str]) -> None:
    table, folder = experiment.demo(preset=args.preset, store=args.store, progress=_progress(args), overrides=overrides)
    _print_table(table)
    print(f"convergence figure and tables: {folder}")
    print("\nAs docs/results.md publishes it (`make reproduce demo` compares a rerun with it):")
    print(tables.demo_markdown(tables.demo_rows(args.store, table["run_id"].tolist())))


# ---------------------------------------------------------------------------------------------
# bench: evaluations (the default), parallel, schedule, methods

def _add_bench(sub) -> None:
    bench = _command(sub, "bench", "speed benchmarks: seconds per fitness evaluation (the default), executors, "
                                   "the parallel schedule, methods", overrides=True,
                     no_store="bench writes its runs to a temporary store and folder")
    bench.epilog = "Without a mode, `biotune bench [--preset P] ...` is `biotune bench evaluations ...`."
    modes = bench.add_subparsers(dest="bench_mode", required=True, metavar="{" + ",".join(BENCH_PRESETS) + "}")
    evaluations = modes.add_parser("evaluations", help="seconds per fitness evaluation: a plain PyTorch loop, the "
                                                       "levers off, the exact levers, pruning, side by side")
    evaluations.set_defaults(handler=_bench_evaluations)
    _add_bench_preset(evaluations, "evaluations")
    evaluations.add_argument("--evaluations", type=int, default=3, help="random genomes besides full fine-tuning")
    evaluations.add_argument("--json", metavar="FILE", help="also write every row and the summary of ratios here")
    for mode in ("parallel", "schedule"):  # the spelling before modes, for one release
        evaluations.add_argument(f"--{mode}", action="store_true", help=f"deprecated: biotune bench {mode}")
    evaluations.add_argument("--methods", nargs="+", metavar="METHOD", help="deprecated: biotune bench methods METHOD ...")

    parallel = modes.add_parser("parallel", help="one search with each executor (serial, process, ray; 1 and 2 "
                                                 "workers), side by side")
    parallel.set_defaults(handler=_bench_parallel)
    _add_bench_preset(parallel, "parallel")
    parallel.add_argument("--json", metavar="FILE", help="also write every row and the summary here")

    schedule = modes.add_parser("schedule", help="the bound on a search's parallel speed-up from its batches, for "
                                                 "1-32 runs at once; computed, nothing trains")
    schedule.set_defaults(handler=_bench_schedule)
    _add_bench_preset(schedule, "schedule")

    methods = modes.add_parser("methods", help="one training run of each method side by side, e.g. "
                                               "biotune bench methods full adafilter")
    methods.set_defaults(handler=_bench_methods)
    methods.add_argument("methods", nargs="+", metavar="METHOD", help=", ".join(list_methods()))
    _add_bench_preset(methods, "methods")


def _add_bench_preset(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("--preset", choices=PRESETS, help=f"default: {BENCH_PRESETS[mode]}")


def _with_bench_mode(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``bench`` without a mode is ``bench evaluations`` (argparse has no default subcommand, and an
    optional one would take the value of ``--train.device cuda`` for a mode)."""
    takes_value = {flag for action in parser._actions if action.nargs != 0 for flag in action.option_strings}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # the global flags before the command
        i += 2 if argv[i] in takes_value else 1
    if argv[i:i + 1] == ["bench"] and not {*argv[i + 1:i + 2]} & {*BENCH_PRESETS, "-h", "--help"}:
        return [*argv[:i + 1], "evaluations", *argv[i + 1:]]
    return argv


def _bench_evaluations(args, overrides: list[str]) -> None:
    from .bench import run_bench

    for mode, handler in (("schedule", _bench_schedule), ("parallel", _bench_parallel), ("methods", _bench_methods)):
        if getattr(args, mode):
            new = f"bench {mode}" + (f" {' '.join(args.methods)}" if mode == "methods" else "")
            print(f"biotune: `bench --{mode}` is deprecated and will be removed in the next release; use `biotune {new}`",
                  file=sys.stderr)
            return handler(args, overrides)
    if args.evaluations < 0:
        raise cfg.ConfigError(f"--evaluations must be >= 0, got {args.evaluations}")
    table, summary = run_bench(preset=args.preset or BENCH_PRESETS["evaluations"], evaluations=args.evaluations,
                               overrides=overrides, json_file=args.json)
    _print_table(table.round({"seconds": 2, "images_per_s": 1, "val_macro_acc": 4}))
    print(json.dumps(summary, indent=2))


def _bench_parallel(args, overrides: list[str]) -> None:
    from .bench import parallel_bench

    table, summary = parallel_bench(args.preset or BENCH_PRESETS["parallel"], overrides, json_file=args.json)
    _print_table(table)
    print(json.dumps(summary, indent=2))


def _bench_schedule(args, overrides: list[str]) -> None:
    from .bench import schedule_speedups

    _print_table(schedule_speedups(args.preset or BENCH_PRESETS["schedule"], overrides=overrides))


def _bench_methods(args, overrides: list[str]) -> None:
    from .bench import method_costs

    _print_table(method_costs(args.preset or BENCH_PRESETS["methods"], tuple(args.methods), overrides).round(3))


# ---------------------------------------------------------------------------------------------
# notebooks: run, params, cost

def _add_notebooks(sub) -> None:
    notebooks = _command(sub, "notebooks", "run a plan of notebooks through papermill",
                         no_store="a plan's notebooks take -p store=FILE and --output-dir DIR")
    commands = notebooks.add_subparsers(dest="notebooks_command", required=True)
    run_plan = commands.add_parser("run", help="execute a plan (notebooks/smoke.yaml, cpu.yaml, paper.yaml)")
    run_plan.set_defaults(handler=_notebooks_run)
    run_plan.add_argument("plan", help="YAML plan: name, parameters, runs of {notebook, name, parameters}")
    run_plan.add_argument("--only", action="append", metavar="NAME", help="run only this entry, or every entry of this notebook (repeatable)")
    run_plan.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                          help="parameter for every selected notebook, value parsed as YAML (e.g. device=cuda)")
    run_plan.add_argument("--force", action="store_true", help="rerun notebooks that finished before")
    run_plan.add_argument("--output-dir", default="results/notebooks", help="executed notebooks go to DIR/<plan name>/")
    run_plan.add_argument("--kernel", default="python3", help="Jupyter kernel (default: this Python)")
    params = commands.add_parser("params", help="a notebook's parameters, defaults and help")
    params.set_defaults(handler=_notebooks_params)
    params.add_argument("notebook")
    cost = commands.add_parser("cost", help="a plan's training images and GPU hours, estimated from the "
                               "throughput measured on an H100 (nothing trains)")
    cost.set_defaults(handler=_notebooks_cost)
    cost.add_argument("plan", help="YAML plan, e.g. notebooks/paper.yaml")
    cost.add_argument("--gpus", nargs="+", type=int, default=[1, 4, 8], metavar="N",
                      help="wall hours on N GPUs (default: 1 4 8)")
    cost.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                      help="parameter for every notebook, as `notebooks run -p` takes it")


def _notebooks_module():
    """``biotune.notebooks``, or a clear error without the notebooks extra (papermill)."""
    try:
        from . import notebooks
    except ImportError as error:
        raise SystemExit(f"biotune: error: `biotune notebooks` needs the notebooks extra ({error}): "
                         "pip install -c constraints.txt -e '.[notebooks]'") from error
    return notebooks


def _notebook_parameters(pairs: list[str]) -> dict:
    """``-p NAME=VALUE`` options -> {name: value parsed as YAML}."""
    extra = {}
    for pair in pairs:
        name, separator, raw = pair.partition("=")
        if not separator or not name.isidentifier():
            raise cfg.ConfigError(f"-p {pair!r}: expected NAME=VALUE with a parameter name, e.g. -p device=cuda "
                                  "or -p 'overrides={train.max_epochs: 3}'")
        extra[name] = cfg.load_yaml(raw, f"-p {name}") if raw else None
    return extra


def _notebooks_run(args, overrides: list[str]) -> int:
    """The summary table; exit status 1 if any notebook failed."""
    notebooks = _notebooks_module()
    summary = notebooks.run_plan(args.plan, output_dir=args.output_dir, force=args.force, only=args.only,
                                 extra_parameters=_notebook_parameters(args.parameter), kernel_name=args.kernel)
    _print_table(summary)
    failed = summary[summary["status"] == "failed"]
    if len(failed):
        print(f"biotune: {len(failed)} of {len(summary)} notebooks failed: {', '.join(failed['name'])}; "
              "the executed copies above show the failing cell", file=sys.stderr)
        return 1
    return 0


def _notebooks_params(args, overrides: list[str]) -> None:
    notebooks = _notebooks_module()
    _print_table(pd.DataFrame([{"name": name, **info} for name, info in
                               notebooks.notebook_parameters(args.notebook).items()]))


def _notebooks_cost(args, overrides: list[str]) -> None:
    """Per notebook and in total, images and hours as low-high ranges."""
    _notebooks_module()
    extra = _notebook_parameters(args.parameter)
    from .estimate import plan_costs, summary

    if min(args.gpus) < 1:
        raise cfg.ConfigError(f"--gpus takes numbers of GPUs >= 1, got {args.gpus}")
    costs = plan_costs(args.plan, extra)
    table = summary(costs, args.gpus)

    def span(column: str, digits: int) -> pd.Series:
        return table[f"{column}_low"].round(digits).map(f"{{:,.{digits}f}}".format) + " - " + \
            table[f"{column}_high"].round(digits).map(f"{{:,.{digits}f}}".format)

    shown = pd.DataFrame({"notebook": table["notebook"], "rows": table["rows"].astype(int),
                          "reused": table["reused"].astype(int), "training images": span("train_images", 0),
                          "GPU hours": span("gpu_hours", 1)})
    for n in args.gpus:
        shown[f"wall hours, {n} GPU{'s' if n > 1 else ''}"] = [
            f"{low:,.1f} - {high:,.1f}" for low, high in zip(table[f"wall_hours_low_{n}"], table[f"wall_hours_high_{n}"])]
    _print_table(shown)
    print("\nthroughput per model:")
    for (model, source), rows in costs.groupby(["model", "throughput"]):
        print(f"  {model}: {source} ({len(rows)} rows)")
    print("reused: rows that are the run of an earlier row (cost nothing). low: every run stops at its earliest "
          "(patience + 1 epochs), at the faster measured rate; high: every run trains max_epochs at the slower "
          "rate. Assumptions: biotune/estimate.py; measurements: results/reference/throughput_h100.json")


# ---------------------------------------------------------------------------------------------
# data: check, fetch, fakes

def _add_data(sub) -> None:
    data = _command(sub, "data", "the datasets and weights a plan or names need: check, fetch, or write fakes")
    commands = data.add_subparsers(dest="data_command", required=True)
    for name, text in (("check", "what is present and what is missing, in seconds (exit status 2 if anything is)"),
                       ("fetch", "download what is missing, one item at a time, verified; then check")):
        command = commands.add_parser(name, help=text)
        command.set_defaults(handler=_data_needs)
        command.add_argument("targets", nargs="+", metavar="PLAN_OR_NAME",
                             help="plans (notebooks/paper.yaml), dataset names or paths, model names")
        command.add_argument("--root", help="data root of every dataset (default: each plan run's data_root, else data)")
        command.add_argument("--no-verify", action="store_true",
                             help="accept files whose checksums differ from torchvision's (data.verify false)")
    fakes = commands.add_parser("fakes", help="tiny fakes of the paper's datasets in their exact on-disk "
                                              "formats (make rehearse); read them with data.verify false")
    fakes.set_defaults(handler=_data_fakes)
    fakes.add_argument("root", help="data root to write them under")
    fakes.add_argument("names", nargs="*", help="datasets (default: all nine)")


def _data_needs(args, overrides: list[str]) -> int:
    """`data check|fetch`: one row per dataset and weight file; what is missing and the command that
    fetches it on stderr, exit status 2 while anything is missing."""
    from . import staging

    plans = [target for target in args.targets if target.endswith((".yaml", ".yml"))]
    configs = []
    if plans:
        from .notebooks import load_plan, training_configs

        configs = [config for plan in plans for config in training_configs(load_plan(plan)[1])]
    names = [target for target in args.targets if target not in plans]
    needs = staging.merge_needs(staging.config_needs(configs) + staging.name_needs(names), root=args.root,
                                verify=not args.no_verify)
    statuses = staging.fetch(needs) if args.data_command == "fetch" else staging.check(needs)
    _print_table(staging.table(statuses))
    report = staging.missing_report(statuses)
    if report:
        print(report, file=sys.stderr)
        return 2
    return 0


def _data_fakes(args, overrides: list[str]) -> None:
    from .fakes import FAKES, write_fake_dataset

    for name in args.names or FAKES.names():
        write_fake_dataset(name, args.root)
    print(f"fakes of {', '.join(args.names or FAKES.names())} under {args.root}; read them with data.verify false")
