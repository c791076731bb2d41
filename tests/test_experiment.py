"""``lbgen experiment``: stages in order, cached, failing loudly; the report's table, intervals and plots."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from lbgen.evaluation.fewshot import mean_ci
from lbgen.evaluation.report import write_report
from lbgen.experiment import expand_stages, load_experiment, missing_inputs, run_stages
from lbgen.experiment import main as experiment_main

from .conftest import REPO, overlay_base


def test_stages_expand_in_order_with_placeholders(tmp_path):
    spec = {"stages": [{"name": "a", "run": "fit -c {configs}/x.yaml", "done": "a.txt"},
                       {"name": "b-{m}-{seed}", "for_each": {"m": ["p", "q"], "seed": [0, 1]},
                        "run": ["predict", "--out", "runs/{m}/{seed}"], "done": "runs/{m}/{seed}/done"}]}
    stages = expand_stages(spec, configs=Path("/cfg"))
    assert [s.name for s in stages] == ["a", "b-p-0", "b-p-1", "b-q-0", "b-q-1"]
    assert stages[0].args == ("fit", "-c", "/cfg/x.yaml") and stages[3].args == ("predict", "--out", "runs/q/0")
    for bad, match in (({"name": "x", "run": "fit", "done": "d", "oops": 1}, "unknown keys"),
                       ({"name": "x", "run": "fit {nope}", "done": "d"}, "unknown placeholder"),
                       ({"name": "x", "run": "train -c y", "done": "d"}, "lbgen subcommand"),
                       ({"name": "x", "run": "fit"}, "needs name, run and done")):
        with pytest.raises(ValueError, match=match):
            expand_stages({"stages": [bad]})
    with pytest.raises(ValueError, match="duplicate"):
        expand_stages({"stages": [{"name": "x", "run": "fit", "done": "d"}] * 2})


EXPERIMENTS = sorted([*(REPO / "configs/experiments").glob("*.yaml"), *(REPO / "configs/exchange_rate").glob("*.yaml")])


def test_every_experiment_file_expands():
    assert {p.name for p in EXPERIMENTS} >= {"fashion_5shot.yaml", "quickstart.yaml", "fashion.yaml"}
    for path in EXPERIMENTS:
        stages = expand_stages(load_experiment(path))
        assert stages, path
        for stage in stages:  # every recipe a stage names exists, and an overlay comes after its base
            recipes = [Path(word) for word in stage.args if word.endswith(".yaml")]
            for i, recipe in enumerate(recipes):
                assert recipe.is_file(), f"{path.name}: {stage.name} names {recipe}"
                base = overlay_base(recipe)
                assert base is None or base in recipes[:i], (
                    f"{path.name}: {stage.name} reads the overlay {recipe.name} without its base {base} before it")


def _write(folder: Path, name: str, spec: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


BASE_EXPERIMENT = {
    "name": "base", "needs": ["runs/x/done"],
    "stages": [{"name": "prep", "run": "fit -c {configs}/a.yaml --trainer.max_steps 100", "done": "runs/prep"},
               {"name": "gen-{m}", "for_each": {"m": ["p", "q", "r"]}, "run": "predict -c {configs}/g_{m}.yaml",
                "done": "runs/gen/{m}"},
               {"name": "seeds-s{s}", "for_each": {"s": [0, 1]}, "run": "fit --seed_everything {s}",
                "done": "runs/seeds/{s}"}],
    "report": {"baseline": "real", "accuracy": [{"label": "real", "runs": "runs/prep"}]}}


def test_an_overlay_experiment_selects_overrides_and_inherits_the_base(tmp_path):
    _write(tmp_path, "base.yaml", BASE_EXPERIMENT)
    overlay = _write(tmp_path, "short.yaml", {
        "extends": "base.yaml", "drop": ["gen-q", "seeds-*"],
        "overrides": {"prep": "--trainer.max_steps 10 -c {configs}/half.yaml", "gen-*": ["--data.n", "4"]},
        "stages": [{"name": "extra", "run": "test -c {configs}/t.yaml", "done": "runs/extra"}]})
    spec = load_experiment(overlay)
    stages = expand_stages(spec, configs=Path("/cfg"))
    assert [s.name for s in stages] == ["prep", "gen-p", "gen-r", "extra"]  # the base's order, then its own
    assert stages[0].args == ("fit", "-c", "/cfg/a.yaml", "--trainer.max_steps", "100", "--trainer.max_steps", "10",
                              "-c", "/cfg/half.yaml")  # appended: later words win
    assert stages[2].args == ("predict", "-c", "/cfg/g_r.yaml", "--data.n", "4") and stages[2].done == "runs/gen/r"
    assert stages[3].args == ("test", "-c", "/cfg/t.yaml")
    # name, needs and report inherited; the base file untouched
    assert spec["name"] == "base" and spec["needs"] == ["runs/x/done"] and spec["report"] == BASE_EXPERIMENT["report"]
    assert [s.name for s in expand_stages(load_experiment(tmp_path / "base.yaml"))][1:4] == ["gen-p", "gen-q", "gen-r"]
    # `only` keeps the named stages; its own report replaces the base's; an overlay of an overlay
    _write(tmp_path, "only.yaml", {"extends": "short.yaml", "only": ["gen-r", "extra"], "report": {"baseline": "x"}})
    spec = load_experiment(tmp_path / "only.yaml")
    assert [s.name for s in expand_stages(spec)] == ["gen-r", "extra"] and spec["report"] == {"baseline": "x"}
    assert expand_stages(spec)[0].args[-2:] == ("--data.n", "4")  # the middle overlay's override kept


@pytest.mark.parametrize(("overlay", "match"), [
    ({"drop": ["gen-x"]}, r"drop: 'gen-x' is not a stage of the base experiment \(its stages: prep, gen-p"),
    ({"only": ["nothing-*"]}, "only: 'nothing-\\*' is not a stage"),
    ({"overrides": {"prepp": "--x 1"}}, r"overrides\['prepp'\]: no stage of that name"),
    ({"drop": ["gen-q"], "overrides": {"gen-q": "--x 1"}}, r"overrides\['gen-q'\]: gen-q left out by only / drop"),
    ({"only": ["prep"], "drop": ["gen-p"]}, "give only .* or drop .*, not both"),
    ({"drop": "gen-p"}, "drop is a list of stage names"),
    ({"overrides": ["prep"]}, "overrides maps stage names"),
    ({"stages": [{"name": "prep", "run": "fit", "done": "d"}]}, "duplicate stage name 'prep'"),
    ({"overrides": {"prep": "--x {nope}"}}, "unknown placeholder"),
])
def test_an_overlay_naming_an_unknown_stage_is_refused_with_the_file_named(tmp_path, overlay, match):
    _write(tmp_path, "base.yaml", BASE_EXPERIMENT)
    path = _write(tmp_path, "bad.yaml", {"extends": "base.yaml", **overlay})
    with pytest.raises(ValueError, match=match) as refused:
        load_experiment(path)
    assert str(refused.value).startswith(str(path))


def test_overlay_keys_need_a_base_and_bases_must_exist_without_cycles(tmp_path):
    with pytest.raises(ValueError, match="name it with extends"):
        load_experiment(_write(tmp_path, "a.yaml", {"stages": [], "drop": ["x"]}))
    with pytest.raises(FileNotFoundError, match="missing.yaml .*extended by"):
        load_experiment(_write(tmp_path, "b.yaml", {"extends": "missing.yaml"}))
    _write(tmp_path, "c.yaml", {"extends": "d.yaml"})
    with pytest.raises(ValueError, match="circle"):
        load_experiment(_write(tmp_path, "d.yaml", {"extends": "c.yaml"}))
    with pytest.raises(ValueError, match="load_experiment"):  # a spec given as a dict names no file to read
        expand_stages({"extends": "base.yaml"})


def test_the_quickstart_is_the_benchmark_with_fewer_stages_and_shorter_schedules():
    benchmark = {s.name: s for s in expand_stages(load_experiment(REPO / "configs/experiments/fashion_5shot.yaml"))}
    quick = expand_stages(load_experiment(REPO / "configs/experiments/quickstart.yaml"))
    assert len(quick) == 28 and not [s for s in quick if s.name.startswith("seeds-") or "img2img_low" in s.name]
    for stage in quick:  # the benchmark's command, then the overrides; the same done file
        base = benchmark[stage.name]
        assert stage.args[:len(base.args)] == base.args and stage.done == base.done
    by_name = {s.name: s for s in quick}
    assert by_name["vae"].args[-4:] == ("--trainer.max_steps", "150", "--trainer.val_check_interval", "75")
    assert by_name["classifier-bob"].args[-4:-2] == ("-c", str(REPO / "configs/classifier/half_width.yaml"))
    assert by_name["score-bob"].args == benchmark["score-bob"].args  # no override


def test_every_dataset_a_stage_reads_is_made_before_it_or_needed():
    # a stage reading a generated set that nothing makes fails only after hours of earlier stages: caught here
    for path in EXPERIMENTS:
        spec = load_experiment(path)
        stages, needs = expand_stages(spec), spec.get("needs", [])
        for i, stage in enumerate(stages):
            made = [Path(s.done).parent.as_posix() for s in stages[:i]] + [Path(n).parent.as_posix() for n in needs]
            for key, value in zip(stage.args, stage.args[1:], strict=False):
                if key.endswith("init_args.folder") and value.startswith("runs/"):
                    assert value in made, f"{path.name}: {stage.name} reads {value}, which no earlier stage makes"


def test_missing_needs_stop_the_experiment_before_any_stage(tmp_path, capsys):
    spec_file = tmp_path / "x.yaml"
    spec_file.write_text(yaml.safe_dump({"needs": ["runs/embedded/generator/model_index.json"], "stages": [
        {"name": "one", "run": "fit --trainer.max_steps 1", "done": "r/one"}]}))
    with pytest.raises(SystemExit, match="needs runs/embedded/generator/model_index.json"):
        experiment_main([str(spec_file), "--workdir", str(tmp_path / "work")])
    assert not (tmp_path / "work" / "stages.json").exists()
    experiment_main([str(spec_file), "--workdir", str(tmp_path / "work"), "--dry-run"])  # lists, does not stop
    assert "missing inputs (needs): runs/embedded/generator/model_index.json" in capsys.readouterr().out
    assert missing_inputs(load_experiment(spec_file), tmp_path) == ["runs/embedded/generator/model_index.json"]
    spec_file.write_text(yaml.safe_dump({"needs": "runs/x", "stages": []}))
    with pytest.raises(ValueError, match="needs is a list"):
        load_experiment(spec_file)


def test_runner_skips_done_stages_and_stops_on_failure(tmp_path):
    # a stand-in "lbgen": writes the file named after --out, or fails when asked to
    fake = tmp_path / "fake_lbgen.py"
    fake.write_text("import sys, pathlib, json\nargs = sys.argv[1:]\nif 'fail' in args: sys.exit(3)\n"
                    "out = pathlib.Path(args[args.index('--out') + 1]); out.parent.mkdir(parents=True, exist_ok=True)\n"
                    "out.write_text(' '.join(args))\n"
                    # 'meddle': another experiment in the same workdir records a stage while this one runs
                    "if 'meddle' in args:\n    log = pathlib.Path('stages.json')\n"
                    "    entries = json.loads(log.read_text()); entries['other'] = {'seconds': 1.0}\n"
                    "    log.write_text(json.dumps(entries))\n")
    spec = {"stages": [{"name": "one", "run": "fit --out r/one", "done": "r/one"},
                       {"name": "two", "run": "fit --out r/two", "done": "r/two"}]}
    work = tmp_path / "work"
    results = run_stages(expand_stages(spec), work, [sys.executable, str(fake)])
    assert [r["status"] for r in results] == ["ran", "ran"] and (work / "r/two").is_file()
    (work / "r/two").unlink()
    results = run_stages(expand_stages(spec), work, [sys.executable, str(fake)])
    assert [r["status"] for r in results] == ["cached", "ran"]  # only the missing one again
    assert set(json.loads((work / "stages.json").read_text())) == {"one", "two"}
    meddled = {"stages": [{"name": "three", "run": "fit meddle --out r/three", "done": "r/three"}]}
    run_stages(expand_stages(meddled), work, [sys.executable, str(fake)])
    assert set(json.loads((work / "stages.json").read_text())) == {"one", "two", "other", "three"}
    failing = {"stages": [{"name": "bad", "run": "fit fail --out r/bad", "done": "r/bad"},
                          {"name": "after", "run": "fit --out r/after", "done": "r/after"}]}
    with pytest.raises(RuntimeError, match="Stage bad failed .*exit code 3"):
        run_stages(expand_stages(failing), work, [sys.executable, str(fake)])
    assert not (work / "r/after").exists()
    silent = {"stages": [{"name": "silent", "run": "fit --out r/elsewhere", "done": "r/expected"}]}
    with pytest.raises(RuntimeError, match="without writing r/expected"):
        run_stages(expand_stages(silent), work, [sys.executable, str(fake)])


def _tested_run(root: Path, version: int, acc: float) -> None:
    folder = root / f"version_{version}"
    folder.mkdir(parents=True)
    (folder / "test_metrics.json").write_text(json.dumps({"acc": acc}))


def test_report_table_intervals_and_plots(tmp_path):
    for seed, acc in enumerate((0.60, 0.62, 0.64)):
        _tested_run(tmp_path / f"runs/real/s{seed}", 0, acc)
    for seed, acc in enumerate((0.70, 0.71, 0.75)):
        _tested_run(tmp_path / f"runs/genie/s{seed}", 0, acc)
    (tmp_path / "runs/syn/genie").mkdir(parents=True)
    (tmp_path / "runs/syn/genie/label_consistency.json").write_text(json.dumps(
        {"overall": 0.8, "n": 10, "per_class": {"a": 0.9, "b": 0.7}, "per_setting": {"genie@0.8": 0.8}}))
    spec = yaml.safe_load("""
