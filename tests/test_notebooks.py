"""The notebooks (committed clean, each runs under papermill with smoke parameters) and the batch
driver (parameter checks, failures reported while the others finish, resumable)."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from biotune.notebooks import PlanError, load_plan, notebook_parameters, run_plan

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
COMMITTED = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_five_notebooks_exist():
    assert [p.stem for p in COMMITTED] == ["00_quickstart", "01_main_experiments", "02_ablations", "03_figures",
                                           "04_study"]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs_and_one_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "clear the outputs"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert {"preset", "device", "output_dir"} <= set(notebook_parameters(path))


@pytest.mark.parametrize("plan", ["smoke", "cpu", "paper"])
def test_shipped_plans_pass_the_parameter_check(plan):
    name, runs = load_plan(NOTEBOOKS / f"{plan}.yaml", {"device": "cpu"})
    assert name == plan and {run.notebook.stem for run in runs} == {p.stem for p in COMMITTED}


@pytest.mark.notebooks
@pytest.mark.slow
def test_every_notebook_runs_with_smoke_parameters_and_writes_its_figures(tmp_path):
    plan = yaml.safe_load((NOTEBOOKS / "smoke.yaml").read_text())
    plan["parameters"].update(store=str(tmp_path / "runs.sqlite"))
    for run in plan["runs"]:
        run["notebook"] = str(NOTEBOOKS / run["notebook"])
        run["parameters"]["output_dir"] = str(tmp_path / Path(run["notebook"]).stem)
        if "data_root" in notebook_parameters(run["notebook"]):
            run["parameters"]["data_root"] = str(tmp_path / "data")
        if "overrides" in notebook_parameters(run["notebook"]):  # run folders too, not the repository's results/
            run["parameters"]["overrides"] = {**run["parameters"].get("overrides", {}), "results_dir": str(tmp_path / "runs")}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))

    summary = run_plan(tmp_path / "plan.yaml", output_dir=tmp_path / "executed")
    assert summary["status"].tolist() == ["ok"] * 5, summary["error"].tolist()
    figures = {stem: sorted(p.name for p in (tmp_path / stem).glob("*.p*")) for stem in
               ("00_quickstart", "01_main_experiments", "02_ablations", "03_figures")}
    assert figures["00_quickstart"] == ["quickstart_convergence.pdf", "quickstart_convergence.png"]
    assert "accuracy_vs_share_smoke.png" in figures["01_main_experiments"]
    assert "ablations_smoke_synthetic.png" in figures["02_ablations"]
    for name in ("convergence", "best_genomes", "accuracy_vs_share", "ablations", "time_per_evaluation",
                 "adafilter_gates"):
        assert {f"{name}_smoke.png", f"{name}_smoke.pdf"} <= set(figures["03_figures"]), name
    executed = nbformat.read(tmp_path / "executed" / "smoke" / "01_main_experiments.ipynb", as_version=4)
    assert any(cell.get("outputs") for cell in executed.cells if cell.cell_type == "code")
    table = (tmp_path / "01_main_experiments" / "main_smoke.csv").read_text()
    assert table.count("\n") == 1 + 12  # header + one row per method

    again = run_plan(tmp_path / "plan.yaml", output_dir=tmp_path / "executed")
    assert {"means.png", "paired_vs_full.png", "paired_vs_random.png"} <= {p.name for p in (tmp_path / "04_study").glob("*/*.png")}
    assert again["status"].tolist() == ["skipped"] * 4 + ["ok"]  # figures are `always: true`


# the driver, on tiny notebooks -----------------------------------------------------------------


def tiny_notebook(path: Path, body: str) -> Path:
    """Parameters ``x: int = 1`` and ``tag: str = "a"``; ``body`` runs after them."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    parameters = nbformat.v4.new_code_cell('x: int = 1  # a number\ntag: str = "a"  # a word')
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters, nbformat.v4.new_code_cell(body)]
    nbformat.write(notebook, path)
    return path


@pytest.fixture()
def tiny(tmp_path):
    tiny_notebook(tmp_path / "writes.ipynb", "open(f'out-{tag}.txt', 'w').write(str(x))")
    tiny_notebook(tmp_path / "fails.ipynb", "raise RuntimeError(f'broken on purpose, x={x}')")
    return tmp_path


def write_plan(folder: Path, runs: list, **parameters) -> Path:
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "parameters": parameters, "runs": runs}))
    return path


