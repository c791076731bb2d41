"""``lbgen experiment --jobs N / --executor``: independent stages at once, dependants after their inputs, failures
stopping only what needs them, each stage's output in its own log; submitit's local executor for the SLURM path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lbgen.experiment import expand_stages, load_experiment
from lbgen.experiment import main as experiment_main
from lbgen.experiment_parallel import LOG_DIR, run_parallel, stage_dependencies

from .conftest import REPO

# a stand-in "lbgen": prints its words, fails on 'fail', checks that --in exists, sleeps --sleep seconds, then writes
# --out with its own start and end times and the GPUs it was given
FAKE_LBGEN = """\
import json, os, pathlib, sys, time
args = sys.argv[1:]
start = time.time()
print("stage words:", *args, flush=True)
if "fail" in args:
    print("boom: this stage fails", file=sys.stderr)
    sys.exit(3)
if "--in" in args and not pathlib.Path(args[args.index("--in") + 1]).is_file():
    sys.exit("its input is not there yet")
time.sleep(float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0)
out = pathlib.Path(args[args.index("--out") + 1])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"start": start, "end": time.time(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


@pytest.fixture
def fake_lbgen(tmp_path) -> list[str]:
    script = tmp_path / "fake_lbgen.py"
    script.write_text(FAKE_LBGEN)
    return [sys.executable, str(script)]


def _stage(name: str, words: str, done: str, **more) -> dict:
    return {"name": name, "run": f"fit {words} --out {done}", "done": done, **more}


def _times(work: Path, done: str) -> dict:
    return json.loads((work / done).read_text())


def test_dependencies_come_from_the_paths_a_stage_and_its_recipes_name(tmp_path):
    recipe = tmp_path / "generate.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"init_args": {"generator": {"init_args": {
        "model": "runs/embedded/gen"}}, "output_dir": "runs/synthetic/a"}}}))
    spec = {"stages": [
        {"name": "gen", "run": "fit --x runs/logs/gen", "done": "runs/embedded/gen/model_index.json"},
        {"name": "real", "run": "fit --trainer.default_root_dir runs/real", "done": "runs/real/version_0/m.json"},
        {"name": "synthetic", "run": f"predict -c {recipe}", "done": "runs/synthetic/a/manifest.jsonl"},
        {"name": "clip", "run": "fit", "done": "runs/embedded/clip/open_clip_config.json"},
        {"name": "mixed", "run": "fit --data.init_args.synthetic.init_args.folder=runs/synthetic/a",
         "done": "runs/mixed/version_0/m.json"},
        {"name": "score", "run": "predict --model local-dir:runs/embedded/clip --data \"[runs/real, ./runs/x]\"",
         "done": "runs/score/s.json"},
        {"name": "late", "run": "fit", "done": "runs/late/l.json", "after": ["re*"]}]}
    needs = stage_dependencies(expand_stages(spec), tmp_path)
    assert needs == {"gen": [], "real": [], "synthetic": ["gen"], "clip": [], "mixed": ["synthetic"],
                     "score": ["real", "clip"],  # a path above real's folder; local-dir: is not part of the path
                     "late": ["real"]}
    for bad, match in (({"after": ["nothing"]}, "after: 'nothing' names no earlier stage"),
                       ({"after": "gen"}, "after is a list"), ({"gpus": -1}, "gpus is a whole number")):
        with pytest.raises(ValueError, match=match):
            expand_stages({"stages": [spec["stages"][0], {**spec["stages"][1], **bad}]})


def test_the_benchmark_stages_wait_for_the_sets_and_models_they_read(tmp_path):
    stages = expand_stages(load_experiment(REPO / "configs/experiments/fashion_5shot.yaml"))
    needs = stage_dependencies(stages, tmp_path)
    assert needs["vae"] == needs["classifier-real_only"] == needs["oracle"] == [] and needs["clip"] == []
    assert "generator" in needs["generate-txt2img"] and "vae" in needs["generator"]
    assert "generate-genie" in needs["classifier-genie"] and "generate-bob" not in needs["classifier-genie"]
    assert {"oracle", "clip", "generate-bob"} <= set(needs["score-bob"])
    assert {"generator", "clip", "quality"} <= set(needs["lbgen-lora"]) and "lbgen-lora" in needs["generate-lbgen"]


def test_stages_whose_done_files_share_a_folder_wait_only_for_the_file_they_read(tmp_path):
    stages = expand_stages(load_experiment(REPO / "configs/experiments/transfer_study.yaml"))
    needs = stage_dependencies(stages, tmp_path)
    # the backbones (and the probe results) share one folder each: a probe waits for its own backbone only
    assert needs["probe-txt2img-s0-digits"] == ["pretrain-txt2img-s0"]
    assert needs["pretrain-real-s1"] == [] and needs["pretrain-txt2img-s2"] == ["generate-txt2img"]
    assert set(needs["generate-lbgen_aligned"]) == {"lbgen-aligned"}


def test_independent_stages_run_at_once_and_a_dependant_waits_for_its_input(tmp_path, fake_lbgen):
    spec = {"stages": [_stage("a", "--sleep 1.5", "r/a/done.json"), _stage("b", "--sleep 1.5", "r/b/done.json"),
                       _stage("c", "--in r/a/done.json", "r/c/done.json")]}
    work = tmp_path / "work"
    results = run_parallel(expand_stages(spec), work, fake_lbgen, jobs=3)
    assert [r["status"] for r in results] == ["ran", "ran", "ran"]
    a, b, c = (_times(work, f"r/{n}/done.json") for n in "abc")
    assert max(a["start"], b["start"]) < min(a["end"], b["end"])  # a and b overlapped
    assert c["start"] >= a["end"]  # c read a's output, so it started after a had finished
    log = json.loads((work / "stages.json").read_text())
    assert set(log) == {"a", "b", "c"}
    assert all({"seconds", "started", "finished", "log"} <= set(entry) for entry in log.values())
    assert "stage words: fit --sleep 1.5 --out r/a/done.json" in (work / log["a"]["log"]).read_text()
    again = run_parallel(expand_stages(spec), work, fake_lbgen, jobs=3)  # cached, as one after the other
    assert [r["status"] for r in again] == ["cached"] * 3 and again[0]["seconds"] == log["a"]["seconds"]