baseline: real
accuracy:
  - {label: real, runs: "runs/real/s*"}
  - {label: genie, runs: "runs/genie/s*"}
  - {label: missing, runs: "runs/none/s*"}
synthetic_per_class:
  - {label: genie, points: {0: "runs/real/s*", 100: "runs/genie/s*"}}
noise_ratio:
  accuracy: {0.8: "runs/genie/s*"}
  consistency: {0.8: runs/syn/genie}
consistency:
  - {label: genie, folder: runs/syn/genie}
  - {label: unscored, folder: runs/syn/other}
more_accuracy:
  - title: Seed 0
    baseline: real
    rows: [{label: real, runs: runs/real/s0}, {label: genie, runs: runs/genie/s0}]
""")
    text = write_report(spec, tmp_path, title="t").read_text()
    mean, half = mean_ci([70.0, 71.0, 75.0])
    # seed by seed (s0-s2 in both): 10, 9, 11 points above real
    paired, paired_half = mean_ci([10.0, 9.0, 11.0])
    assert (f"| genie | **{mean:.2f} ± {half:.2f}** | +{mean - 62.0:.2f} | +{paired:.2f} ± {paired_half:.2f} (3) | 3 |"
            in text)
    assert "| missing | - | - | - | 0 |" in text and "| unscored | not scored |" in text
    assert "| genie | 80.0 | b (70%) | 10 |" in text
    assert "## Seed 0" in text and "| genie | **70.00** | +10.00 | 1 |" in text
    for png in ("report_accuracy_vs_synthetic.png", "report_noise_ratio.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"![]({png})" in text


def test_report_long_tail_buckets_and_fewshot_episodes(tmp_path):
    for seed, (few, many) in enumerate(((0.2, 0.9), (0.4, 0.8))):
        run = tmp_path / f"runs/lt/s{seed}/version_0"
        run.mkdir(parents=True)
        run.joinpath("test_metrics.json").write_text(json.dumps({"acc": 0.7, "acc_many": many, "acc_few": few}))
    (tmp_path / "runs/fs").mkdir(parents=True)
    (tmp_path / "runs/fs/b.json").write_text(json.dumps({"n_way": 5, "results": [
        {"k_shot": 1, "synthetic_per_class": 10, "mean": 61.5, "ci95": 0.8, "episodes": 600}]}))
    spec = {"long_tail": [{"label": "lt", "runs": "runs/lt/s*"}],
            "fewshot": [{"label": "b", "file": "runs/fs/b.json"}, {"label": "none", "file": "runs/fs/x.json"}]}
    text = write_report(spec, tmp_path).read_text()
    few = mean_ci([20.0, 40.0])
    many = mean_ci([90.0, 80.0])
    assert f"| lt | 70.00 ± 0.00 | {many[0]:.2f} ± {many[1]:.2f} | - | {few[0]:.2f} ± {few[1]:.2f} | 2 |" in text
    assert "| b | 5 | 1 | 10 | 61.50 ± 0.80 | 600 |" in text and "| none | not run |" in text


def test_report_exchange_rate_recovers_the_law_from_classifier_runs(tmp_path):
    import math

    c1, c2, k = 0.9, 3.0, 10.0

    def accuracy(images_per_class: float) -> float:  # a saturating learning curve
        return 0.95 - 0.6 * math.exp(-images_per_class / 40)

    bases = []
    for n_base in (10, 20, 40):
        real = {}
        for added in range(0, 201, 10):
            _tested_run(tmp_path / f"xr/b{n_base}/real{added}", 0, accuracy(n_base + added))
            real[added] = f"xr/b{n_base}/real{added}"
        syn = {}
        for n_syn in (20, 50, 100):
            worth = n_base * math.log(1 + n_syn / (n_base * c1 ** (n_base / k))) / math.log(c2)
            _tested_run(tmp_path / f"xr/b{n_base}/syn{n_syn}", 0, accuracy(n_base + worth))
            syn[n_syn] = f"xr/b{n_base}/syn{n_syn}"
        bases.append({"n_base": n_base, "real": real, "synthetic": {"closed": syn}})
    text = write_report({"exchange_rate": {"classes": k, "bases": bases}}, tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| closed |"))
    fitted_c1, fitted_c2 = (float(cell.split()[0]) for cell in row.split("|")[2:4])
    assert fitted_c1 == pytest.approx(c1, rel=0.05) and fitted_c2 == pytest.approx(c2, rel=0.05)
    assert (tmp_path / "report_exchange_rate.png").is_file() and row.endswith("| 9 |")


def test_in_process_runner_runs_real_stages_and_reports_failures(tmp_path, fmnist_fixture, monkeypatch):
    recipe = REPO / "configs/classifier/fashion_5shot.yaml"
    tiny = (f"--data.init_args.root {fmnist_fixture} --data.init_args.image_size 16 --data.init_args.val_per_class 2 "
            "--data.init_args.samples_per_epoch 16 --data.init_args.batch_size 8 --model.init_args.backbone.init_args."
            "model_name test_resnet --trainer.max_steps 2 --trainer.accelerator cpu")
    spec = {"stages": [{"name": "c-{seed}", "for_each": {"seed": [0, 1]},
                        "run": f"fit -c {recipe} {tiny} --data.init_args.split_seed {{seed}} "
                               "--trainer.default_root_dir runs/c{seed}",
                        "done": "runs/c{seed}/version_0/test_metrics.json"}]}
    argv = ["lbgen", "experiment", "some.yaml", "--in-process"]  # what the runner's own process was started with
    monkeypatch.setattr(sys, "argv", list(argv))
    work, here = tmp_path / "work", Path.cwd()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_stages(expand_stages(spec), work, [], in_process=True)
    assert [r["status"] for r in results] == ["ran", "ran"] and Path.cwd() == here and sys.argv == argv
    # each stage is parsed as its own command line, not next to the experiment's own words
    assert not [w for w in caught if "args parameter" in str(w.message)]
    for seed in (0, 1):  # each stage read its own arguments
        config = yaml.safe_load((work / f"runs/c{seed}/version_0/config.yaml").read_text())
        assert config["data"]["init_args"]["split_seed"] == seed
    bad = {"stages": [{"name": "bad", "run": f"fit -c {recipe} --trainer.no_such_option 1", "done": "never"}]}
    with pytest.raises(RuntimeError, match="Stage bad failed"):
        run_stages(expand_stages(bad), work, [], in_process=True)
    assert Path.cwd() == here


def test_report_lists_only_the_experiments_own_stages(tmp_path):
    # two experiments share a workdir and its stages.json: each report's stage table names its own stages only
    log = {"a": {"seconds": 60.0, "finished": "t1"}, "other": {"seconds": 600.0, "finished": "t2"},
           "b": {"seconds": 30.0, "finished": "t3"}}
    (tmp_path / "stages.json").write_text(json.dumps(log))
    stages = tmp_path / "stages.json"
    text = write_report({}, tmp_path, stages_file=stages, stage_names=["a", "b", "not-run"]).read_text()
    assert "| a | 60.0 | t1 |" in text and "| b | 30.0 | t3 |" in text and "| other |" not in text
    assert "2 stages were run" in text and "1.5 min of stage time" in text
    everything = write_report({}, tmp_path, stages_file=tmp_path / "stages.json").read_text()
    assert "| other | 600.0 | t2 |" in everything and "3 stages were run" in everything


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_report_renders_before_anything_ran(path, tmp_path):
    # a report spec with a misnamed key fails only after hours of stages otherwise
    spec = load_experiment(path).get("report") or {}
    report = write_report(spec, tmp_path, title=path.stem)
    assert report.is_file() and report.read_text().startswith("#")


@pytest.mark.slow
def test_every_kind_of_stage_command_parses(tmp_path, monkeypatch):
    # a misnamed or unparsable flag in a stage fails only when the stage runs, hours into an experiment: every
    # distinct stage shape (subcommand, recipes, option names) of every experiment file is parsed here
    from lbgen.cli import cli_main

    shapes: dict[tuple, tuple[str, ...]] = {}
    for path in EXPERIMENTS:
        for stage in expand_stages(load_experiment(path)):
            if stage.args[0] not in ("fit", "validate", "test", "predict"):
                continue
            options = tuple(w.split("=")[0] for w in stage.args if w.startswith("--"))
            recipes = tuple(w for w in stage.args if w.endswith(".yaml"))
            shapes.setdefault((stage.args[0], recipes, options), stage.args)
    assert len(shapes) > 20
    monkeypatch.chdir(tmp_path)  # parsing reads nothing from the workdir; nothing may be written either
    failed = []
    for args in shapes.values():
        try:
            cli_main([*args, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                failed.append(" ".join(args))
    assert not failed, "stage commands that do not parse:\n" + "\n".join(failed)


def test_a_report_row_whose_label_lost_half_to_an_unquoted_comma_is_refused(tmp_path):
    spec = yaml.safe_load("accuracy:\n  - {label: + txt2img, hard CLIP filter, runs: runs/x}\n")
    with pytest.raises(ValueError, match="quote a label"):
        write_report(spec, tmp_path)
    spec = yaml.safe_load('cards:\n  - {label: "retrieval (100, seed 0)", folder: runs/x}\n')
    assert "| retrieval (100, seed 0) | no card |" in write_report(spec, tmp_path).read_text()
