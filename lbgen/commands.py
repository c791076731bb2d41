"""The ``lbgen`` command: one table of verbs, each a function of the words after it.

``fit`` / ``validate`` / ``test`` / ``predict`` are LightningCLI's (``lbgen.cli``), ``export`` copies a generated
dataset to plain files, ``experiment`` runs an experiment's stages (``lbgen.experiment``, which runs the stage verbs
through ``lbgen.cli``), ``summary`` tabulates tested runs, ``shard-folder`` writes an image folder as
shards (``lbgen.storage.real_shards``), ``imagefolder-from-labels`` lays a flat labelled folder out as an ImageFolder.
A bad input stops with lbgen's one-line message and exit
code 1; ``LBGEN_DEBUG=1`` (or ``--debug`` right after ``lbgen``) shows the traceback too. Bugs always show theirs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from lbgen.cli import STAGE_VERBS, run_stage, user_error_message

DEBUG_ENV = "LBGEN_DEBUG"


def summary(words: list[str]) -> None:
    """``lbgen summary NAME=RUN_ROOT ...``: mean top-1 (95% interval) of the tested runs under each root."""
    from lbgen.evaluation.report import accuracy_rows, accuracy_table

    if not words or any("=" not in w for w in words):
        raise SystemExit("usage: lbgen summary NAME=RUN_ROOT [NAME=RUN_ROOT ...]  (RUN_ROOT: a classifier runs' "
                         "--trainer.default_root_dir, one version_N/test_metrics.json per seed)")
    rows = [dict(zip(("label", "runs"), w.split("=", 1), strict=True)) for w in words]
    print(accuracy_table(accuracy_rows(Path.cwd(), rows), baseline=None))


def shard_folder(words: list[str]) -> None:
    """``lbgen shard-folder IMAGE_DIR OUT_DIR [--shard-size N] [--shard-max-mb M] [--processes N]``: an
    ``ImageFolder``'s files as a real set of WebDataset shards (``lbgen.storage.real_shards``); rerun to resume."""
    import argparse

    from lbgen.storage.real_shards import shard_image_folder

    parser = argparse.ArgumentParser(prog="lbgen shard-folder", description="Write IMAGE_DIR/<class>/<images> "
                                     "into OUT_DIR as WebDataset shards (files stored as they are), resumable.")
    parser.add_argument("image_dir", help="the ImageFolder: one sub-folder per class")
    parser.add_argument("out_dir", help="a new or empty folder, or this set's folder to resume a killed run")
    parser.add_argument("--shard-size", type=int, default=1000, help="files per shard, at most (default 1000)")
    parser.add_argument("--shard-max-mb", type=float, default=None, help="MB per shard, at most (default: none)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(words)
    done = shard_image_folder(args.image_dir, args.out_dir, shard_size=args.shard_size,
                              shard_max_mb=args.shard_max_mb, processes=args.processes)
    print(f"{done['images']} images in {done['shards']} shards in {args.out_dir} ({done['written']} written now, "
          f"{done['kept']} kept from before)")


def imagefolder_from_labels(words: list[str]) -> None:
    """``lbgen imagefolder-from-labels FLAT_DIR LABELS_FILE OUT_DIR [--mode hard|symlink|copy]``: lay a flat folder of
    images out as an ImageFolder (ImageNet's validation set: the 50,000 JPEGs and LOC_val_solution.csv)."""
    import argparse

    from lbgen.datamodules.image_folder import imagefolder_from_labels as lay_out

    parser = argparse.ArgumentParser(
        prog="lbgen imagefolder-from-labels",
        description="Lay a flat folder of images out as OUT_DIR/<label>/<file> (an ImageFolder, e.g. the test_dir "
                    "of ImageFolderDataModule), by hard links (a copy where linking fails), symlinks or copies. "
                    "Resumable: files already in OUT_DIR are skipped. A label for a file that is not in FLAT_DIR "
                    "is refused before anything is made.")
    parser.add_argument("flat_dir", help="the folder of images, e.g. ILSVRC/Data/CLS-LOC/val")
    parser.add_argument("labels_file", help="LOC_val_solution.csv (ImageId,PredictionString: the label is the "
                                            "first word, the synset), a 'file,label' CSV or 'file label' lines")
    parser.add_argument("out_dir", help="the ImageFolder to make (not inside FLAT_DIR)")
    parser.add_argument("--mode", choices=("hard", "symlink", "copy"), default="hard",
                        help="how each image gets there (default: hard links, no extra space)")
    args = parser.parse_args(words)
    counts = lay_out(args.flat_dir, args.labels_file, args.out_dir, args.mode)
    made = ", ".join(f"{n} {what}" for what, n in counts.items() if what not in ("classes", "unlabelled") and n)
    print(f"{args.out_dir}: {counts['classes']} class folders; {made or 'nothing to do'}"
          + (f"; {counts['unlabelled']} file(s) of {args.flat_dir} have no label and were left out"
             if counts["unlabelled"] else ""))


def experiment(words: list[str]) -> None:
    from lbgen.experiment import main as run_experiment

    run_experiment(words)


VERBS: dict[str, Callable[[list[str]], None]] = {
    **{verb: run_stage for verb in STAGE_VERBS},
    "experiment": experiment,
    "summary": summary,
    "shard-folder": shard_folder,
    "imagefolder-from-labels": imagefolder_from_labels,
}
"""Every verb of ``lbgen`` (the stage verbs get the whole command line, their verb included)."""


def main(argv: list[str] | None = None) -> None:
    """Console script ``lbgen`` (returns nothing, so the exit code is 0 on success)."""
    words = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if words[:1] == ["--debug"]:
        debug, words = True, words[1:]
        if argv is None:
            sys.argv = [sys.argv[0], *words]
    verb = words[0] if words else None
    try:
        if verb in STAGE_VERBS or verb is None or verb.startswith("-"):  # LightningCLI's own help and usage
            run_stage(None if argv is None else words)
        elif verb in VERBS:
            VERBS[verb](words[1:])
        else:
            raise SystemExit(f"lbgen: unknown command {verb!r}; the commands are {', '.join(VERBS)} "
                             "(lbgen --help lists the stages).")
    except Exception as err:
        message = user_error_message(err)
        if debug or message is None:
            raise
        print(f"lbgen: error: {message}\n(set {DEBUG_ENV}=1 to see where it was raised)", file=sys.stderr)
        raise SystemExit(1) from None