def test_a_failed_stage_stops_its_dependants_and_the_others_finish(tmp_path, fake_lbgen, capsys):
    spec = {"stages": [_stage("bad", "fail", "r/bad/done"), _stage("needs-bad", "--in r/bad/done", "r/nb/done"),
                       _stage("needs-that", "--in r/nb/done", "r/nt/done"), _stage("other", "--sleep 0.5", "r/o/x")]}
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match=r"Stage bad failed \(exit code 3, log: .*bad.log\)\. Not run because of "
                                           r"that: needs-bad, needs-that\."):
        run_parallel(expand_stages(spec), work, fake_lbgen, jobs=2)
    assert (work / "r/o/x").is_file() and not (work / "r/nb").exists()
    assert "boom: this stage fails" in (work / LOG_DIR / "bad.log").read_text()
    err = capsys.readouterr()
    assert "boom: this stage fails" in err.err  # the end of the failed stage's log is shown
    assert "needs-that: not run: it needs needs-bad, which was not run" in err.out
    assert set(json.loads((work / "stages.json").read_text())) == {"other"}


def test_each_stage_gets_gpus_of_its_own(tmp_path, fake_lbgen, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    spec = {"stages": [_stage(f"s{i}", "--sleep 0.5", f"r/s{i}/done.json") for i in range(3)]}
    spec["stages"][2]["gpus"] = 2
    work = tmp_path / "work"
    run_parallel(expand_stages(spec), work, fake_lbgen, jobs=3, resources={"gpus_per_stage": 1})
    given = [_times(work, f"r/s{i}/done.json")["gpus"] for i in range(3)]
    assert sorted(given[:2]) == ["3", "5"] and len(given[2].split(",")) == 2  # s2 waited for two free GPUs
    with pytest.raises(ValueError, match="asks for 4 GPUs but this machine shows 3"):
        run_parallel(expand_stages({"stages": [_stage("big", "", "r/big/d", gpus=4)]}), work, fake_lbgen, jobs=2)


def test_submitit_local_executor_runs_a_stage_and_checks_the_slurm_parameters(tmp_path, fake_lbgen):
    spec = {"stages": [_stage("one", "--sleep 0.1", "r/one/done.json")]}
    work = tmp_path / "work"
    resources = {"time_min": 5, "cpus_per_stage": 1, "slurm": {"partition": "gpu", "account": "lab"}}
    results = run_parallel(expand_stages(spec), work, fake_lbgen, jobs=1, executor="submitit-local",
                           resources=resources)
    assert results[0]["status"] == "ran" and (work / "r/one/done.json").is_file()
    assert "stage words: fit" in (work / LOG_DIR / "one.log").read_text() and (work / "submitit").is_dir()
    spec["stages"][0]["done"] = "r/two/done.json"
    with pytest.raises(ValueError, match="resources.slurm: .*partitionn"):
        run_parallel(expand_stages(spec), work, fake_lbgen, jobs=1, executor="submitit-local",
                     resources={"slurm": {"partitionn": "gpu"}})


def test_experiment_options_and_the_resources_section(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"resources": {"gpus_per_stage": 1, "slurm": {"partition": "p"}}, "stages": [
        _stage("a", "", "r/a/d"), _stage("b", "--in r/a/d", "r/b/d")]}))
    experiment_main([str(path), "--workdir", str(tmp_path / "w"), "--jobs", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert "[2/2] b: would run lbgen fit --in r/a/d --out r/b/d (after a)" in out
    for words, match in ((["--jobs", "2", "--in-process"], "--in-process runs"), (["--jobs", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            experiment_main([str(path), "--workdir", str(tmp_path / "w"), *words])
        assert match in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"resources": {"gpu_per_stage": 1}, "stages": []}))
    with pytest.raises(ValueError, match="resources maps"):
        load_experiment(path)


@pytest.mark.slow
def test_a_real_stage_through_submitit_local_from_the_command(tmp_path, fmnist_fixture):
    recipe = REPO / "configs/classifier/fashion_5shot.yaml"
    tiny = (f"--data.init_args.root {fmnist_fixture} --data.init_args.image_size 16 --data.init_args.val_per_class 2 "
            "--data.init_args.samples_per_epoch 16 --data.init_args.batch_size 8 --model.init_args.backbone.init_args."
            "model_name test_resnet --trainer.max_steps 2 --trainer.accelerator cpu")
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"resources": {"time_min": 10}, "stages": [
        {"name": "c", "run": f"fit -c {recipe} {tiny} --trainer.default_root_dir runs/c",
         "done": "runs/c/version_0/test_metrics.json"}]}))
    work = tmp_path / "work"
    experiment_main([str(path), "--workdir", str(work), "--executor", "submitit-local"])
    assert (work / "runs/c/version_0/test_metrics.json").is_file()
    assert "Run directory:" in (work / LOG_DIR / "c.log").read_text()
    assert json.loads((work / "stages.json").read_text())["c"]["log"] == f"{LOG_DIR}/c.log"
