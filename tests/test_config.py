import re

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
    (["ga.fitness=accuracy"], "ga.fitness='accuracy': choose one of: acc, acc\\+std, loss"),
    (["ga.train_split=0"], "ga.train_split=0: expected greater than 0"),
    (["train.seeds=[]"], "train.seeds=\\[\\]: expected at least 1 value"),
    (["population"], "section.key=value"),
    # every field is checked against its type and bounds before anything runs
    (["ga.population=ten"], "ga.population='ten': expected a valid integer"),
    (["ga.population=3.5"], "ga.population=3.5: expected a valid integer"),
    (["train.batch_size=big"], "train.batch_size='big': expected a valid integer"),
    (["train.cosine_t_max=0"], "train.cosine_t_max=0: expected greater than or equal to 1"),
    (["train.device=tpu"], "train.device='tpu': expected auto, cpu, mps, cuda or cuda:N"),
    (["ga.momentum=flase"], "ga.momentum='flase': expected a valid boolean"),
    (["train.min_delta=-5"], "train.min_delta=-5: expected greater than or equal to 0"),
    (["ga.seed=abc"], "ga.seed='abc': expected a valid integer"),
    (["data.split_seed=-1"], "data.split_seed=-1: expected greater than or equal to 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1: expected greater than or equal to 0"),
    (["train.seeds=[1, x]"], "train.seeds.1='x': expected a valid integer"),
    (["model.weights=5"], "model.weights=5: expected a valid string"),
    (["ga.final_selection=best"], "choose one of: best_so_far, rescore_top_k"),
    (["train.seeds=[1,"], "override train.seeds: invalid YAML at line 1"),
])
def test_bad_config_fails_early_with_a_useful_message(override, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.resolve("smoke", overrides=override)


def test_yaml_1_2_floats_and_checked_values_are_typed():
    config = cfg.resolve("smoke", overrides=["train.base_lr=1e-4", "ga.momentum=true", "train.weight_decay=0"])
    assert config.train.base_lr == 1e-4 and config.ga.momentum is True
    assert isinstance(config.train.weight_decay, float)


def test_a_dataset_named_later_does_not_inherit_the_presets_dataset_options(tmp_path):
    assert cfg.resolve("smoke").data.options  # the synthetic dataset's sizes
    assert cfg.resolve("smoke", overrides=["data.dataset=digits"]).data.options == {}
    kept = cfg.resolve("smoke", overrides={"data.dataset": "npz", "data.options": {"path": "x.npz"}})
    assert kept.data.options == {"path": "x.npz"}
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dataset: digits\n")
    assert cfg.resolve("smoke", path).data.options == {}


def test_invalid_yaml_file_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ga:\n  population: 8\n  elites: [1,\n")
    with pytest.raises(cfg.ConfigError, match=f"{path}: invalid YAML at line 4"):
        cfg.resolve("cpu", path)


def test_results_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(cfg.ConfigError, match="is a file"):
        cfg.resolve("smoke", overrides={"results_dir": str(tmp_path / "file")})


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


def test_amp_follows_the_model_unless_forced_and_stored_bools_still_load():
    assert cfg.resolve("paper").train.amp == "auto" and cfg.resolve("paper").train.cudnn_benchmark is True
    assert cfg.resolve("smoke", overrides=["train.amp=false"]).train.amp is False
    with pytest.raises(cfg.ConfigError, match="train.amp='bf16': choose one of: auto, True, False"):
        cfg.resolve("smoke", overrides=["train.amp=bf16"])
    stored = cfg.resolve("cpu").to_dict()  # a run stored before "auto": amp was a bool
    stored["train"]["amp"] = True
    assert cfg.from_dict(stored).train.amp is True


# -- the executor's settings, once the section `run` (issue 22): old spellings still read ------------

PROCESS_X2 = {"kind": "process", "workers": 2}


def old_spelling_warnings(record) -> list[str]:
    return [str(warning.message) for warning in record if issubclass(warning.category, FutureWarning)]


@pytest.mark.parametrize("overrides", [{"run.executor": "process", "run.workers": 2},  # dotted keys
                                       {"run": {"executor": "process", "workers": 2}},  # a Python dict
                                       ["run.executor=process", "run.workers=2"]])  # as the CLI passes --run.*
def test_old_run_keys_still_set_the_executor_and_warn_with_the_new_name(overrides):
    with pytest.warns(FutureWarning) as record:
        config = cfg.resolve("smoke", overrides=overrides)
    assert (config.executor.kind, config.executor.workers) == ("process", 2)
    assert old_spelling_warnings(record) == [
        "override: config key run.executor is deprecated; use executor.kind",
        "override: config key run.workers is deprecated; use executor.workers"]
    assert config == cfg.resolve("smoke", overrides={"executor.kind": "process", "executor.workers": 2})


def test_a_yaml_file_with_a_run_section_still_sets_the_executor_and_warns(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("run:\n  executor: process\n  workers: 2\n  runs_per_gpu: 1\n")
    with pytest.warns(FutureWarning) as record:
        config = cfg.resolve("smoke", path)
    assert (config.executor.kind, config.executor.workers) == ("process", 2)
    assert old_spelling_warnings(record) == [f"{path}: config key run.{old} is deprecated; use executor.{new}" for old, new
                                             in [("executor", "kind"), ("workers", "workers"), ("runs_per_gpu", "runs_per_gpu")]]
    path.write_text("run: {}\n")
    with pytest.warns(FutureWarning, match="config section run is deprecated; use executor"):
        assert cfg.resolve("smoke", path) == cfg.resolve("smoke")


def test_the_new_spelling_warns_nothing_and_a_stored_run_section_loads_silently(recwarn):
    new = cfg.resolve("cpu", overrides={"executor.kind": "process", "executor.workers": 2})
    stored = new.to_dict()
    assert stored["executor"] == {**stored["executor"], **PROCESS_X2} and "run" not in stored
    stored["run"] = {"executor": stored["executor"].pop("kind"), **stored.pop("executor")}  # as stores before it
    assert cfg.from_dict(stored) == new
    assert cfg.from_dict(new.to_dict()) == new
    assert old_spelling_warnings(recwarn) == []


def test_unknown_executor_keys_are_refused_with_the_valid_keys():
    valid = "valid keys of [executor]: gpus, gpus_per_run, kind, require_gpu, runs_per_gpu, workers"
    with pytest.raises(cfg.ConfigError, match=rf"unknown config key executor.worker; {re.escape(valid)}"):
        cfg.resolve("smoke", overrides={"executor.worker": 2})
    with pytest.raises(cfg.ConfigError, match="unknown config key executor.executor; valid keys of"):
        cfg.resolve("smoke", overrides={"executor.executor": "process"})  # the old name of kind, under the new section
    with pytest.warns(FutureWarning), pytest.raises(cfg.ConfigError, match="unknown config key executor.worker;"):
        cfg.resolve("smoke", overrides={"run.worker": 2})  # a typo under the old name: named as it is read
    with pytest.raises(cfg.ConfigError, match=r"\[run\] \(now \[executor\]\) must be a mapping"):
        cfg.resolve("smoke", overrides={"run": 2})


def test_a_setting_given_under_both_names_takes_the_new_spelling():
    # what callers do that append executor.* to a user's run.* (bench parallel, run_many's --gpus)
    with pytest.warns(FutureWarning, match="run.executor is deprecated; use executor.kind"):
        config = cfg.resolve("smoke", overrides={"run.executor": "process", "executor.kind": "serial"})
    assert config.executor.kind == "serial"
    with pytest.warns(FutureWarning):  # different keys in one layer: both apply
        config = cfg.resolve("smoke", overrides={"run.executor": "process", "executor.workers": 2})
    assert (config.executor.kind, config.executor.workers) == ("process", 2)


def test_the_choices_and_the_paper_preset_use_the_new_names():
    assert cfg.CHOICES["executor.kind"] == ("serial", "process", "ray") and "run.executor" not in cfg.CHOICES
    assert cfg.PRESETS["paper"] == {"executor": {"require_gpu": True}}
    assert cfg.resolve("paper").executor.require_gpu
