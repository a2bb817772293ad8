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
