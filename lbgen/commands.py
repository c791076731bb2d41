"""The ``lbgen`` command: one table of verbs, each a function of the words after it.

``fit`` / ``validate`` / ``test`` / ``predict`` are LightningCLI's (``lbgen.cli``), ``export`` copies a generated
dataset to plain files, ``experiment`` runs an experiment's stages (``lbgen.experiment``, which runs the stage verbs
through ``lbgen.cli``), ``summary`` tabulates tested runs. A bad input stops with lbgen's one-line message and exit
code 1; ``LBGEN_DEBUG=1`` (or ``--debug`` right after ``lbgen``) shows the traceback too. Bugs always show theirs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from lbgen.cli import STAGE_VERBS, is_user_error, run_stage

DEBUG_ENV = "LBGEN_DEBUG"


def summary(words: list[str]) -> None:
    """``lbgen summary NAME=RUN_ROOT ...``: mean top-1 (95% interval) of the tested runs under each root."""
    from lbgen.evaluation.report import accuracy_rows, accuracy_table

    if not words or any("=" not in w for w in words):
        raise SystemExit("usage: lbgen summary NAME=RUN_ROOT [NAME=RUN_ROOT ...]  (RUN_ROOT: a classifier runs' "
                         "--trainer.default_root_dir, one version_N/test_metrics.json per seed)")
    rows = [dict(zip(("label", "runs"), w.split("=", 1), strict=True)) for w in words]
    print(accuracy_table(accuracy_rows(Path.cwd(), rows), baseline=None))


def experiment(words: list[str]) -> None:
    from lbgen.experiment import main as run_experiment

    run_experiment(words)


VERBS: dict[str, Callable[[list[str]], None]] = {
    **{verb: run_stage for verb in STAGE_VERBS},
    "experiment": experiment,
    "summary": summary,
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
        if debug or not is_user_error(err):
            raise
        print(f"lbgen: error: {err}\n(set {DEBUG_ENV}=1 to see where it was raised)", file=sys.stderr)
        raise SystemExit(1) from None
