"""Tables from the run store: variant names from configs, the paper's numbers beside matching rows;
figures that name and colour each variant the same way everywhere."""
import matplotlib
import pandas as pd
import pytest
from matplotlib.collections import PathCollection

from biotune import config as cfg
from biotune import plots
from biotune.report import BASELINE_NAMES, SEARCHER_NAMES, mean_std, variant, with_paper

matplotlib.use("Agg")


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
                          "variant": ["BioTune", "L1-SP", "BioTune", "full fine-tuning"]})
    merged = with_paper(table)
    assert merged["paper_test_macro_acc"].tolist()[:2] == [91.68, 87.82]
    assert merged["paper_test_macro_acc"].iloc[2:].isna().all()


def test_mean_std_in_percent():
    assert mean_std(0.85123, 0.004) == "85.12±0.40"
    assert mean_std(0.9, float("nan")) == "90.00±0.00"
    assert mean_std(float("nan"), 0.1) == "n/a"


def test_a_searcher_or_baseline_keeps_its_colour_whatever_else_a_figure_shows():
    known = [*SEARCHER_NAMES.values(), *BASELINE_NAMES.values()]
    alone = plots._colours(["LoRA"])
    beside_ablations = plots._colours(["BioTune (N=4, T=3)", "LoRA", "BioTune"])
    assert alone["LoRA"] == beside_ablations["LoRA"]
    assert len({alone[name] for name in known}) == len(known)
    assert beside_ablations["BioTune (N=4, T=3)"] not in {alone[name] for name in known}


def test_accuracy_vs_share_colours_a_variant_alike_on_every_panel_with_one_legend_outside():
    table = pd.DataFrame({"dataset": ["a", "a", "b", "b"], "model": ["m"] * 4,
                          "variant": ["LoRA", "BioTune", "BioTune", "TPE"],
                          "trainable_share": [0.1, 0.3, 0.4, 0.2], "test_macro_acc": [0.8, 0.9, 0.7, 0.75],
                          "test_macro_acc_std": [None] * 4})
    fig = plots.accuracy_vs_share(table)
    expected = plots._colours(table["variant"])
    for ax, dataset in zip(fig.axes, ["a", "b"]):
        points, = [c for c in ax.collections if isinstance(c, PathCollection)]
        variants = table.loc[table["dataset"] == dataset, "variant"]
        assert [tuple(rgba[:3]) for rgba in points.get_facecolors()] == [expected[v] for v in variants]
    assert fig.axes[0].get_legend() is None
    legend = fig.axes[1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["LoRA", "BioTune", "TPE"]
    assert legend.get_bbox_to_anchor().x0 > fig.axes[1].get_window_extent().x1  # right of the panel


def test_every_searcher_and_registered_method_has_a_title_in_the_figures_order():
    from biotune.methods import list_methods
    from biotune.report import _titled

    assert set(SEARCHER_NAMES) == set(cfg.CHOICES["ga.searcher"]) and set(BASELINE_NAMES) == set(list_methods())
    untitled = [name for name, title in {**SEARCHER_NAMES, **BASELINE_NAMES}.items() if title == name]
    assert not untitled, f"give these a title in biotune/report.py: {untitled}"
    assert list(BASELINE_NAMES)[:3] == ["full", "linear_probe", "lp_ft"]  # the colours figures hand out
    assert _titled(["b", "new", "a"], {"a": "A", "b": "B", "gone": "G"}) == {"a": "A", "b": "B", "new": "new"}


def test_every_named_biotune_variant_has_a_title():
    from biotune.batch import BIOTUNE_VARIANTS
    from biotune.report import VARIANT_TITLES

    assert set(VARIANT_TITLES) == set(BIOTUNE_VARIANTS), "titles in biotune/report.py, switches in biotune/batch.py"
