"""``lbgen experiment FILE --jobs N [--executor slurm]``: an experiment's stages that do not need each other at once.

Which stage needs which: a stage's output is the folder of its ``done`` file (the file itself when it lies in the
workdir, or when other stages' done files share its folder); a later stage needs an earlier one when its command,
or a recipe it reads (``-c``), names a path in that folder, the folder itself or a folder above it, or when its
``after`` names it. A stage starts once everything it
needs is done, at most N at a time, in the experiment's order:

- ``local``: ``lbgen`` subprocesses here; with ``resources.gpus_per_stage`` (or a stage's ``gpus``) each one gets GPUs
  of its own (``CUDA_VISIBLE_DEVICES``, from the runner's visible GPUs).
- ``slurm``: one SLURM job per stage through submitit's ``AutoExecutor``, with the experiment file's ``resources``:
  ``time_min``, ``gpus_per_stage``, ``cpus_per_stage``, ``mem_gb`` and ``slurm`` (sbatch parameters submitit knows:
  ``partition``, ``account``, ``qos``, ``constraint``, ...). The runner waits for the jobs (run it in tmux or
  screen); Ctrl-C cancels the running ones.
- ``submitit-local``: the same through submitit's ``LocalExecutor``, on this machine: the SLURM path without a cluster.

Each stage's output goes to ``<workdir>/stage_logs/<stage>.log``; ``stages.json`` records when it started and
finished. A failed stage stops the stages that need it, named in the message; the others finish.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lbgen.storage.files import atomic_write_json

EXECUTORS = ("local", "slurm", "submitit-local")
STAGES_FILE = "stages.json"
LOG_DIR = "stage_logs"
RESOURCE_KEYS = {"gpus_per_stage", "cpus_per_stage", "mem_gb", "time_min", "slurm"}
"""The keys of an experiment file's ``resources`` section."""
DEFAULT_TIME_MIN = 24 * 60
"""A submitit job's time limit when ``resources.time_min`` is not given (submitit's own default is minutes)."""
_SEPARATORS = re.compile(r"[\s:,;=\[\]()\"'{}]+")


@dataclass(frozen=True)
class Stage:
    """One ``lbgen`` command and the file that exists once it has finished."""

    name: str
    args: tuple[str, ...]
    done: str
    after: tuple[str, ...] = ()
    """Stages (names or patterns) it waits for besides the ones derived from its paths (``--jobs``)."""
    gpus: int | None = None
    """GPUs of its own with ``--jobs`` / ``--executor`` (None: ``resources.gpus_per_stage``)."""

    def is_done(self, workdir: Path) -> bool:
        return (workdir / self.done).exists()


def check_resources(resources: Any, where: str) -> dict[str, Any]:
    """An experiment file's ``resources`` section, checked: ``{}`` when it has none."""
    if resources is None:
        return {}
    if not isinstance(resources, dict) or set(resources) - RESOURCE_KEYS:
        raise ValueError(f"{where}: resources maps {sorted(RESOURCE_KEYS)} to values, got {resources!r}.")
    for key in RESOURCE_KEYS - {"slurm"}:
        value = resources.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{where}: resources.{key} is a whole number >= 0, got {value!r}.")
    if not isinstance(resources.get("slurm", {}), dict):
        raise ValueError(f"{where}: resources.slurm maps sbatch parameters (partition, account, ...) to values, got "
                         f"{resources['slurm']!r}.")
    return resources


def record_stage(log_file: Path, name: str, entry: dict[str, Any]) -> None:
    """Add one stage's entry to ``stages.json``: re-read just before the write, update, atomic replace, so that
    experiments sharing a workdir keep each other's entries and a reader never sees a half-written file. No lock: two
    writes in the same instant can still drop one entry (only a time in a report; the stages' done files decide)."""
    log = json.loads(log_file.read_text()) if log_file.is_file() else {}
    log[name] = entry
    atomic_write_json(log_file, log)


# --- which stage needs which ------------------------------------------------------------------------------------

