"""``lbgen experiment FILE``: run an experiment's stages in order, skip the finished ones, write its report.

An experiment is a YAML file: ``stages`` (each one ``lbgen`` command with its recipes, and the file that exists once
it is done) and ``report`` (what ``lbgen.evaluation.report`` tabulates and plots). This is ordering and caching,
nothing more: every stage is a LightningCLI run with its own ``config.yaml`` and logs, in its own process (or, with
``--in-process``, one after the other in this one: it saves the ~10 s of imports per stage that dominate short
stages on a CPU, but a stage that starts several processes itself, DDP's ``devices: 2`` for example, needs its own).

    name: my experiment
    stages:
      - name: vae
        run: fit -c {configs}/foundation/fashion_vae.yaml --trainer.default_root_dir runs/logs/vae
        done: runs/embedded/vae/config.json
      - name: classifier-{method}-s{seed}
        for_each: {method: [txt2img, genie], seed: [0, 1, 2]}
        run: fit -c {configs}/classifier/fashion_5shot_plus_synthetic.yaml --data.init_args.split_seed {seed} ...
        done: runs/classifier/{method}/s{seed}/version_0/test_metrics.json

Placeholders: ``{configs}`` (this checkout's ``configs/`` folder) and the ``for_each`` variables (every
combination, in the order given). Paths are relative to ``--workdir``. ``stages.json`` in the workdir records
each stage's status and time. ``needs: [runs/embedded/generator/model_index.json, ...]`` names inputs that
another experiment makes in the same workdir, by their stages' ``done`` files: the runner checks them before the
first stage, so a missing one fails at once, by name.

An experiment can be an overlay of another (``extends: fashion_5shot.yaml``, next to it): it runs the base's stages,
those named by ``only`` or all but those named by ``drop`` (names, or patterns such as ``seeds-*``), with
``overrides: {stage name or pattern: extra lbgen arguments}`` appended to their commands, then its own ``stages``;
``name``, ``needs``, ``report`` and ``resources`` are the base's unless it gives its own.

``--jobs N`` runs stages that do not need each other at the same time, ``--executor slurm`` as SLURM jobs
(``lbgen.experiment_parallel``: how a stage's needs are found, ``after: [stage, ...]`` to add one, ``gpus: N`` per
stage, and the ``resources`` section: ``gpus_per_stage``, ``cpus_per_stage``, ``mem_gb``, ``time_min``, ``slurm``).
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from lbgen.cli import STAGE_VERBS, run_stage, user_error_message
from lbgen.experiment_parallel import EXECUTORS, STAGES_FILE, Stage, check_resources, record_stage, run_parallel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_KEYS = {"name", "run", "done", "for_each", "after", "gpus"}


def _fill(text: str, values: dict[str, Any], where: str) -> str:
    try:
        return text.format(**values)
    except (KeyError, IndexError) as err:
        raise ValueError(f"{where}: unknown placeholder {err} in {text!r} (known: {sorted(values)}).") from None


def expand_stages(spec: dict[str, Any], configs: Path = CONFIGS) -> list[Stage]:
    """The experiment's stages, ``for_each`` expanded, placeholders filled; names must be unique.

    An overlay (``extends``, its base experiment read in by :func:`load_experiment`) starts from the base's stages
    as ``only`` / ``drop`` and ``overrides`` say, and adds its own ``stages`` after them.
    """
    stages = _inherited_stages(spec, configs) if "extends" in spec else []
    names = {stage.name for stage in stages}
    for i, entry in enumerate(spec.get("stages") or []):
        where = f"stage {i + 1} ({entry.get('name', '?') if isinstance(entry, dict) else entry!r})"
        if not isinstance(entry, dict) or not {"name", "run", "done"} <= set(entry):
            raise ValueError(f"{where}: a stage needs name, run and done.")
        unknown = set(entry) - STAGE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (a stage has {', '.join(sorted(STAGE_KEYS))}).")
        after, gpus = entry.get("after") or [], entry.get("gpus")
        if not isinstance(after, list) or not all(isinstance(p, str) and p for p in after):
            raise ValueError(f"{where}: after is a list of earlier stages' names (or patterns), got {after!r}.")
        if gpus is not None and (not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0):
            raise ValueError(f"{where}: gpus is a whole number >= 0, got {gpus!r}.")
        loops = entry.get("for_each") or {}
        if not isinstance(loops, dict) or not all(isinstance(v, list) and v for v in loops.values()):
            raise ValueError(f"{where}: for_each maps names to non-empty lists, got {loops!r}.")
        for combo in itertools.product(*loops.values()):
            values = {"configs": str(configs), **dict(zip(loops, combo, strict=True))}
            run = entry["run"]
            words = shlex.split(run) if isinstance(run, str) else [str(w) for w in run]
            stage = Stage(name=_fill(entry["name"], values, where),
                          args=tuple(_fill(w, values, where) for w in words), done=_fill(entry["done"], values, where),
                          after=tuple(_fill(p, values, where) for p in after), gpus=gpus)
            for pattern in stage.after:
                if not _matching(pattern, [s.name for s in stages]):
                    raise ValueError(f"{where}: after: {pattern!r} names no earlier stage.")
            if stage.name in names:
                raise ValueError(f"{where}: duplicate stage name {stage.name!r}.")
            if not stage.args or stage.args[0] not in STAGE_VERBS:
                raise ValueError(f"{where}: run must start with an lbgen subcommand (fit, test, predict, ...), got "
                                 f"{' '.join(stage.args[:1])!r}.")
            names.add(stage.name)
            stages.append(stage)
    return stages


def _matching(pattern: str, names: list[str]) -> list[str]:
    """The stage names that ``pattern`` (a name, or a pattern such as ``seeds-*``) matches, in order."""
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def _inherited_stages(spec: dict[str, Any], configs: Path) -> list[Stage]:
    """An overlay's share of its base experiment's stages: ``only`` / ``drop`` applied, then ``overrides``."""
    base = spec["extends"]
    if not isinstance(base, dict):
        raise ValueError(f"extends: {base!r} names a file; read the experiment with load_experiment(path), which "
                         "reads its base.")
    stages = expand_stages(base, configs)
    names = [stage.name for stage in stages]
    for key in ("only", "drop"):
        if key not in spec:
            continue
        chosen = set()
        for pattern in spec[key]:
            found = _matching(pattern, names)
            if not found:
                raise ValueError(f"{key}: {pattern!r} is not a stage of the base experiment (its stages: "
                                 f"{', '.join(names)}).")
            chosen.update(found)
        stages = [stage for stage in stages if (stage.name in chosen) == (key == "only")]
    kept = [stage.name for stage in stages]
    # an `after` naming a stage the overlay left out waits for nothing
    stages = [replace(stage, after=tuple(p for p in stage.after if _matching(p, kept))) for stage in stages]
    for pattern, extra in (spec.get("overrides") or {}).items():
        where = f"overrides[{pattern!r}]"
        found = _matching(pattern, kept)
        if not found:
            left_out = _matching(pattern, names)
            raise ValueError(f"{where}: " + (f"{', '.join(left_out)} left out by only / drop" if left_out else
                                              f"no stage of that name (the stages: {', '.join(kept)})") + ".")
        words = shlex.split(extra) if isinstance(extra, str) else [str(w) for w in extra]
        extra_args = tuple(_fill(w, {"configs": str(configs)}, where) for w in words)
        stages = [replace(stage, args=stage.args + extra_args) if stage.name in found else stage for stage in stages]
    return stages


def _check_overlay_keys(spec: dict[str, Any], path: Path) -> None:
    for key in ("only", "drop"):
        if key in spec and not (isinstance(spec[key], list) and all(isinstance(p, str) and p for p in spec[key])):
            raise ValueError(f"{path}: {key} is a list of stage names (or patterns such as seeds-*), got "
                             f"{spec[key]!r}.")
    if "only" in spec and "drop" in spec:
        raise ValueError(f"{path}: give only (the stages to keep) or drop (the stages to leave out), not both.")
    overrides = spec.get("overrides", {})
    if not isinstance(overrides, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, list)) for k, v in overrides.items()):
        raise ValueError(f"{path}: overrides maps stage names (or patterns) to extra lbgen arguments, got "
                         f"{overrides!r}.")


def load_experiment(path: str | Path) -> dict[str, Any]:
    """An experiment file; an overlay's ``extends`` (a path relative to the file's folder) replaced by its base
    experiment, read the same way, whose ``name``, ``needs`` and ``report`` it inherits unless it gives its own."""
    return _load_experiment(Path(path), ())


def _load_experiment(path: Path, overlays: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"No experiment file {path}" + (f" (extended by {overlays[-1]})." if overlays else "."))
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not {"stages", "extends"} & set(spec):
        raise ValueError(f"{path} is not an experiment (a mapping with 'stages', or 'extends' and a base experiment, "
                         "and optionally 'report').")
    if "extends" in spec:
        _check_overlay_keys(spec, path)
        base_path = path.parent / str(spec["extends"])
        if base_path.resolve() in {p.resolve() for p in (*overlays, path)}:
            raise ValueError(f"{path}: extends {spec['extends']!r} goes round in a circle.")
        base = _load_experiment(base_path, (*overlays, path))
        spec = {**{key: base[key] for key in ("name", "needs", "report", "resources") if key in base}, **spec,
                "extends": base}
        try:
            expand_stages(spec)  # a stage name that matches nothing fails now, naming this file
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    elif {"only", "drop", "overrides"} & set(spec):
        raise ValueError(f"{path}: only, drop and overrides change a base experiment's stages; name it with extends.")
    check_resources(spec.get("resources"), str(path))
    needs = spec.get("needs", [])
    if not isinstance(needs, list) or not all(isinstance(p, str) and p for p in needs):
        raise ValueError(f"{path}: needs is a list of paths relative to the workdir, got {needs!r}.")
    return spec


def missing_inputs(spec: dict[str, Any], workdir: Path) -> list[str]:
    """The ``needs`` of an experiment that are not in ``workdir``."""
    return [p for p in spec.get("needs", []) if not (workdir / p).exists()]


def _run_in_process(args: list[str], workdir: Path) -> int:
    """One ``lbgen`` command in this process, from ``workdir``; its exit code (1 with the traceback on an error)."""
    previous, previous_argv = Path.cwd(), sys.argv
    os.chdir(workdir)
    # the stage's words as the command line LightningCLI reads (given as args next to the experiment's own sys.argv,
    # it warns that both were given)
    sys.argv = ["lbgen", *args]
    try:
        run_stage()
        return 0
    except SystemExit as err:  # LightningCLI exits on bad arguments, after printing why
        return 0 if err.code is None else err.code if isinstance(err.code, int) else 1
    except Exception as err:  # reported like a failed subprocess; the runner stops with the stage's name
        if (message := user_error_message(err)) is not None:
            print(f"lbgen: error: {message}", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
        return 1
    finally:
        os.chdir(previous)
        sys.argv = previous_argv
        gc.collect()  # the stage's models and data go before the next one starts


def run_stages(stages: list[Stage], workdir: Path, lbgen: list[str], until: str | None = None,
               dry_run: bool = False, in_process: bool = False) -> list[dict[str, Any]]:
    """Run the unfinished stages in order (stop after ``until``); a failing stage stops the experiment.

    ``in_process``: run each stage in this process (``lbgen`` is then ignored) instead of a subprocess.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / STAGES_FILE
    log = json.loads(log_file.read_text()) if log_file.is_file() else {}
    results = []
    for n, stage in enumerate(stages, 1):
        head = f"[{n}/{len(stages)}] {stage.name}"
        if stage.is_done(workdir):
            print(f"{head}: done ({stage.done})", flush=True)
            results.append({"name": stage.name, "status": "cached", **log.get(stage.name, {})})
        elif dry_run:
            print(f"{head}: would run lbgen {' '.join(stage.args)}", flush=True)
            results.append({"name": stage.name, "status": "pending"})
        else:
            print(f"{head}: lbgen {' '.join(stage.args)}", flush=True)
            start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
            # progress bars are noise in a log file; a terminal keeps them
            quiet = [] if sys.stdout.isatty() or stage.args[0] == "export" else ["--trainer.enable_progress_bar=false"]
            if in_process:
                code = _run_in_process([*stage.args, *quiet], workdir)
            else:
                code = subprocess.call([*lbgen, *stage.args, *quiet], cwd=workdir)
            seconds = round(time.perf_counter() - start, 1)
            if code != 0 or not stage.is_done(workdir):
                why = f"exit code {code}" if code else f"finished without writing {stage.done}"
                raise RuntimeError(f"Stage {stage.name} failed ({why}) after {seconds} s; fix it and rerun: the "
                                   f"finished stages are kept.")
            entry = {"seconds": seconds, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            record_stage(log_file, stage.name, entry)
            print(f"{head}: done in {seconds} s", flush=True)
            results.append({"name": stage.name, "status": "ran", **entry})
        if until is not None and stage.name == until:
            break
    return results


def main(argv: list[str] | None = None) -> None:
    """``lbgen experiment FILE [--workdir DIR] [--until STAGE] [--dry-run] [--report-only] [--in-process]
    [--jobs N] [--executor local|slurm|submitit-local]``."""
    parser = argparse.ArgumentParser(prog="lbgen experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="the experiment YAML")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where runs/ and the report go")
    parser.add_argument("--until", help="stop after this stage")
    parser.add_argument("--dry-run", action="store_true", help="list what would run")
    parser.add_argument("--report-only", action="store_true", help="write the report from what is there")
    parser.add_argument("--in-process", action="store_true",
                        help="run the stages in this process (saves the start-up time of each; single-process "
                             "stages only)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="stages at once: those that do not need each other's outputs (default 1: one after the "
                             "other, their output on this terminal; more: each stage's output in stage_logs/)")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where stages run: local subprocesses, one SLURM job each through submitit (slurm; the "
                             "experiment file's resources section), or submitit's local executor (submitit-local)")
    args = parser.parse_args(argv)
    parallel = args.jobs != 1 or args.executor != "local"
    if args.jobs < 1:
        parser.error(f"--jobs is the number of stages at once, at least 1; got {args.jobs}")
    if parallel and args.in_process:
        parser.error("--in-process runs the stages one after the other in this process: drop --jobs / --executor")
    spec = load_experiment(args.file)
    stages = expand_stages(spec)
    workdir = args.workdir.resolve()
    lbgen = [sys.executable, "-m", "lbgen"]
    missing = missing_inputs(spec, workdir)
    if missing and args.dry_run:
        print(f"missing inputs (needs): {', '.join(missing)}", flush=True)
    elif missing and not args.report_only:
        raise SystemExit(f"{args.file} needs {', '.join(missing)} in {workdir}, made by another experiment (see the "
                         "file's header); run that one in this workdir first.")
    if not args.report_only and parallel:
        names = [stage.name for stage in stages]
        chosen = stages[:names.index(args.until) + 1] if args.until in names else stages
        run_parallel(chosen, workdir, lbgen, args.jobs, args.executor, spec.get("resources"), args.dry_run)
    elif not args.report_only:
        run_stages(stages, workdir, lbgen, args.until, args.dry_run, args.in_process)
    if spec.get("report") and not args.dry_run and (args.until is None or args.report_only):
        from lbgen.evaluation.report import write_report

        path = write_report(spec["report"], workdir, title=spec.get("name", Path(args.file).stem),
                            stages_file=workdir / STAGES_FILE, stage_names=[stage.name for stage in stages])
        print(f"Report: {path}", flush=True)

