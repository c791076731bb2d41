"""The `lbgen` command and every recipe in configs/, driven through the same LightningCLI a user runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lbgen.cli import cli_main

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def tiny_overrides(config: dict, fixture: Path, run_dir: Path) -> list[str]:
    """Command-line overrides that make a recipe run in seconds on the fixture data and a tiny backbone."""
    args = ["--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.default_root_dir={run_dir}"]
    data = config.get("data", {}).get("init_args", {})
    if config.get("data", {}).get("class_path", "").endswith("FashionMNISTDataModule"):
        args.append(f"--data.init_args.root={fixture}")
    shrink = {"val_per_class": 2, "max_per_class": 20, "batch_size": 8, "eval_batch_size": 16, "num_workers": 0,
              "samples_per_epoch": 16}
    args += [f"--data.init_args.{k}={v}" for k, v in shrink.items() if k in data]
    if "shots" in data and data["shots"]:
        args.append(f"--data.init_args.shots={min(data['shots'], 5)}")
    backbone = config.get("model", {}).get("init_args", {}).get("backbone", {})
    if backbone.get("class_path", "").endswith("TimmBackbone"):
        args.append("--model.init_args.backbone.init_args.model_name=test_resnet")
    return args


def test_every_config_is_covered():
    assert {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS} >= {
        "classifier/fashion_5shot.yaml", "classifier/fashion_full.yaml", "classifier/fashion_lt100.yaml"}


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_config_parses_and_runs_fast_dev_run(config_path, fmnist_fixture, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    args = ["fit", "-c", str(config_path), *tiny_overrides(config, fmnist_fixture, tmp_path),
            "--trainer.fast_dev_run=true"]
    cli = cli_main(args)
    assert cli.trainer.state.finished
    assert cli.model.num_classes == cli.datamodule.num_classes  # linked from the data
    assert cli.model.class_names == cli.datamodule.class_names


def test_fit_then_test_writes_a_complete_run_directory(fmnist_fixture, tmp_path):
    config = REPO / "configs/classifier/fashion_5shot.yaml"
    overrides = tiny_overrides(yaml.safe_load(config.read_text()), fmnist_fixture, tmp_path)
    cli_main(["fit", "-c", str(config), *overrides, "--trainer.max_steps=4", "--trainer.check_val_every_n_epoch=1"])
    run = tmp_path / "version_0"
    for name in ("config.yaml", "splits.json", "metrics.csv", "test_metrics.json", "confusion_matrix.json"):
        assert (run / name).is_file(), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["init_args"]["root"] == str(fmnist_fixture)  # the resolved config, overrides included
    assert json.loads((run / "splits.json").read_text())["train_class_counts"] == [5] * 10
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    metrics = json.loads((run / "test_metrics.json").read_text())
    # a later `lbgen test` of the checkpoint gets a run directory of its own and the same accuracy
    cli_main(["test", "-c", str(config), *overrides, f"--ckpt_path={checkpoint}"])
    retest = json.loads((tmp_path / "version_1" / "test_metrics.json").read_text())
    assert retest["acc"] == pytest.approx(metrics["acc"])


def _lbgen(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lbgen")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_console_script_help_and_errors():
    done = _lbgen("--help")
    assert done.returncode == 0
    for stage in ("fit", "validate", "test", "predict"):
        assert f"\n  {stage} " in done.stdout
    bad = _lbgen("fit", "-c", str(REPO / "configs/classifier/fashion_5shot.yaml"), "--data.init_args.shotz=5")
    assert bad.returncode != 0 and "shotz" in bad.stderr
