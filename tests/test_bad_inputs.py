"""Bad input of every class fails early: exit status 2, no traceback, a message naming what was
wrong, and no run left `running` in the store. One case per class of the input-hardening issue."""
import subprocess
import sys

import numpy as np
import pytest

import biotune
from biotune.cli import main
from biotune.store import RunStore


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smoke_config):
    """A folder of bad files, and a finished smoke search in its own store to resume."""
    root = tmp_path_factory.mktemp("bad")
    (root / "text.npz").write_text("these are not arrays\n")
    (root / "empty.csv").write_text("")
    (root / "header.csv").write_text("path,label\n")
    np.savez(root / "gaps.npz", **{f"{split}_{kind}": value for split in ("train", "val", "test")
                                   for kind, value in (("images", np.zeros((6, 8, 8), np.uint8)),
                                                       ("labels", np.array([0, 5, 10] * 2)))})
    (root / "weights.pt").write_text("not a checkpoint")
    (root / "run.yaml").write_text("ga:\n  population: [8\n")
    (root / "plan.yaml").write_text("name: x\nruns:\n  - notebook: 00_quickstart.ipynb\n    parameters: {a: 1\n")
    (root / "store.sqlite").write_text("not a database\n" * 20)
    (root / "a_file").write_text("")
    store = root / "runs.sqlite"
    run = biotune.search(preset="smoke", store=store, progress=False,
                         overrides={"data.root": smoke_config.data.root, "results_dir": str(root / "results")})
    (run.folder / "checkpoint.json").write_text("{truncated")
    return {"root": root, "store": store, "run": run.run_id}


SMOKE = ["search", "--preset", "smoke"]
CASES = {
    # config values: typed and bounded before anything runs
    "value of the wrong type": ([*SMOKE, "--ga.population", "ten"], ["ga.population='ten'", "integer"]),
    "value out of range": ([*SMOKE, "--train.cosine_t_max", "0"], ["train.cosine_t_max=0", "greater than"]),
    "misspelt boolean": ([*SMOKE, "--ga.momentum", "flase"], ["ga.momentum='flase'", "boolean"]),
    "unknown device": ([*SMOKE, "--train.device", "tpu"], ["train.device='tpu'", "cuda:N"]),
    "negative split seed": ([*SMOKE, "--data.split_seed", "-1"], ["data.split_seed=-1"]),
    "misspelt key": ([*SMOKE, "--ga.populaton", "8"], ["unknown config key ga.populaton", "population"]),
    "invalid YAML config file": ([*SMOKE, "--config", "{root}/run.yaml"], ["run.yaml: invalid YAML at line"]),
    "results dir that is a file": (["--results-dir", "{root}/a_file", *SMOKE], ["is a file"]),
    # names and paths
    "unknown dataset name": ([*SMOKE, "--dataset", "fashion_mnsit"], ["unknown dataset", "fashion_mnist"]),
    "dataset path that does not exist": ([*SMOKE, "--dataset", "{root}/missing.npz"], ["does not exist"]),
    "baseline on a missing dataset": (["baseline", "--preset", "smoke", "--method", "full", "--dataset",
                                       "{root}/missing.csv"], ["does not exist"]),
    "unknown baseline": (["baseline", "--preset", "smoke", "--method", "loraa"], ["unknown method 'loraa'"]),
    "unknown run": (["final", "nope"], ["no run 'nope'"]),
    # malformed files
    "text file renamed .npz": ([*SMOKE, "--dataset", "{root}/text.npz"], ["text.npz"]),
    "empty CSV": ([*SMOKE, "--dataset", "{root}/empty.csv"], ["empty.csv"]),
    "header-only CSV": ([*SMOKE, "--dataset", "{root}/header.csv"], ["header.csv"]),
    "labels with gaps": ([*SMOKE, "--dataset", "{root}/gaps.npz"], ["gaps.npz", "5"]),
    "weights that are no checkpoint": ([*SMOKE, "--model.weights", "{root}/weights.pt"], ["weights.pt"]),
    "store that is not SQLite": (["--store", "{root}/store.sqlite", "runs"], ["store.sqlite is not a readable run store"]),
    "invalid YAML plan": (["notebooks", "run", "{root}/plan.yaml"], ["plan.yaml", "line"]),
    # resume
    "resume with overrides": (["search", "--resume", "{run}", "--ga.population", "8"], ["takes no --ga.population 8"]),
    "corrupt checkpoint on resume": (["search", "--resume", "{run}"], ["checkpoint.json is not a readable", "mv "]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_error(case, workspace, capsys):
    argv, expected = CASES[case]
    argv = [part.format(root=workspace["root"], run=workspace["run"]) for part in argv]
    uses_a_store = argv[0] != "notebooks"  # a plan's notebooks take their store as a parameter
    if "--store" not in argv and uses_a_store:
        argv = ["--store", str(workspace["store"]), *argv]
    if "--results-dir" not in argv and "--resume" not in argv and uses_a_store:  # a resumed run keeps its own
        argv = ["--results-dir", str(workspace["root"] / "results"), *argv]
    assert main(argv) == 2  # any exception other than a clear error would escape main() here
    error = capsys.readouterr().err
    assert error.startswith("biotune: error: ")
    for text in expected:
        assert text in error, error
    with RunStore(workspace["store"]) as store:
        runs = store.runs()
        assert runs["status"].tolist() == ["finished"], "a bad input left a run behind or changed one"


def test_no_traceback_reaches_the_terminal(tmp_path):
    process = subprocess.run([sys.executable, "-m", "biotune", "--store", str(tmp_path / "s.sqlite"), "search",
                              "--preset", "smoke", "--train.batch_size", "big"], capture_output=True, text=True)
    assert process.returncode == 2 and "Traceback" not in process.stderr
    assert "train.batch_size='big'" in process.stderr
    with RunStore(tmp_path / "s.sqlite") as store:
        assert store.runs().empty