def stage_output(stage: Stage) -> str:
    """What a stage makes, as a workdir-relative path: its ``done`` file's folder (the file in the workdir itself)."""
    done = posixpath.normpath(stage.done)
    return posixpath.dirname(done) or done


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _recipes(args: tuple[str, ...], workdir: Path) -> Iterator[Path]:
    """The YAML files a stage's command reads (``-c FILE``, ``--config=FILE``, any existing ``*.yaml`` word)."""
    for i, word in enumerate(args):
        if word in ("-c", "--config") and i + 1 < len(args):
            candidate = args[i + 1]
        elif word.startswith(("-c=", "--config=")):
            candidate = word.split("=", 1)[1]
        elif word.endswith((".yaml", ".yml")):
            candidate = word
        else:
            continue
        path = Path(candidate) if Path(candidate).is_absolute() else workdir / candidate  # stages run in the workdir
        if path.is_file():
            yield path


def stage_paths(stage: Stage, workdir: Path) -> set[str]:
    """Every workdir-relative path a stage's command and recipes name (the ones it reads and the ones it writes)."""
    texts = list(stage.args)
    for recipe in _recipes(stage.args, workdir):
        texts.extend(_strings(yaml.safe_load(recipe.read_text())))
    paths = set()
    for text in texts:
        for token in _SEPARATORS.split(text):
            if not token or token.startswith("-"):
                continue
            if Path(token).is_absolute():
                try:
                    token = Path(token).relative_to(workdir).as_posix()
                except ValueError:
                    continue  # outside the workdir: not made by a stage
            token = posixpath.normpath(token)
            if token not in (".", "..") and not token.startswith("../"):
                paths.add(token)
    return paths


def _touches(path: str, output: str) -> bool:
    return path == output or path.startswith(output + "/") or ("/" in path and output.startswith(path + "/"))


def stage_dependencies(stages: list[Stage], workdir: Path) -> dict[str, list[str]]:
    """For each stage, the earlier stages it needs, in order (see the module's docstring).

    Where several stages' done files share a folder (``runs/backbones/a.safetensors``, ``runs/backbones/b...``), each
    such stage's output is its done file itself: a stage reading one backbone does not wait for all of them."""
    folders = [stage_output(stage) for stage in stages]
    shared = {folder for folder in folders if folders.count(folder) > 1}
    outputs = [posixpath.normpath(stage.done) if folder in shared else folder
               for stage, folder in zip(stages, folders, strict=True)]
    needs: dict[str, list[str]] = {}
    for i, stage in enumerate(stages):
        paths = stage_paths(stage, workdir)
        needed = {stages[j].name for j in range(i) if any(_touches(p, outputs[j]) for p in paths)}
        for pattern in stage.after:
            needed.update(s.name for s in stages[:i] if fnmatch.fnmatchcase(s.name, pattern))
        needs[stage.name] = [s.name for s in stages[:i] if s.name in needed]
    return needs


# --- where stages run --------------------------------------------------------------------------------------------

def run_stage_command(command: list[str], workdir: str, log: str, env: dict[str, str] | None = None) -> int:
    """One stage's ``lbgen`` command run in ``workdir``, its output into ``log``; its exit code. A submitit job runs
    this; under SLURM with several tasks (a multi-GPU stage) every task runs it and Lightning joins them, the task
    of rank k > 0 writing to ``<log>.rank<k>``."""
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    path = Path(log) if rank == 0 else Path(f"{log}.rank{rank}")
    with path.open("w") as out:
        return subprocess.call(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})


class _LocalLauncher:
    """Stages as subprocesses of this one."""

    poll_s = 0.1

    def start(self, stage: Stage, command: list[str], workdir: Path, log: Path, gpus: list[str], count: int) -> Any:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else None
        with log.open("w") as out:  # the child keeps its own handle on the file
            return subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env)

    def poll(self, handle: subprocess.Popen) -> tuple[int, str] | None:
        code = handle.poll()
        return None if code is None else (code, f"exit code {code}")

    def stop(self, handle: subprocess.Popen) -> None:
        handle.terminate()
        try:
            handle.wait(timeout=30)
        except subprocess.TimeoutExpired:
            handle.kill()


