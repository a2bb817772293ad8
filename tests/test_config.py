import pytest

from biotune import config as cfg


def test_merge_order_defaults_preset_file_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ga:\n  population: 9\n  elites: 2\ntrain:\n  base_lr: 0.01\n")
    config = cfg.resolve("cpu", path, ["ga.population=12", "train.seeds=[1, 2]"])
    assert config.ga.population == 12  # override beats file
    assert config.ga.elites == 2  # file beats preset
    assert config.train.base_lr == 0.01
    assert config.train.seeds == [1, 2]
    assert config.data.image_size == cfg.PRESETS["cpu"]["data"]["image_size"]  # preset beats default
    assert config.train.patience == cfg.PRESETS["cpu"]["train"]["patience"]


def test_paper_preset_is_the_papers_recipe():
    config = cfg.resolve("paper")
    assert (config.ga.population, config.ga.generations, config.ga.elites, config.ga.train_split) == (10, 10, 3, 0.5)
    assert config.train.seeds == [684, 559, 629]
    assert (config.train.base_lr, config.train.max_epochs, config.train.patience) == (1e-3, 30, 3)
    assert (config.train.batch_size, config.train.eval_batch_size, config.train.cosine_t_max) == (96, 64, 100)


@pytest.mark.parametrize("override, message", [
    (["ga.populaton=8"], "unknown config key ga.populaton; valid keys of \\[ga\\]"),
    (["gaa.population=8"], "unknown config section or key 'gaa'"),
    (["ga.elites=10"], "ga.elites must be .* smaller than ga.population"),
    (["ga.fitness=accuracy"], "choose one of: acc, acc\\+std, loss"),
    (["ga.train_split=0"], "train_split must be in \\(0, 1\\]"),
    (["train.seeds=[]"], "non-empty list of integers"),
    (["population"], "section.key=value"),
])
def test_bad_config_fails_early_with_a_useful_message(override, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.resolve("smoke", overrides=override)


def test_unknown_preset_and_missing_file():
    with pytest.raises(cfg.ConfigError, match="choose one of: paper, cpu"):
        cfg.resolve("gpu")
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.resolve("cpu", "/nonexistent.yaml")


def test_round_trip_through_dict():
    config = cfg.resolve("cpu", overrides={"ga.population": 7})
    assert cfg.from_dict(config.to_dict()) == config


def test_num_folds():
    assert [cfg.num_folds(s) for s in (1, 0.5, 0.34, 0.25, 0.3)] == [1, 2, 3, 4, 4]
