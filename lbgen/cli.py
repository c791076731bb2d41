"""The stage verbs of ``lbgen``: fit, validate, test, predict (LightningCLI over the systems) and export."""

from __future__ import annotations

import re
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Literal

import lightning as L
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

DESCRIPTION = """\
lbgen: turn text-to-image diffusion models into training data for image classifiers, and measure what it buys.

Stages (each reads a YAML recipe from configs/, e.g. `lbgen fit -c configs/classifier/fashion_5shot.yaml`):
  fit       train a system: a classifier on real (+ synthetic) data; tests it afterwards (--test_after_fit)
  validate  evaluate a trained system on the validation hold-out
  test      evaluate a classifier on the untouched test set; writes test_metrics.json and confusion_matrix.json
  predict   run a system's predict step: generate a synthetic dataset (configs/generate/), or class
            probabilities of a classifier
  export    `lbgen export DATASET_DIR OUT_DIR`: copy a generated dataset to plain PNG folders + metadata.jsonl
  experiment `lbgen experiment FILE --workdir DIR`: run an experiment's stages (cached), then write report.md
  summary   `lbgen summary NAME=RUN_ROOT ...`: mean top-1 with its 95% interval over the tested runs of each root
  shard-folder `lbgen shard-folder IMAGE_DIR OUT_DIR [--processes N]`: a real ImageFolder as WebDataset shards
            (read like a generated set; resumable)
  imagefolder-from-labels `lbgen imagefolder-from-labels FLAT_DIR LABELS_FILE OUT_DIR`: a flat image folder + labels
            (ImageNet's val + LOC_val_solution.csv) as an ImageFolder, by hard links
A bad input stops with one message (exit code 1); LBGEN_DEBUG=1 shows where it was raised.
Outputs go to <trainer.default_root_dir>/version_N/ (config, metrics.csv, splits.json, checkpoints/);
the default root is ./runs.
"""


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the stage list in ``lbgen --help``."""


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
        # Lightning's default logger (TensorBoard or CSV, under lightning_logs/) would scatter runs; a CSV logger
        # with the run directory as its root gives <root>/version_N/ holding everything of one run. Set here, not as
        # a parser default, because its folder is whatever default_root_dir the user gave.
        if config.trainer.logger in (None, True):
            root = config.trainer.default_root_dir
            config.trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                              init_args=Namespace(save_dir=root, name=""))
        if self.subcommand == "fit":
            self._crash_safety(config)

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
        if config.get("ckpt_path") == "last" and isinstance(config.trainer.logger, Namespace) and str(
                config.trainer.logger.class_path).endswith("CSVLogger"):
            root = Path(config.trainer.default_root_dir)
            lasts = root.glob("version_*/checkpoints/last*.ckpt")
            runs = sorted((int(p.parts[-3][8:]), p) for p in lasts if p.parts[-3][8:].isdigit())
            if runs:
                version, last = runs[-1]
                config.trainer.logger.init_args.version = version
                # the run directory already has config.yaml: keep it, and record this resumption's config beside it
                resumed = len(list(last.parent.parent.glob("config-resumed-*.yaml"))) + 1
                self.save_config_kwargs = {**self.save_config_kwargs,
                                           "config_filename": f"config-resumed-{resumed}.yaml"}
                # metrics.csv is appended to, not deleted, whatever the CSV logger's warning says
                warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
                rank_zero_info(f"Resuming {last} (run directory {last.parent.parent}).")
            else:
                rank_zero_info(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints; starting afresh.")

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
        if self.trainer.log_dir and not self.trainer.fast_dev_run:
            rank_zero_info(f"Run directory: {Path(self.trainer.log_dir).resolve()}")


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
