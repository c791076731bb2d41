"""The ``lbgen`` command: LightningCLI over lbgen's systems and DataModules."""

from __future__ import annotations

import sys
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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        # Lightning's default logger (TensorBoard or CSV, under lightning_logs/) would scatter runs; a CSV logger
        # with the run directory as its root gives <root>/version_N/ holding everything of one run.
        if not config.trainer.default_root_dir:
            config.trainer.default_root_dir = "runs"  # never scatter version_N folders into the current folder
        if config.trainer.logger in (None, True):
            root = config.trainer.default_root_dir
            config.trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                              init_args=Namespace(save_dir=root, name=""))

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
        parser_kwargs={"description": DESCRIPTION, "formatter_class": _HelpFormatter},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Console script ``lbgen`` (returns nothing, so the exit code is 0 on success)."""
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["export"]:
        if len(words) != 3:
            raise SystemExit("usage: lbgen export DATASET_DIR OUT_DIR")
        from lbgen.datamodules.synthetic import export_image_folder

        print(f"Exported to {export_image_folder(words[1], words[2])}")
        return
    cli_main(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
