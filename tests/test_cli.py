"""The command line's shape: each command a handler argparse picks; `bench` modes as subcommands,
the flags they replaced still accepted for a release with a message naming the new spelling; the
names in its help taken from the registries."""
import pytest

from biotune import bench, cli
from biotune.batch import row_methods
from biotune.methods import list_methods

# new spelling, old spelling, the bench function each calls and the arguments it gets
SPELLINGS = [
    (["bench", "--preset", "smoke"], None,
     ("run_bench", (), {"preset": "smoke", "evaluations": 3, "overrides": [], "json_file": None})),
    (["bench"], None, ("run_bench", (), {"preset": "cpu", "evaluations": 3, "overrides": [], "json_file": None})),
    (["bench", "evaluations", "--evaluations", "0", "--json", "b.json", "--train.num_threads", "1"],
     ["bench", "--evaluations", "0", "--json", "b.json", "--train.num_threads", "1"],
     ("run_bench", (), {"preset": "cpu", "evaluations": 0, "overrides": ["train.num_threads=1"], "json_file": "b.json"})),
    (["bench", "parallel", "--json", "p.json", "--train.device", "cpu"],
     ["bench", "--parallel", "--json", "p.json", "--train.device", "cpu"],
     ("parallel_bench", ("demo", ["train.device=cpu"]), {"json_file": "p.json"})),
    (["bench", "schedule", "--preset", "smoke"], ["bench", "--schedule", "--preset", "smoke"],
     ("schedule_speedups", ("smoke",), {"overrides": []})),
    (["bench", "schedule"], ["bench", "--schedule"], ("schedule_speedups", ("paper",), {"overrides": []})),
    (["bench", "methods", "full", "adafilter", "--train.max_epochs", "1"],
     ["bench", "--methods", "full", "adafilter", "--train.max_epochs", "1"],
     ("method_costs", ("cpu", ("full", "adafilter"), ["train.max_epochs=1"]), {})),
]


@pytest.fixture()
def calls(monkeypatch):
    """The bench functions the CLI calls, replaced by recorders that return empty results."""
    import pandas as pd

    seen = []
    for name in ("run_bench", "parallel_bench", "schedule_speedups", "method_costs"):
        def record(*args, _name=name, **kwargs):
            seen.append((_name, args, kwargs))
            table = pd.DataFrame({"seconds": [], "images_per_s": [], "val_macro_acc": []})
            return (table, {}) if _name in ("run_bench", "parallel_bench") else table

        monkeypatch.setattr(bench, name, record)
    return seen


@pytest.mark.parametrize("new, old, expected", SPELLINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_each_bench_mode_is_a_subcommand_and_its_old_flag_still_runs_it(new, old, expected, calls, capsys):
    assert cli.main(new) == 0
    assert calls == [expected]
    assert "deprecated" not in capsys.readouterr().err
    if old is None:
        return
    calls.clear()
    assert cli.main(old) == 0
    assert calls == [expected]
    err = capsys.readouterr().err
    mode = old[1].removeprefix("--")
    if mode not in ("parallel", "schedule", "methods"):  # no mode: evaluations, as before
        assert "deprecated" not in err
        return
    assert f"`bench --{mode}` is deprecated" in err and f"use `biotune bench {mode}" in err
    if mode == "methods":
        assert "use `biotune bench methods full adafilter`" in err


def test_the_global_flags_find_the_bench_mode_after_them(calls, capsys):
    assert cli.main(["-v", "bench", "schedule"]) == 0
    assert calls == [("schedule_speedups", ("paper",), {"overrides": []})]
    with pytest.raises(SystemExit) as stop:
        cli.main(["--store", "s.sqlite", "bench", "parallel"])
    assert stop.value.code == 2
    assert "--store has no effect on `biotune bench`" in capsys.readouterr().err
    assert len(calls) == 1


def test_bench_schedule_prints_the_same_table_in_either_spelling(capsys):
    assert cli.main(["bench", "schedule", "--preset", "smoke"]) == 0
    new = capsys.readouterr()
    assert cli.main(["bench", "--schedule", "--preset", "smoke"]) == 0
    old = capsys.readouterr()
    assert new.out == old.out and "speedup_bound" in new.out
    assert "use `biotune bench schedule`" in old.err and "deprecated" not in new.err


def test_every_command_line_ends_in_a_handler():
    parser = cli.build_parser()
    leaves = {leaf.prog.removeprefix("biotune "): leaf for leaf in cli._leaf_parsers(parser)}
    assert set(leaves) == {"datasets", "models", "describe", "search", "final", "baseline", "runs", "compare",
                           "study", "demo", "bench evaluations", "bench parallel", "bench schedule",
                           "bench methods", "notebooks run", "notebooks params", "notebooks cost", "data check",
                           "data fetch", "data fakes"}
    assert all(callable(leaf.get_default("handler")) for leaf in leaves.values())


def test_the_help_lists_the_registered_names(capsys):
    for argv in (["baseline", "--help"], ["bench", "methods", "--help"], ["study", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = " ".join(capsys.readouterr().out.split())
        names = row_methods() if argv[0] == "study" else list_methods()
        assert all(name in text for name in names), (argv, text)


def test_the_executor_flags_set_executor_keys_and_old_run_flags_warn_with_the_new_name(tmp_path, capsys):
    args, _ = cli.build_parser().parse_known_args(["search", "--executor", "process", "--workers", "2"])
    assert cli._executor_overrides(args) == ["executor.kind=process", "executor.workers=2"]
    describe = ["datasets", "describe", "synthetic", "--preset", "smoke", "--data.root", str(tmp_path / "data")]
    assert cli.main([*describe, "--run.executor", "process", "--run.workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "biotune: warning: override: config key run.executor is deprecated; use executor.kind\n" in err
    assert "biotune: warning: override: config key run.workers is deprecated; use executor.workers\n" in err
    assert cli.main([*describe, "--run.workers", "2"]) == 2  # read as executor.workers, and refused as it
    assert "error: executor.workers=2 with executor.kind=serial" in capsys.readouterr().err
    # a stored run takes executor settings only, the old spelling too
    assert cli.main(["--store", str(tmp_path / "s.sqlite"), "final", "nope", "--run.workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "config key run.workers is deprecated; use executor.workers" in err and "no run 'nope'" in err
    assert cli.main([*describe, "--executor.kind", "process", "--executor.workers", "2"]) == 0
    assert "deprecated" not in capsys.readouterr().err