def test_an_unknown_or_mistyped_parameter_is_rejected_before_anything_runs(tiny):
    plan = write_plan(tiny, [{"notebook": "writes.ipynb", "parameters": {"y": 2}}])
    with pytest.raises(PlanError, match=r"unknown parameter 'y'; writes.ipynb takes x, tag"):
        run_plan(plan, output_dir=tiny / "out")
    plan = write_plan(tiny, [{"notebook": "writes.ipynb", "parameters": {"x": "two"}}])
    with pytest.raises(PlanError, match=r"parameter 'x' must be int, got 'two'"):
        run_plan(plan, output_dir=tiny / "out")
    with pytest.raises(PlanError, match="unknown key"):
        run_plan(write_plan(tiny, [{"notebok": "writes.ipynb"}]), output_dir=tiny / "out")
    with pytest.raises(PlanError, match="does not exist"):
        run_plan(write_plan(tiny, [{"notebook": "missing.ipynb"}]), output_dir=tiny / "out")
    assert not (tiny / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("name: t\nruns:\n  - notebook: [writes.ipynb\n    parameters: {x: 1}\n",
     r"plan.yaml: invalid YAML at line 4, column 15: expected ',' or ']'"),
    ("runs:\n  - notebook: writes.ipynb\n   always: true\n", r"plan.yaml: invalid YAML at line 3, column 4"),
    ("- notebook: writes.ipynb\n", "plan .*plan.yaml must be a mapping with keys name, parameters, runs"),
    ("runs: writes.ipynb\n", "lists no runs; add a 'runs:' list"),
    ("runs:\n  - parameters: {x: 1}\n", "run 1: needs a 'notebook:' path"),
    ("runs:\n  - notebook: 5\n", "run 1: needs a 'notebook:' path"),
    ("runs:\n  - notebook: missing.ipynb\n", "missing.ipynb does not exist"),
    ("runs:\n  - notebook: notes.ipynb\n", "notes.ipynb is not a readable Jupyter notebook"),
    ("runs:\n  - notebook: writes.ipynb\n    parameters: {y: 2}\n", "unknown parameter 'y'"),
], ids=["yaml_syntax", "yaml_indent", "not_a_mapping", "runs_not_a_list", "no_notebook", "notebook_not_a_path",
        "unknown_notebook", "not_a_notebook", "unknown_parameter"])
def test_a_malformed_plan_names_the_file_and_the_problem(tiny, text, message):
    (tiny / "notes.ipynb").write_text("not json")
    (tiny / "plan.yaml").write_text(text)
    with pytest.raises(PlanError, match=message):
        load_plan(tiny / "plan.yaml")


def test_a_failing_notebook_is_reported_and_the_others_finish(tiny, monkeypatch):
    monkeypatch.chdir(tiny)
    runs = [{"notebook": "fails.ipynb"}, {"notebook": "writes.ipynb", "parameters": {"x": 7}}]
    summary = run_plan(write_plan(tiny, runs), output_dir=tiny / "out")
    assert summary["status"].tolist() == ["failed", "ok"]
    assert "RuntimeError: broken on purpose, x=1" in summary.loc[0, "error"]
    assert (tiny / "out-a.txt").read_text() == "7"
    assert (tiny / "out" / "t" / "fails.ipynb").is_file()  # the executed copy shows the failing cell

    cli = subprocess.run([sys.executable, "-m", "biotune", "notebooks", "run", str(tiny / "plan.yaml"),
                          "--output-dir", str(tiny / "out")], capture_output=True, text=True, cwd=tiny)
    assert cli.returncode == 1
    assert "1 of 2 notebooks failed: fails" in cli.stderr
    assert "skipped" in cli.stdout  # writes.ipynb finished before with the same parameters


def test_a_finished_notebook_is_skipped_unless_its_parameters_change_or_forced(tiny, monkeypatch):
    monkeypatch.chdir(tiny)
    plan = write_plan(tiny, [{"notebook": "writes.ipynb", "name": "first"},
                             {"notebook": "writes.ipynb", "name": "second", "parameters": {"tag": "b"}}], x=3)
    assert run_plan(plan, output_dir=tiny / "out")["status"].tolist() == ["ok", "ok"]
    marker = json.loads((tiny / "out" / "t" / "second.done.json").read_text())
    assert marker["parameters"] == {"x": 3, "tag": "b"}
    assert run_plan(plan, output_dir=tiny / "out")["status"].tolist() == ["skipped", "skipped"]
    changed = run_plan(plan, output_dir=tiny / "out", extra_parameters={"x": 4})
    assert changed["status"].tolist() == ["ok", "ok"] and (tiny / "out-b.txt").read_text() == "4"
    only = run_plan(plan, output_dir=tiny / "out", only=["second"], force=True, extra_parameters={"x": 4})
    assert only["name"].tolist() == ["second"] and only["status"].tolist() == ["ok"]
    with pytest.raises(PlanError, match="no run named third"):
        run_plan(plan, output_dir=tiny / "out", only=["third"])


def test_cli_parameters_take_yaml_values_and_reject_dotted_names(tiny):
    plan = write_plan(tiny, [{"notebook": "writes.ipynb"}])

    def cli(*arguments):
        return subprocess.run([sys.executable, "-m", "biotune", "notebooks", "run", str(plan), "--output-dir",
                               str(tiny / "out"), *arguments], capture_output=True, text=True, cwd=tiny)

    dotted = cli("-p", "train.max_epochs=3")
    assert dotted.returncode == 2 and "expected NAME=VALUE with a parameter name" in dotted.stderr
    assert cli("-p", "x=[1]").returncode == 2  # x is annotated int
    assert cli("-p", "x=12").returncode == 0
    assert (tiny / "out-a.txt").read_text() == "12"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter_of_the_parameters_cell(path):
    """papermill skips a line it cannot parse (a comment holding '=' did): such a parameter could
    not be set from a plan or with -p."""
    import ast

    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    declared = [node.target.id for node in ast.parse(cell.source).body if isinstance(node, ast.AnnAssign)]
    assert list(notebook_parameters(path)) == declared
