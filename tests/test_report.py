"""Tables from the run store: variant names from configs, the paper's numbers beside matching rows."""
import pandas as pd
import pytest

from biotune import config as cfg
from biotune.report import mean_std, variant, with_paper


def config(preset="cpu", **ga):
    return cfg.resolve(preset, overrides={f"ga.{k}": v for k, v in ga.items()}).to_dict()


@pytest.mark.parametrize("ga, name", [
    ({}, "BioTune"),
    ({"encoding": "no_lr_genes"}, "BioTune (no LR genes)"),
    ({"encoding": "no_freezing", "ga_variant": "reference"}, "BioTune (no freezing, reference GA)"),
    ({"population": 10}, "BioTune (N=10, T=4)"),
    ({"population": 20, "generations": 0}, "BioTune (N=20, T=0)"),
    ({"searcher": "cmaes"}, "CMA-ES"),
])
def test_variant_names_what_a_search_changes_against_its_preset(ga, name):
    assert variant(config(**ga)) == name


def test_the_paper_number_sits_beside_matching_rows_only():
    table = pd.DataFrame({"dataset": ["flowers102", "flowers102", "flowers102", "digits"],
                          "model": ["resnet50", "resnet50", "tf_efficientnet_lite0", "resnet50"],
                          "preset": ["paper", "paper", "paper", "paper"],
                          "variant": ["BioTune", "l1_sp", "BioTune", "full"]})
    merged = with_paper(table)
    assert merged["paper_test_macro_acc"].tolist()[:2] == [91.68, 87.82]
    assert merged["paper_test_macro_acc"].iloc[2:].isna().all()


def test_mean_std_in_percent():
    assert mean_std(0.85123, 0.004) == "85.12±0.40"
    assert mean_std(0.9, float("nan")) == "90.00±0.00"
    assert mean_std(float("nan"), 0.1) == "n/a"
