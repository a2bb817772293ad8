import math

import pytest

from biotune.genome import FineTunePlan, decode, encode, multiplier, num_genes

BLOCKS = ["stem", "stage1", "stage2", "head"]


def test_multiplier_formula_matches_the_paper_and_not_the_released_readme():
    assert multiplier(0.85) == pytest.approx(5.0119, abs=1e-4)  # README claimed 9.49
    assert multiplier(0.0) == pytest.approx(0.1)
    assert multiplier(0.5) == pytest.approx(1.0)
    assert multiplier(1.0) == pytest.approx(10.0)


def test_threshold_rule_trains_only_genes_strictly_above_threshold():
    plan = decode([0.2, 0.6, 0.5, 0.9, 0.5], BLOCKS)
    assert plan.trained == ["stage1", "head"]  # 0.5 == threshold is frozen
    assert plan.frozen == ["stem", "stage2"]
    assert plan.multipliers["stage1"] == pytest.approx(10 ** 0.2)
    assert plan.trained_mask() == [0, 1, 0, 1]


def test_no_lr_genes_trains_the_same_blocks_at_multiplier_one():
    genes = [0.2, 0.6, 0.5, 0.9, 0.5]
    plan = decode(genes, BLOCKS, "no_lr_genes")
    assert plan.trained == decode(genes, BLOCKS).trained
    assert set(plan.multipliers.values()) == {1.0}


def test_no_freezing_has_no_threshold_and_trains_every_block():
    assert num_genes(4, "no_freezing") == 4 and num_genes(4, "full") == 5
    plan = decode([0.0, 0.25, 0.75, 1.0], BLOCKS, "no_freezing")
    assert plan.trained == BLOCKS
    assert [round(m, 4) for m in plan.multipliers.values()] == [0.1, 0.3162, 3.1623, 10.0]


def test_genome_with_no_trained_block_decodes_to_an_empty_plan():
    plan = decode([0.1, 0.2, 0.3, 0.4, 0.9], BLOCKS)
    assert plan.is_empty and plan.frozen == BLOCKS


@pytest.mark.parametrize("encoding", ["full", "no_lr_genes", "no_freezing"])
def test_encode_decode_round_trip(encoding):
    multipliers = {"stem": 0.5, "stage1": 1.0, "stage2": 7.5, "head": 2.0}
    if encoding != "no_freezing":
        del multipliers["stage2"]
    if encoding == "no_lr_genes":
        multipliers = {b: 1.0 for b in multipliers}
    plan = FineTunePlan(multipliers=multipliers, block_names=tuple(BLOCKS))
    back = decode(encode(plan, encoding), BLOCKS, encoding)
    assert back.trained == plan.trained
    for block in plan.trained:
        assert math.isclose(back.multipliers[block], plan.multipliers[block], rel_tol=1e-9)


def test_wrong_genome_length_names_the_expected_length():
    with pytest.raises(ValueError, match="has 3 genes .* needs 5"):
        decode([0.1, 0.2, 0.3], BLOCKS)


def test_unknown_encoding_lists_the_choices():
    with pytest.raises(ValueError, match="no_lr_genes"):
        num_genes(4, "no_lr")


def test_head_trained_keeps_the_head_whatever_its_gene_and_rates_it_by_its_gene():
    genes = [0.2, 0.6, 0.5, 0.1, 0.5]  # head gene 0.1 below the threshold: frozen in the paper's encoding
    assert decode(genes, BLOCKS).trained == ["stage1"]
    plan = decode(genes, BLOCKS, "head_trained")
    assert plan.trained == ["stage1", "head"] and plan.multipliers["head"] == pytest.approx(multiplier(0.1))
    assert decode([0.0] * 5, BLOCKS, "head_trained").trained == ["head"]  # never an empty plan


def test_freeze_bits_decide_training_apart_from_the_rate():
    # rate genes for 4 blocks, then freeze genes for the 3 blocks before the head
    genes = [0.05, 0.9, 0.3, 0.2, 0.7, 0.4, 0.51]
    assert num_genes(4, "freeze_bits") == 7
    plan = decode(genes, BLOCKS, "freeze_bits")
    assert plan.trained == ["stem", "stage2", "head"]
    assert plan.multipliers["stem"] == pytest.approx(multiplier(0.05))  # below every other gene, still trained
    with pytest.raises(ValueError, match="needs 7 .*freeze gene"):
        decode(genes[:-1], BLOCKS, "freeze_bits")


@pytest.mark.parametrize("encoding", ["head_trained", "freeze_bits"])
def test_the_new_encodings_encode_and_refuse_a_frozen_head(encoding):
    plan = FineTunePlan({"stage1": 2.0, "head": 0.5}, tuple(BLOCKS))
    again = decode(encode(plan, encoding), BLOCKS, encoding)
    assert again.trained == plan.trained
    assert again.multipliers == pytest.approx(plan.multipliers)
    with pytest.raises(ValueError, match="trains the head"):
        encode(FineTunePlan({"stage1": 2.0}, tuple(BLOCKS)), encoding)