class _SubmititLauncher:
    """Stages as submitit jobs: on SLURM (``slurm``) or as submitit's local processes (``submitit-local``)."""

    def __init__(self, cluster: str, workdir: Path, resources: dict[str, Any]) -> None:
        import submitit

        self.cluster, self.poll_s = cluster, 10.0 if cluster == "slurm" else 0.5
        self.executor = submitit.AutoExecutor(folder=workdir / "submitit" / "%j", cluster=cluster)
        slurm = {f"slurm_{key}": value for key, value in (resources.get("slurm") or {}).items()}
        try:  # submitit checks the names (the slurm_ ones too with the local executor): a typo fails before any job
            self.executor.update_parameters(timeout_min=resources.get("time_min") or DEFAULT_TIME_MIN, nodes=1,
                                            cpus_per_task=resources.get("cpus_per_stage"),
                                            mem_gb=resources.get("mem_gb"), **slurm)
        except NameError as err:
            raise ValueError(f"resources.slurm: {err}") from None

    def start(self, stage: Stage, command: list[str], workdir: Path, log: Path, gpus: list[str], count: int) -> Any:
        if self.cluster == "slurm":  # SLURM gives the job its GPUs; one task per GPU, joined by Lightning
            self.executor.update_parameters(name=f"lbgen-{stage.name}", gpus_per_node=count,
                                            tasks_per_node=max(1, count))
            return self.executor.submit(run_stage_command, command, str(workdir), str(log))
        # the local executor would number a job's GPUs from 0: the stage is given the ones the runner chose
        self.executor.update_parameters(name=f"lbgen-{stage.name}")
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else None
        return self.executor.submit(run_stage_command, command, str(workdir), str(log), env)

    def poll(self, job: Any) -> tuple[int, str] | None:
        if not job.done():
            return None
        try:
            code = max(job.results())
        except Exception as err:  # the job itself failed (time limit, node failure, ...): its log says why
            return 1, f"submitit job {job.job_id} failed: {str(err).strip().splitlines()[0]}"
        return code, f"exit code {code} (submitit job {job.job_id})"

    def stop(self, job: Any) -> None:
        job.cancel(check=False)


