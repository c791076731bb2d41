"""The stage verbs of ``lbgen``: fit, validate, test, predict (LightningCLI over the systems) and export."""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import re
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Literal

import lightning as L
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from lbgen.distributed import run_directory

DESCRIPTION = """\
lbgen: turn text-to-image diffusion models into training data for image classifiers, and measure what it buys.

Stages (each reads a YAML recipe from configs/, e.g. `lbgen fit -c configs/classifier/fashion_5shot.yaml`):
  fit       train a system: a classifier on real (+ synthetic) data; tests it afterwards (--test_after_fit)
  validate  evaluate a trained system on the validation hold-out
  test      evaluate a classifier on the untouched test set; writes test_metrics.json and confusion_matrix.json
  predict   run a system's predict step: generate a synthetic dataset (configs/generate/), or class
            probabilities of a classifier
  export    `lbgen export DATASET_DIR OUT_DIR`: copy a generated dataset to plain PNG folders + metadata.jsonl
  experiment `lbgen experiment FILE --workdir DIR [--jobs N] [--executor local|slurm|submitit-local]`: run an
            experiment's stages (cached; independent ones at once with --jobs), then write report.md
  summary   `lbgen summary NAME=RUN_ROOT ...`: mean top-1 with its 95% interval over the tested runs of each root
  shard-folder `lbgen shard-folder IMAGE_DIR OUT_DIR [--processes N]`: a real ImageFolder as WebDataset shards
            (read like a generated set; resumable)
  imagefolder-from-labels `lbgen imagefolder-from-labels FLAT_DIR LABELS_FILE OUT_DIR`: a flat image folder + labels
            (ImageNet's val + LOC_val_solution.csv) as an ImageFolder, by hard links
A bad input stops with one message (exit code 1); LBGEN_DEBUG=1 shows where it was raised.
Outputs go to <trainer.default_root_dir>/version_N/ (config, metrics.csv, splits.json, checkpoints/);
the default root is ./runs. Other loggers log beside lbgen's CSV logger, e.g. TensorBoard into the same folder:
`--trainer.logger+=TensorBoardLogger --trainer.logger.save_dir runs` (save_dir = the default_root_dir).
`--ckpt_path last` continues the latest version_N.
"""


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the stage list in ``lbgen --help``."""


def _logger_class(entry: object) -> type:
    """The class of a logger entry of the config (a ``class_path`` Namespace, or an instance given in Python)."""
    if isinstance(entry, Namespace) and "class_path" in entry:
        module, _, name = str(entry.class_path).rpartition(".")
        return getattr(importlib.import_module(module), name)
    return type(entry)


def _is_file_logger(entry: object) -> bool:
    """Whether a logger entry is a CSV or TensorBoard logger given by class_path (its folder is ``version_N``)."""
    cls = _logger_class(entry)
    return isinstance(entry, Namespace) and issubclass(cls, (CSVLogger, TensorBoardLogger))


def _version_number(folder_name: str) -> int | None:
    """N of a ``version_N`` folder, None for another name (a W&B run id)."""
    number = folder_name.removeprefix("version_")
    return int(number) if folder_name.startswith("version_") and number.isdigit() else None


def _next_version(parent: Path) -> int:
    """The version the CSV and TensorBoard loggers would pick under ``parent``: one above the largest version_N."""
    found = [_version_number(p.name) for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    return max((n for n in found if n is not None), default=-1) + 1


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config into the run folder (``lbgen.distributed.run_directory``), beside the checkpoints.

    Lightning's callback writes to ``trainer.log_dir``, which for a first logger other than CSV or TensorBoard (W&B)
    is that logger's ``save_dir``: one folder shared by every run, where a second run would refuse to start.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        run_dir = run_directory(trainer)  # a collective: every process asks
        assert run_dir is not None  # a Trainer always has one
        path = run_dir / self.config_filename
        exists = trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False)
        if exists and not self.overwrite:
            raise FileExistsError(f"{path} is a previous run's config: this run would write into that run's folder "
                                  "(a logger version given twice?). Resume it with --ckpt_path last, or give the "
                                  "logger another version.")
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=self.overwrite,
                             multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class KeepMetricsOnResume(Callback):
    """Keeps the rows of a resumed run's ``metrics.csv``: Lightning's CSV logger deletes that file when it reopens a
    run folder; they are put back before anything new is saved, so that the resumed run appends to them."""

    def __init__(self, metrics_file: str) -> None:
        self.metrics_file = Path(metrics_file)
        # read now, at instantiation: the logger deletes the file when the fit starts
        self.previous = self.metrics_file.read_text() if self.metrics_file.is_file() else ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning creates the loggers' experiments (and so deletes the file) before the callbacks' setup
        if not trainer.is_global_zero or not self.previous:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger) and Path(logger.log_dir).resolve() == self.metrics_file.parent.resolve():
                if not self.metrics_file.is_file():
                    self.metrics_file.write_text(self.previous)
                # the writer appends under the header it knows (sorted names): give it the file's
                header = next(csv.reader(io.StringIO(self.previous)), [])
                logger.experiment.metrics_keys = sorted({*header, *logger.experiment.metrics_keys})
        self.previous = ""  # once: a test after the fit reuses the logger


class LBGenCLI(LightningCLI):
    """LightningCLI with lbgen's links, a CSV logger in the run directory, and an optional test after fit."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=Literal["no", "final", "best"], default="final",
                            help="After `fit`, test the final weights, the best checkpoint, or nothing.")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Let `fit` replace the model's existing output_dir (a previous run's result).")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        self._add_run_logger(config)
        if self.subcommand == "fit":
            self._crash_safety(config)
        self._share_run_folder(config)

    @staticmethod
    def _loggers(config: Namespace) -> list:
        logger = config.trainer.logger
        return [] if logger in (None, True, False) else list(logger) if isinstance(logger, list) else [logger]

    def _add_run_logger(self, config: Namespace) -> None:
        """lbgen's CSV logger first, unless the loggers are off or the user gave a CSV logger: the run directory is
        then ``<default_root_dir>/version_N`` (metrics.csv, config, checkpoints, run files) whatever else logs."""
        # Lightning's default logger (TensorBoard or CSV, under lightning_logs/) would scatter runs, and a W&B first
        # logger would put every run's files into its one save_dir. Added here, not as a parser default, because its
        # folder is whatever default_root_dir the user gave, and so that `--trainer.logger+=X` (appended to a None
        # default) and `--trainer.logger X` both keep lbgen's run folder.
        if config.trainer.logger is False:
            return
        loggers = self._loggers(config)
        if not any(isinstance(c, type) and issubclass(c, CSVLogger) for c in map(_logger_class, loggers)):
            loggers.insert(0, Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                        init_args=Namespace(save_dir=config.trainer.default_root_dir, name="")))
        config.trainer.logger = loggers[0] if len(loggers) == 1 else loggers

    def _share_run_folder(self, config: Namespace) -> None:
        """CSV and TensorBoard loggers with the first logger's ``save_dir`` write into its run folder: same ``name``,
        and the same ``version``, fixed now (each would otherwise pick the next free ``version_N`` on its own, the
        second one after the first has made its folder)."""
        loggers = self._loggers(config)
        if not loggers or not _is_file_logger(loggers[0]):
            return
        first = loggers[0].init_args
        shared = [e for e in loggers[1:] if _is_file_logger(e) and e.init_args.save_dir is not None
                  and Path(e.init_args.save_dir).resolve() == Path(first.save_dir).resolve()]
        if not shared:
            return
        if first.get("version") is None:
            first.version = _next_version(Path(first.save_dir) / (first.name or ""))
        for entry in shared:
            entry.init_args.name, entry.init_args.version = first.get("name"), first.version

    def _crash_safety(self, config: Namespace) -> None:
        """Exact resume and safe checkpoints for every system: RNG states and a ``last.ckpt`` in every checkpoint
        folder, no checkpoint of non-finite weights, ``weights_only`` loading, and ``--ckpt_path last`` continuing
        the latest run directory (not a new, empty ``version_N``)."""
        callbacks = list(config.trainer.callbacks or [])
        names = {str(getattr(c, "class_path", type(c).__name__)).rsplit(".", 1)[-1] for c in callbacks}
        for name in ("RNGStateCallback", "FiniteWeightsGuard"):
            if name not in names:
                callbacks.append(Namespace(class_path=f"lbgen.callbacks.{name}", init_args=Namespace()))
        if config.trainer.enable_checkpointing is not False and "ModelCheckpoint" not in names:
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                       init_args=Namespace(save_last=True)))
        config.trainer.callbacks = callbacks
        if config.get("weights_only") is None:
            config.weights_only = True  # a checkpoint is data, not code: refuse pickled objects
        if config.get("ckpt_path") == "last":
            self._continue_latest_run(config)

    def _continue_latest_run(self, config: Namespace) -> None:
        """``--ckpt_path last``: give the first logger the version of the latest run holding a ``last*.ckpt`` under
        its folder, so that Lightning finds that checkpoint and the run continues in its folder (appending to its
        metrics): ``version_N`` for CSV and TensorBoard, the run id (the folder's name) for W&B, which then resumes
        that W&B run. A logger without a ``version`` argument starts a new folder (Lightning finds no ``last``)."""
        loggers = self._loggers(config)
        if not loggers:
            return  # no logger: checkpoints are in <default_root_dir>/checkpoints, where Lightning looks itself
        first, cls = loggers[0], _logger_class(loggers[0])
        if not isinstance(first, Namespace) or "version" not in inspect.signature(cls).parameters:
            rank_zero_info(f"--ckpt_path last: {cls.__name__} has no version to continue; starting a new run folder.")
            return
        # a throwaway instance (no run is started, nothing is written) says where the logger's runs are, read as
        # ModelCheckpoint reads them (save_dir / name / version), without knowing each logger's defaults
        probe = cls(**first.init_args.as_dict())
        parent = Path(probe.save_dir or config.trainer.default_root_dir) / str(probe.name)
        runs = {p.parents[1] for p in parent.glob("*/checkpoints/last*.ckpt")}
        if not runs:
            rank_zero_info(f"--ckpt_path last: no last.ckpt under {parent}/*/checkpoints; starting afresh.")
            return

        def recency(run: Path) -> tuple[int, float]:  # the largest version_N; runs named by an id: the newest
            number = _version_number(run.name)
            return (-1 if number is None else number, max(p.stat().st_mtime for p in run.glob("checkpoints/last*")))

        run = max(runs, key=recency)
        number = _version_number(run.name)
        first.init_args.version = run.name if number is None else number
        # the run directory already has config.yaml: keep it, and record this resumption's config beside it
        resumed = len(list(run.glob("config-resumed-*.yaml"))) + 1
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config-resumed-{resumed}.yaml"}
        if (run / "metrics.csv").is_file():  # appended to, not deleted, whatever the CSV logger's warning says
            config.trainer.callbacks = [*config.trainer.callbacks, Namespace(
                class_path="lbgen.cli.KeepMetricsOnResume", init_args=Namespace(metrics_file=str(run / "metrics.csv")))]
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        rank_zero_info(f"Resuming the latest run {run} from its last checkpoint.")

    def before_fit(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        output = getattr(self.model, "output_dir", None)
        if output and not config.get("ckpt_path") and not config.get("overwrite") and Path(output).exists() and any(
                Path(output).iterdir()):
            raise FileExistsError(f"{output} holds a previous run's output ({type(self.model).__name__}.output_dir). "
                                  "Choose another output_dir, resume the run with --ckpt_path last, or pass "
                                  "--overwrite true to replace it.")

    def after_fit(self) -> None:
        mode = self.config.get(str(self.subcommand), self.config).get("test_after_fit", "no")
        trainer = self.trainer
        if mode != "no" and not trainer.interrupted and is_overridden("test_step", self.model):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if mode == "best" and not best:
                rank_zero_info("test_after_fit=best but no best checkpoint was saved: testing the final weights.")
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best if mode == "best" and best else None)
        self._announce()

    def after_validate(self) -> None:
        self._announce()

    def after_test(self) -> None:
        self._announce()

    def after_predict(self) -> None:
        self._announce()

    def _announce(self) -> None:
        run_dir = run_directory(self.trainer)  # a collective: every process asks
        if run_dir and not self.trainer.fast_dev_run:
            rank_zero_info(f"Run directory: {run_dir.resolve()}")


