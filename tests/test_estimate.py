"""The GPU-hours estimate of a plan (biotune/estimate.py), checked against numbers computed by hand."""
import json
from pathlib import Path

import pytest

from biotune import config as cfg
from biotune.cli import main
from biotune.estimate import (
    THROUGHPUT,
    forward_flops,
    plan_costs,
    row_cost,
    split_sizes,
    summary,
    units_per_second,
    wall_hours,
)

REPO = Path(__file__).resolve().parents[1]
# ResNet-50 with bf16 measured 2440 training images/s on evaluations of 24000-image folds
# validated on 6000 images each epoch; an evaluated image costs a third of a trained one
RESNET50_UNITS = 2440 * (1 + 6000 / 24000 / 3)


@pytest.fixture()
def tiny_plan(tmp_path) -> Path:
    """Two datasets, ResNet-50, a search of 5 evaluations (N=2, T=1, E=1) and LP-FT, one seed, 2 to 3 epochs."""
    overrides = {"ga.population": 2, "ga.generations": 1, "ga.elites": 1, "train.seeds": [0],
                 "train.max_epochs": 3, "train.patience": 1}
    plan = {"name": "tiny", "parameters": {"preset": "paper"}, "runs": [
        {"notebook": str(REPO / "notebooks" / "01_main_experiments.ipynb"),
         "parameters": {"datasets": ["flowers102", "usps"], "models": ["resnet50"], "methods": ["biotune", "lp_ft"],
                        "overrides": overrides}},
        {"notebook": str(REPO / "notebooks" / "03_figures.ipynb")}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(plan))  # JSON is YAML
    return path


def test_split_sizes_carve_as_the_data_module_does():
    paper = cfg.resolve("paper").data
    sizes = {name: split_sizes(cfg.DataConfig(dataset=name)) for name in ("usps", "isic2020", "flowers102")}
    assert sizes == {"usps": (5833, 1458, 2007), "isic2020": (21201, 5300, 6625), "flowers102": (1020, 1020, 6149)}
    assert split_sizes(paper) == (48000, 12000, 10000)  # Fashion-MNIST, the benchmark's: folds of 24000 / 6000
    assert split_sizes(cfg.resolve("demo").data) == (1000, 400, 1000)
    with pytest.raises(ValueError, match="no size for dataset 'digits'"):
        split_sizes(cfg.DataConfig(dataset="digits"))


def test_a_small_plan_by_hand(tiny_plan):
    costs = plan_costs(tiny_plan).set_index(["dataset", "method"])
    assert len(costs) == 4 and set(costs["notebook"]) == {"01_main_experiments"}  # 03_figures trains nothing
    flowers_search = costs.loc[("flowers102", "biotune")]
    # 5 evaluations on 510-image folds (validated on 510), then the pick retrained on 1020 and tested on 6149;
    # 2 epochs (patience 1 + 1) or 3 (max_epochs)
    assert flowers_search["train_images_low"] == 5 * 2 * 510 + 2 * 1020
    assert flowers_search["train_images_high"] == 5 * 3 * 510 + 3 * 1020
    assert flowers_search["eval_images_high"] == 5 * 3 * 510 + 3 * 1020 + 6149
    expected_hours = (5 * 3 * 510 + 3 * 1020 + (5 * 3 * 510 + 3 * 1020 + 6149) / 3) / RESNET50_UNITS / 3600
    assert flowers_search["gpu_hours_high"] == pytest.approx(expected_hours)
    assert flowers_search["throughput"] == "measured (bf16)"
    flowers_lp_ft = costs.loc[("flowers102", "lp_ft")]  # two runs (probe, then fine-tuning), tested once
    assert flowers_lp_ft["train_images_high"] == 2 * 3 * 1020
    assert flowers_lp_ft["eval_images_high"] == 2 * 3 * 1020 + 6149
    usps_search = costs.loc[("usps", "biotune")]  # 5833 / 1458 after the carve, folds of half
    assert usps_search["train_images_high"] == 5 * 3 * 5833 / 2 + 3 * 5833
    assert usps_search["eval_images_low"] == 5 * 2 * 1458 / 2 + 2 * 1458 + 2007

    table = summary(costs.reset_index(), [1, 2])
    assert table["notebook"].tolist() == ["01_main_experiments", "total"]
    assert table.loc[0, "gpu_hours_high"] == pytest.approx(costs["gpu_hours_high"].sum())
    assert table.loc[0, "wall_hours_high_1"] == pytest.approx(table.loc[0, "gpu_hours_high"])
    assert table.loc[0, "wall_hours_high_2"] == pytest.approx(wall_hours(costs["gpu_hours_high"].tolist(), 2))


def test_a_row_run_before_is_reused_and_a_biotune_variant_is_a_search(tiny_plan):
    plan = json.loads(tiny_plan.read_text())
    plan["runs"].insert(1, {**plan["runs"][0], "name": "again"})
    tiny_plan.write_text(json.dumps(plan))
    costs = plan_costs(tiny_plan)
    again = costs[costs["notebook"] == "again"]
    assert len(again) == 4 and again["reused"].all() and (again["gpu_hours_high"] == 0).all()
    assert summary(costs, [1])["reused"].tolist() == [0, 4, 4]
    overrides = plan["runs"][0]["parameters"]["overrides"]
    robust = row_cost({"method": "biotune_robust", "dataset": "flowers102", "model": "resnet50", "preset": "paper",
                       "overrides": overrides})
    # re-scoring adds its 3 candidates on each of 2 folds: 11 evaluations, scored on the whole 1020-image validation
    assert robust["train_images_high"] == 11 * 3 * 510 + 3 * 1020
    assert robust["eval_images_high"] == 11 * 3 * 1020 + 3 * 1020 + 6149


def test_wall_hours_give_the_next_row_to_the_first_free_gpu():
    assert wall_hours([1, 2, 3, 2], 1) == 8
    assert wall_hours([1, 2, 3, 2], 2) == 4  # 3 + 1 and 2 + 2
    assert wall_hours([1, 2, 3, 2], 8) == 3  # the longest row


def test_unmeasured_models_scale_resnet50_by_forward_flops():
    (resnet, _), _ = units_per_second("resnet50", 224, amp=True)
    (vgg, _), source = units_per_second("vgg19", 224, amp=True)
    assert resnet == pytest.approx(RESNET50_UNITS)
    assert vgg == pytest.approx(resnet * forward_flops("resnet50", 224) / forward_flops("vgg19", 224))
    assert vgg < resnet / 4 and source.startswith("estimate: resnet50 (bf16)")
    (lite, _), source = units_per_second("tf_efficientnet_lite0", 224, amp=False)
    assert source == "measured (fp32)" and lite == pytest.approx(1520 * (1 + 6000 / 24000 / 3))


def test_the_measurements_are_those_of_docs_performance():
    reference = json.loads(THROUGHPUT.read_text())
    text = (REPO / "docs" / "performance.md").read_text()
    assert reference["command"] in text and f"torch {reference['torch']}" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "images/s" not in line]
    for row in reference["rows"]:
        low, high = row["images_per_s"]
        shown = f"{low}-{high}" if low != high else f"{low}"
        precision = "bf16 autocast" if row["precision"] == "bf16" else "fp32"
        assert any(row["model"] in line and f"| {precision} |" in line and f"| {shown} |" in line for line in table), row


def test_the_cost_command_prints_the_table(tiny_plan, capsys):
    assert main(["notebooks", "cost", str(tiny_plan), "--gpus", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "wall hours, 2 GPUs" in out and "total" in out and "resnet50: measured (bf16) (4 rows)" in out
    assert main(["notebooks", "cost", str(tiny_plan), "--gpus", "0"]) == 2
    assert "--gpus takes numbers of GPUs >= 1" in capsys.readouterr().err