def _visible_gpus() -> list[str]:
    """The GPUs local stages share: the runner's CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# --- the schedule ------------------------------------------------------------------------------------------------

@dataclass
class _Running:
    stage: Stage
    handle: Any
    log: Path
    gpus: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))


def _log_name(stage: Stage) -> str:
    return re.sub(r"[^\w.+-]", "_", stage.name) + ".log"


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join("    " + line for line in text[-lines:])


def run_parallel(stages: list[Stage], workdir: Path, lbgen: list[str], jobs: int, executor: str = "local",
                 resources: dict[str, Any] | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Run the unfinished stages, each once what it needs is done, at most ``jobs`` at a time (module docstring),
    recording each finished one in ``stages.json``. Raises ``RuntimeError`` naming the failed stages and those not
    run because of them, once every stage that could run has finished."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}.")
    if jobs < 1:
        raise ValueError(f"jobs is the number of stages at once, at least 1; got {jobs}.")
    resources = resources or {}
    workdir.mkdir(parents=True, exist_ok=True)
    needs = stage_dependencies(stages, workdir)
    number = {stage.name: f"[{n}/{len(stages)}] {stage.name}" for n, stage in enumerate(stages, 1)}
    status: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    log_file = workdir / STAGES_FILE
    previous = json.loads(log_file.read_text()) if log_file.is_file() else {}
    for stage in stages:
        if stage.is_done(workdir):
            status[stage.name], entries[stage.name] = "cached", previous.get(stage.name, {})
            print(f"{number[stage.name]}: done ({stage.done})", flush=True)
        elif dry_run:
            after = f" (after {', '.join(needs[stage.name])})" if needs[stage.name] else ""
            print(f"{number[stage.name]}: would run lbgen {' '.join(stage.args)}{after}", flush=True)
            status[stage.name] = "pending"
    if dry_run:
        return [{"name": s.name, "status": status[s.name]} for s in stages]

    def gpus_of(stage: Stage) -> int:
        return stage.gpus if stage.gpus is not None else resources.get("gpus_per_stage") or 0

    pool = _visible_gpus() if executor != "slurm" and any(gpus_of(s) for s in stages) else []
    for stage in stages:
        if executor != "slurm" and gpus_of(stage) > len(pool):
            raise ValueError(f"Stage {stage.name} asks for {gpus_of(stage)} GPUs but this machine shows {len(pool)} "
                             "(CUDA_VISIBLE_DEVICES or torch); lower resources.gpus_per_stage / the stage's gpus.")
    launcher = _LocalLauncher() if executor == "local" else _SubmititLauncher(
        "slurm" if executor == "slurm" else "local", workdir, resources)
    (workdir / LOG_DIR).mkdir(exist_ok=True)
    pending = [stage for stage in stages if stage.name not in status]
    running: list[_Running] = []
    why: dict[str, str] = {}
    try:
        while pending or running:
            for stage in list(pending):  # a stage whose input failed is not run
                stopped = [n for n in needs[stage.name] if status.get(n) in ("failed", "blocked")]
                if stopped:
                    pending.remove(stage)
                    status[stage.name] = "blocked"
                    why[stage.name] = f"needs {stopped[0]}, which " + (
                        "failed" if status[stopped[0]] == "failed" else "was not run")
                    print(f"{number[stage.name]}: not run: it {why[stage.name]}", flush=True)
            free = [g for g in pool if not any(g in r.gpus for r in running)]
            for stage in list(pending):
                if len(running) >= jobs:
                    break
                if not all(status.get(n) in ("cached", "ran") for n in needs[stage.name]):
                    continue
                count = gpus_of(stage)
                if executor != "slurm" and count > len(free):
                    continue  # waits for GPUs; a later stage that fits may start first
                gpus, free = (free[:count], free[count:]) if executor != "slurm" else ([], free)
                quiet = [] if stage.args[0] == "export" else ["--trainer.enable_progress_bar=false"]
                own_root = any(w.startswith("--trainer.default_root_dir") for w in stage.args)
                if stage.args[0] != "export" and not own_root:
                    # stages running at once must not race for the same <root>/version_N: each logs under its own
                    # root (a recipe's own default_root_dir is replaced only in parallel runs)
                    quiet += ["--trainer.default_root_dir", f"{LOG_DIR}/runs/{_log_name(stage).removesuffix('.log')}"]
                log = workdir / LOG_DIR / _log_name(stage)
                print(f"{number[stage.name]}: lbgen {' '.join(stage.args)}  (log: {log})", flush=True)
                handle = launcher.start(stage, [*lbgen, *stage.args, *quiet], workdir, log, gpus, count)
                running.append(_Running(stage, handle, log, gpus))
                pending.remove(stage)
            for run in list(running):
                outcome = launcher.poll(run.handle)
                if outcome is None:
                    continue
                running.remove(run)
                code, reason = outcome
                seconds = round(time.perf_counter() - run.start, 1)
                name = run.stage.name
                if code == 0 and run.stage.is_done(workdir):
                    status[name] = "ran"
                    entries[name] = {"seconds": seconds, "started": run.started,
                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "log": run.log.relative_to(workdir).as_posix()}
                    record_stage(workdir / STAGES_FILE, name, entries[name])
                    print(f"{number[name]}: done in {seconds} s", flush=True)
                else:
                    status[name] = "failed"
                    why[name] = reason if code else f"finished without writing {run.stage.done}"
                    print(f"{number[name]}: FAILED ({why[name]}) after {seconds} s; its log {run.log} ends:\n"
                          f"{_tail(run.log)}", file=sys.stderr, flush=True)
            if running:
                time.sleep(launcher.poll_s)
    except BaseException:  # Ctrl-C or a bug here: leave no stage running without its runner
        for run in running:
            launcher.stop(run.handle)
        raise
    failed = [name for name, state in status.items() if state == "failed"]
    if failed:
        blocked = [name for name, state in status.items() if state == "blocked"]
        raise RuntimeError(
            "Stage " + "; ".join(f"{n} failed ({why[n]}, log: {workdir / LOG_DIR / _log_name(_named(stages, n))})"
                                 for n in failed)
            + (f". Not run because of that: {', '.join(blocked)}" if blocked else "")
            + ". The finished stages are kept: fix it and rerun.")
    return [{"name": s.name, "status": status[s.name], **entries.get(s.name, {})} for s in stages]


def _named(stages: list[Stage], name: str) -> Stage:
    return next(stage for stage in stages if stage.name == name)