def cli_main(args: list[str] | None = None, run: bool = True) -> LBGenCLI:
    """Entry point of ``lbgen``; tests call it with ``args`` to drive exactly the user's code path."""
    return LBGenCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        # never scatter version_N folders into the current folder: every run goes under ./runs unless told otherwise
        trainer_defaults={"default_root_dir": "runs"},
        # allow_abbrev off: argparse would silently read a misspelled --trainer.max_step as max_steps
        parser_kwargs={"description": DESCRIPTION, "formatter_class": _HelpFormatter, "allow_abbrev": False},
        auto_configure_optimizers=False,
        save_config_callback=RunConfigCallback,
    )


STAGE_VERBS = ("fit", "validate", "test", "predict", "export")
"""The verbs an experiment's stage may run: LightningCLI's four and ``export``."""

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
"""Exception types that lbgen raises, with a message saying what to change, for input a user gave."""


def user_error_message(err: BaseException) -> str | None:
    """lbgen's message about bad input in ``err``, or None for a bug.

    It is one when lbgen's own code raised it with a ``raise`` statement (every such message names the offending
    value and the fix) and it is of a ``USER_ERRORS`` type. A ``ValueError`` that Python or a library raised (a bug in
    lbgen or below) is not: its traceback is what a developer needs. An error a DataLoader worker raised arrives
    re-raised by torch with the worker's traceback in its text: that traceback is read instead.
    """
    if not isinstance(err, USER_ERRORS):
        return None
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    filename, line, message = tb.tb_frame.f_code.co_filename, tb.tb_lineno, str(err)
    if tb.tb_frame.f_code.co_name == "reraise" and Path(filename).parts[-2:] == ("torch", "_utils.py"):
        frames = re.findall(r'File "([^"]+)", line (\d+)', message)
        head = f"{type(err).__name__}: "
        if not frames or head not in message:
            return None
        (filename, line), message = frames[-1], message.rsplit("\n" + head, 1)[-1].strip()
    package = str(Path(__file__).resolve().parent)
    if not str(Path(filename).resolve()).startswith(package):
        return None
    import linecache

    return message if linecache.getline(filename, int(line)).lstrip().startswith("raise") else None


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is lbgen's message about bad input rather than a bug (``user_error_message``)."""
    return user_error_message(err) is not None


def run_stage(words: list[str] | None = None) -> None:
    """One stage command: ``fit`` / ``validate`` / ``test`` / ``predict`` (LightningCLI) or ``export``.

    ``words``: the command line after ``lbgen``; None: ``sys.argv`` (LightningCLI then reads it itself: given both,
    it warns that they may disagree).
    """
    given = sys.argv[1:] if words is None else words
    if given[:1] == ["export"]:
        if len(given) != 3:
            raise SystemExit("usage: lbgen export DATASET_DIR OUT_DIR")
        from lbgen.storage.dataset_format import export_image_folder

        print(f"Exported to {export_image_folder(given[1], given[2])}")
        return
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        cli_main(words)
    except SIGTERMException:
        # a terminated run must not look like a finished one to a scheduler: 128 + SIGTERM
        raise SystemExit(143) from None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # leave together: a process whose peer already exited can abort in gloo's exit-time clean-up
        dist.barrier()
        dist.destroy_process_group()
