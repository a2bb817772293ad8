"""The global flags (--store, --results-dir, -v) with every command, before or after it: used
where they mean something, refused with the flag named where they do not; --resume and final
with the folder a run was started in; paths that cannot be created."""
from pathlib import Path

import pytest

from biotune.cli import main
from biotune.store import RunStore

NOTEBOOK = str(Path(__file__).resolve().parent.parent / "notebooks" / "04_study.ipynb")

SMOKE = ["--preset", "smoke"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A finished smoke search made with both flags: (store, results folder, data root, run id).
    The store is the results folder's own, where --results-dir alone looks for it."""
    root = tmp_path_factory.mktemp("flags")
    results, data = root / "runs", root / "data"
    store = results / "runs.sqlite"
    assert main(["--store", str(store), "--results-dir", str(results), "search", *SMOKE,
                 "--data.root", str(data)]) == 0
    with RunStore(store) as db:
        return store, results, data, db.runs()["run_id"].iloc[0]


def commands(data, run_id) -> dict:
    """argv after the command name -> where --store and --results-dir mean something."""
    return {
        "search": ([*SMOKE, "--data.root", str(data)], True, True),
        "final": ([run_id], True, True),
        "baseline": (["--method", "linear_probe", "--no-grid", *SMOKE, "--data.root", str(data)], True, True),
        "runs": ([], True, True),
        "compare": ([run_id], True, True),
        "demo": ([*SMOKE, "--quiet", "--data.root", str(data)], True, True),
        "study": (["--datasets", "synthetic", "--methods", "full", "--seeds", "1", *SMOKE, "--data.root", str(data)],
                  True, True),
        "datasets": ([], False, False),
        "models": ([], False, False),
        "describe": (["tiny_cnn"], False, False),
        "bench": ([*SMOKE], False, False),
        "notebooks": (["params", NOTEBOOK], False, False),
        "data": (["check", "digits"], False, False),
    }


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before", "after"])
def test_every_command_with_every_global_flag(started, where, capsys, monkeypatch):
    store, results, data, run_id = started
    monkeypatch.chdir(results.parent)  # --store alone keeps the default results/ folder: here, not in the repository
    for command, (rest, uses_store, uses_results) in commands(data, run_id).items():
        for flag, value, used in (("--store", str(store), uses_store), ("--results-dir", str(results), uses_results)):
            argv = [flag, value, command, *rest] if where == "before" else [command, *rest, flag, value]
            if command == "notebooks" and where == "after":
                argv = [command, rest[0], flag, value, rest[1]]
            if used:
                assert main(argv) == 0, (argv, capsys.readouterr().err)
            else:
                with pytest.raises(SystemExit) as stop:
                    main(argv)
                assert stop.value.code == 2, argv
                assert f"{flag} has no effect on `biotune {command}`" in capsys.readouterr().err
    with RunStore(store) as db:
        runs = db.runs()
        folders = {run: Path(db.run(run)["config"]["results_dir"]) for run in runs["run_id"]}
    assert {"biotune", "linear_probe", "full"} <= set(runs["method"])  # every run in the store asked for
    assert set(folders.values()) == {results, Path("results")}  # --results-dir's, or the default with --store alone
    assert all((folder / run).is_dir() for run, folder in folders.items())
    assert (results / "study" / "smoke" / "rows.csv").is_file()
    assert main(["-v", "models"]) == 0 and main(["models", "-v"]) == 0


def test_resume_with_the_folder_it_was_started_in_and_not_another(interrupted_search, tmp_path, capsys):
    results = tmp_path / "elsewhere"
    store, run_id = interrupted_search({"results_dir": str(results)}, after_runs=2)
    assert main(["--results-dir", str(results), "search", "--resume", run_id]) == 2  # its store is not in there
    assert f"{results / 'runs.sqlite'}" in capsys.readouterr().err
    flags = ["--store", str(store), "--results-dir", str(results)]
    other = tmp_path / "other"
    assert main(["--store", str(store), "--results-dir", str(other), "search", "--resume", run_id]) == 2
    err = capsys.readouterr().err
    assert f"--results-dir {other} is not the folder this run writes to ({results}" in err
    assert f"repeat --results-dir {results}" in err
    assert main([*flags, "search", "--resume", run_id, "--ga.population", "9"]) == 2
    assert "it takes no --ga.population 9" in capsys.readouterr().err  # named as typed
    assert main([*flags, "search", "--resume", run_id]) == 0
    assert (results / run_id / "recipe.json").is_file()
    assert main(["search", "--resume", run_id, *flags, "--final"]) == 0  # flags after the command, finished run
    assert main([*flags, "final", run_id]) == 0


def test_paths_that_cannot_be_created_say_which_and_how_to_fix(capsys):
    assert main(["--store", "/proc/nope/x.sqlite", "runs"]) == 2
    assert "cannot create the run store /proc/nope/x.sqlite in /proc/nope" in capsys.readouterr().err
    assert main(["--results-dir", "/proc/nope", "runs"]) == 2  # its store is /proc/nope/runs.sqlite
    assert "cannot create the run store /proc/nope/runs.sqlite in /proc/nope" in capsys.readouterr().err
    assert main(["--results-dir", "/proc/nope", "search", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "cannot create /proc/nope, the results folder" in err and "pass --results-dir DIR" in err


def test_a_closed_pipe_ends_quietly():
    """`biotune runs | head`: no 'Broken pipe' error once the reader has what it wanted (here a
    reader that exits at once, before biotune writes, so the write always meets a closed pipe)."""
    import subprocess
    import sys

    command = f"{sys.executable} -m biotune models | true"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Broken pipe" not in done.stderr, done.stderr
