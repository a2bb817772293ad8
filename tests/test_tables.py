"""Published tables: generated from committed results files, stamped, and checked against them."""
import json
import shutil

import pandas as pd
import pytest

from biotune import tables
from biotune.study import study_tables

PROVENANCE = {"command": "biotune demo", "commit": "0123456789abcdef", "dirty": False, "date": "2026-12-05",
              "machine": "2-core Test CPU, 2 torch threads, no GPU", "seconds": 150.0}
DEMO_ROWS = [{"method": "biotune", "test_macro_acc": 0.805, "val_macro_acc": 0.8125, "trainable_share": 0.754,
              "train_runs": 22, "seconds": 125.0},
             {"method": "full", "test_macro_acc": 0.812, "val_macro_acc": 0.8, "trainable_share": 1.0,
              "train_runs": 1, "seconds": 13.0}]


@pytest.fixture()
def repository(tmp_path):
    """A repository with a demo results file, a study folder and documents holding their blocks."""
    (tmp_path / "results" / "reference").mkdir(parents=True)
    (tmp_path / "results" / "reference" / "demo.json").write_text(
        json.dumps({"provenance": PROVENANCE, "rows": DEMO_ROWS}))
    bench = json.loads((tables.ROOT / "results" / "reference" / "bench_cpu.json").read_text())
    (tmp_path / "results" / "reference" / "bench_cpu.json").write_text(json.dumps({**bench, "provenance": PROVENANCE}))
    study = tmp_path / "results" / "study" / "offline"
    study.mkdir(parents=True)
    rows = pd.DataFrame([{"dataset": d, "method": m, "seed": s, "status": "ok",
                          "test_macro_acc": 0.9 + 0.01 * s + (0.02 if m == "biotune" else 0) + 0.001 * i,
                          "val_macro_acc": 0.91 + 0.01 * s} for i, d in enumerate(["digits", "mnist5k"])
                         for m in ["biotune", "random", "full"] for s in range(3)])
    made = study_tables(rows)
    for name in ("summary", "paired"):
        made[name].to_csv(study / f"{name}.csv", index=False)
    (study / "provenance.json").write_text(json.dumps({**PROVENANCE, "command": "biotune study --name offline"}))
    (tmp_path / "docs").mkdir()
    blocks = "".join(f"<!-- table: {name} -->\nold\n<!-- /table -->\n\n" for name in tables.TABLES)
    (tmp_path / "README.md").write_text("# readme\n\n" + blocks)
    (tmp_path / "docs" / "results.md").write_text("# results\n\n<!-- table: demo -->\nold\n<!-- /table -->\n")
    return tmp_path


def test_write_fills_every_block_and_check_then_passes(repository):
    assert len(tables.refresh(write=True, root=repository)) == len(tables.TABLES) + 1
    assert tables.refresh(write=False, root=repository) == []
    readme = (repository / "README.md").read_text()
    assert "| biotune | 80.50 | 81.25 | 75.4% | 22 |" in readme
    assert "| BioTune (paper) | " in readme and "| random search | " in readme


def test_a_number_edited_by_hand_or_a_stale_results_file_fails_the_check(repository):
    tables.refresh(write=True, root=repository)
    results = repository / "docs" / "results.md"
    results.write_text(results.read_text().replace("80.50", "81.50"))
    assert tables.refresh(write=False, root=repository) == ["docs/results.md: demo"]
    tables.refresh(write=True, root=repository)
    saved = json.loads((repository / "results/reference/demo.json").read_text())
    saved["rows"][0]["test_macro_acc"] = 0.9
    (repository / "results/reference/demo.json").write_text(json.dumps(saved))
    assert tables.refresh(write=False, root=repository) == ["README.md: demo", "docs/results.md: demo"]


def test_every_table_carries_its_source_command_commit_date_and_machine(repository):
    for name in tables.TABLES:
        text = tables.generated(name, repository)
        stamp = text.splitlines()[-1]
        assert tables.TABLES[name].source in stamp and "0123456" in stamp and "2026-12-05" in stamp
        assert "2-core Test CPU" in stamp and "`biotune " in stamp


def test_the_study_tables_show_intervals_and_paired_p_values(repository):
    means = tables.generated("study-offline-means", repository)
    assert "mean of 3 seeds with its 95% interval" in means and " [" in means
    paired = tables.generated("study-offline-paired", repository)
    line = next(row for row in paired.splitlines() if row.startswith("| all | BioTune (paper) - random search"))
    assert "| 6 | +2.0" in line and "6 / 0 / 0" in line and "| 0.031 |" in line  # Wilcoxon, 6 wins: 2/2**6
    per_dataset = tables.generated("study-offline-paired-datasets", repository)
    assert "| digits | BioTune (paper) - random search | 3 | +2.00 [+2.00, +2.00] | 3 / 0 / 0 | 0.25 |" in per_dataset


def test_an_unknown_table_name_in_a_document_says_which_exist(repository):
    (repository / "docs" / "other.md").write_text("<!-- table: demo2 -->\nx\n<!-- /table -->\n")
    with pytest.raises(KeyError, match="no published table 'demo2'; the tables are: demo"):
        tables.refresh(write=False, root=repository)


@pytest.mark.parametrize("change, code", [(0.0, 0), (0.01, 1), (float("nan"), 1), ("renamed", 1)])
def test_reproduce_shows_both_and_fails_an_exact_table_that_moved(change, code, monkeypatch, tmp_path, capsys):
    shutil.copytree(tables.ROOT / "results" / "reference", tmp_path / "results" / "reference")
    (tmp_path / "results" / "reference" / "demo.json").write_text(json.dumps({"provenance": PROVENANCE, "rows": DEMO_ROWS}))

    def rerun(path):
        if change == "renamed":  # a method that came back under another name
            rows = [DEMO_ROWS[0], dict(DEMO_ROWS[1], method="full_ft")]
        else:
            rows = [dict(row, test_macro_acc=row["test_macro_acc"] + change, seconds=1.0) for row in DEMO_ROWS]
        path.write_text(json.dumps({"provenance": PROVENANCE, "rows": rows}))

    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setitem(tables.TABLES, "demo", tables.Published("results/reference/demo.json", tables._render_demo,
                                                                  rerun, exact=True, compared=tables.DEMO_COLUMNS[1:]))
    assert tables.reproduce("demo") == code
    out = capsys.readouterr().out
    assert "test_macro_acc_published" in out and "test_macro_acc_new" in out


def test_the_repository_s_tables_equal_what_its_results_files_give():
    assert tables.refresh(write=False) == [], "run `make tables` (python -m biotune.tables write)"
    published = "".join(document.read_text() for document in tables.documents())
    assert [name for name in tables.TABLES if f"<!-- table: {name} -->" not in published] == []


def test_the_committed_study_summaries_are_what_their_rows_give():
    """summary.csv and paired.csv, which the published study tables read, recomputed from rows.csv."""
    from biotune.study import _rows, study_tables

    for folder in sorted((tables.ROOT / "results" / "study").glob("*/")):
        setups = pd.read_csv(folder / "rows.csv", dtype={"setup": str})["setup"]
        tables_now = study_tables(_rows(folder / "rows.csv", setups.iloc[-1]).reset_index(drop=True))
        for name in ("summary", "paired"):
            committed = pd.read_csv(folder / f"{name}.csv")
            pd.testing.assert_frame_equal(committed, tables_now[name].reset_index(drop=True), check_dtype=False,
                                          obj=f"{folder.name}/{name}.csv")
