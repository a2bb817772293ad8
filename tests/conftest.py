import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smoke_config(tmp_path_factory):
    """The smoke preset (synthetic data, tiny CNN, 1 epoch), writing only under a temporary folder."""
    from biotune import config as cfg

    root = tmp_path_factory.mktemp("smoke")
    return cfg.resolve("smoke", overrides={"data.root": str(root / "data"), "results_dir": str(root / "results")})


@pytest.fixture(scope="session")
def smoke_inputs(smoke_config):
    """(model, dataset) of the smoke preset, built once per session."""
    from biotune.experiment import load_inputs

    return load_inputs(smoke_config)


@pytest.fixture()
def interrupted_search(monkeypatch, tmp_path):
    """``interrupted_search(overrides, after_runs)``: a smoke search stopped by Ctrl-C when its
    training run number ``after_runs + 1`` starts; returns (store path, run id) for a resume."""
    import biotune
    from biotune import fitness
    from biotune.store import RunStore

    def run(overrides: dict, after_runs: int):
        trainings, real_train = [], fitness.train

        def train_then_interrupt(*args, **kwargs):
            trainings.append(1)
            if len(trainings) > after_runs:
                raise KeyboardInterrupt
            return real_train(*args, **kwargs)

        monkeypatch.setattr(fitness, "train", train_then_interrupt)
        store_path = tmp_path / "interrupted.sqlite"
        with pytest.raises(KeyboardInterrupt):
            biotune.search(preset="smoke", store=store_path, overrides=overrides, progress=False)
        monkeypatch.setattr(fitness, "train", real_train)
        with RunStore(store_path) as store:
            return store_path, store.runs()["run_id"].iloc[0]

    return run
