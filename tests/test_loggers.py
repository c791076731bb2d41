"""Any logger: one folder per run holding its checkpoints and run files, found again by ``--ckpt_path last``."""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lbgen.distributed import run_directory

from .conftest import REPO, run_recipe

RECIPE = REPO / "configs/classifier/fashion_5shot.yaml"
RUN_FILES = ("config.yaml", "splits.json", "test_metrics.json", "confusion_matrix.json", "checkpoints/last.ckpt")


class RunIdLogger(Logger):
    """A logger that keeps its runs as WandbLogger does (wandb is not installed here): ``save_dir`` is shared by all
    runs, ``name`` is the project, ``version`` a random run id unless given, no ``log_dir``; its own records go to
    ``<save_dir>/wandb/run-<id>/``, as W&B's do."""

    def __init__(self, save_dir: str = ".", project: str | None = None, version: str | None = None) -> None:
        super().__init__()
        self._save_dir, self._project = save_dir, project or "lightning_logs"
        self._id = version or uuid.uuid4().hex[:8]

    @property
    def name(self) -> str:
        return self._project

    @property
    def version(self) -> str:
        return self._id

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._write({"hyperparams": True})

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write({"step": step, **metrics})

    def _write(self, record: dict[str, Any]) -> None:
        folder = Path(self._save_dir) / "wandb" / f"run-{self._id}"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "metrics.jsonl").open("a") as out:
            out.write(json.dumps(record) + "\n")


def _fit(paths: dict[str, Path], root: Path, *extra: str):
    # no schedule: OneCycleLR's length is fixed by the first max_steps, and the resumed runs train on to 4 steps
    return run_recipe(RECIPE, paths, "--trainer.max_steps=2", "--model.init_args.scheduler=null",
                      "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={root}", *extra)


def _versions(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("version_"))


def _steps(metrics_csv: Path) -> list[int]:
    with metrics_csv.open() as rows:
        return [int(row["step"]) for row in csv.DictReader(rows) if row.get("step")]


@pytest.mark.slow
def test_tensorboard_writes_into_the_run_folder_and_last_resumes_it(fmnist_fixture, tmp_path):
    paths, root = {"fmnist": fmnist_fixture, "out": tmp_path}, tmp_path / "runs"
    tensorboard = ("--trainer.logger+=TensorBoardLogger", f"--trainer.logger.save_dir={root}")
    for run in range(2):  # every run gets its own folder, with TensorBoard's events beside lbgen's files
        cli = _fit(paths, root, *tensorboard)
        folder = root / f"version_{run}"
        assert _versions(root) == [f"version_{i}" for i in range(run + 1)]
        assert [type(x).__name__ for x in cli.trainer.loggers] == ["CSVLogger", "TensorBoardLogger"]
        assert run_directory(cli.trainer) == folder == Path(cli.trainer.log_dir)
        assert list(folder.glob("events.out.tfevents.*"))  # one per fit / test of the process
        for name in (*RUN_FILES, "metrics.csv"):
            assert (folder / name).is_file(), name
    cli = _fit(paths, root, *tensorboard, "--ckpt_path", "last", "--trainer.max_steps=4", "--test_after_fit=no")
    assert cli.trainer.global_step == 4 and _versions(root) == ["version_0", "version_1"]  # continued the latest
    latest = root / "version_1"
    assert (latest / "config-resumed-1.yaml").is_file()
    assert len(list(latest.glob("events.out.tfevents.*"))) > len(list((root / "version_0").glob("events.out.*")))
    assert {0, 1, 2, 3} <= set(_steps(latest / "metrics.csv"))  # appended to, not started again
    assert 3 not in _steps(root / "version_0" / "metrics.csv")  # the older run untouched


@pytest.mark.slow
def test_a_first_logger_without_log_dir_gets_one_folder_per_run_and_last_finds_it(fmnist_fixture, tmp_path):
    # a W&B-like first logger (the user gave a CSV logger too, so lbgen adds none): Lightning's trainer.log_dir is its
    # save_dir, shared by every run; the run folder is where ModelCheckpoint saves, <save_dir>/<project>/<run id>
    paths, root, shared = {"fmnist": fmnist_fixture, "out": tmp_path}, tmp_path / "runs", tmp_path / "wb"
    loggers = ("--trainer.logger+=tests.test_loggers.RunIdLogger", f"--trainer.logger.save_dir={shared}",
               "--trainer.logger.project=proj", "--trainer.logger+=CSVLogger", f"--trainer.logger.save_dir={root}")
    folders = []
    for _ in range(2):
        cli = _fit(paths, root, *loggers)
        folder = shared / "proj" / cli.trainer.loggers[0].version
        assert run_directory(cli.trainer) == folder and Path(cli.trainer.log_dir) == shared
        for name in RUN_FILES:
            assert (folder / name).is_file(), name
        folders.append(folder)
    assert folders[0] != folders[1] and not (shared / "config.yaml").exists() and not (shared / "splits.json").exists()
    cli = _fit(paths, root, *loggers, "--ckpt_path", "last", "--trainer.max_steps=4", "--test_after_fit=no")
    assert cli.trainer.loggers[0].version == folders[1].name and cli.trainer.global_step == 4
    assert (folders[1] / "config-resumed-1.yaml").is_file() and sorted((shared / "proj").iterdir()) == sorted(folders)
    assert (shared / "wandb" / f"run-{folders[1].name}" / "metrics.jsonl").is_file()  # the same run id logged on


def test_another_logger_alone_logs_beside_lbgens_csv_run_folder(fmnist_fixture, tmp_path):
    paths, root = {"fmnist": fmnist_fixture, "out": tmp_path}, tmp_path / "runs"
    cli = _fit(paths, root, "--trainer.logger=tests.test_loggers.RunIdLogger", f"--trainer.logger.save_dir={root}",
               "--test_after_fit=no")
    assert [type(x).__name__ for x in cli.trainer.loggers] == ["CSVLogger", "RunIdLogger"]
    assert run_directory(cli.trainer) == root / "version_0" and (root / "version_0/checkpoints/last.ckpt").is_file()
    assert (root / "wandb" / f"run-{cli.trainer.loggers[1].version}" / "metrics.jsonl").is_file()


def test_run_directory_is_where_model_checkpoint_saves(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger, expected in ((RunIdLogger(str(tmp_path), "p", "abc"), tmp_path / "p" / "abc"),
                             (TensorBoardLogger(tmp_path, name="tb"), tmp_path / "tb" / "version_0"),
                             (False, tmp_path)):
        checkpoint = ModelCheckpoint()
        trainer = L.Trainer(default_root_dir=tmp_path, logger=logger, callbacks=[checkpoint], max_steps=1,
                            limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(BoringModel())
        assert run_directory(trainer) == expected
        assert Path(checkpoint.dirpath) == expected / "checkpoints"
