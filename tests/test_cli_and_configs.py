"""The `lbgen` command and every recipe in configs/, driven through the same LightningCLI a user runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lbgen.cli import cli_main

from .conftest import OVERLAY_MARK, REPO, load_recipe, overlay_base, recipe_chain, run_recipe, stage_of

CONFIG_ROOT = REPO / "configs"
# experiment files (a list of stages, not a recipe) are expanded and checked in test_experiment.py
EXPERIMENT_FOLDERS = ("experiments", "exchange_rate")
ALL_YAML = sorted(CONFIG_ROOT.rglob("*.yaml"))
CONFIGS = [p for p in ALL_YAML if p.relative_to(CONFIG_ROOT).parts[0] not in EXPERIMENT_FOLDERS]


def _name(path: Path) -> str:
    return path.relative_to(CONFIG_ROOT).as_posix()


def assert_contains(actual, expected, where: str = "config") -> None:
    """Every key and value of ``expected`` is in ``actual`` (which may hold more keys: defaults)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not a mapping"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} is missing"
            assert_contains(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_contains(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_every_yaml_is_a_recipe_or_an_experiment_and_every_overlay_has_its_base():
    # every file in configs/ is exercised: the recipes here (test_config_parses_and_runs_fast_dev_run), the
    # experiments in test_experiment.py (every file of these folders)
    assert len(CONFIGS) >= 40 and {_name(p) for p in CONFIGS} >= {
        "classifier/fashion_5shot.yaml", "generate/fashion_txt2img.yaml", "foundation/fashion_generator.yaml",
        "finetune/datadream.yaml"}
    assert not (CONFIG_ROOT / "generator").exists(), "configs/generator/ became configs/foundation/ and finetune/"
    for path in ALL_YAML:
        tree = yaml.safe_load(path.read_text()) or {}
        is_experiment = "stages" in tree or "extends" in tree
        assert is_experiment == (path not in CONFIGS), f"{_name(path)}: an experiment outside {EXPERIMENT_FOLDERS}?"
    for path in CONFIGS:
        text = path.read_text()
        base = overlay_base(path)
        if base is None:  # a base recipe: complete
            tree = yaml.safe_load(text)
            assert "class_path" in tree["model"] and "class_path" in tree["data"], _name(path)
            assert "lbgen-test: overlay-of" not in text, f"{_name(path)}: the overlay-of line must come first"
            continue
        assert text.startswith(OVERLAY_MARK.search(text).group(0)), f"{_name(path)}: overlay-of is not its first line"
        assert base.is_file(), f"{_name(path)} is an overlay of {base.relative_to(CONFIG_ROOT)}, which does not exist"
        assert base in CONFIGS, f"{_name(path)}: its base {_name(base)} is not a recipe"
        chain = recipe_chain(path)  # ends in a complete recipe, no cycle
        assert overlay_base(chain[0]) is None and chain[-1] == path
        # the header's command reads the whole chain, in order
        command = " ".join(f"-c configs/{_name(p)}" for p in chain)
        assert command in " ".join(line.lstrip("# ").rstrip(" \\") for line in text.splitlines()
                                   if line.startswith("#")), f"{_name(path)}: its header does not say {command}"


def test_overlays_of_a_new_class_keep_only_the_arguments_it_accepts():
    # load_recipe merges as the CLI: contextual_generator.yaml swaps the embedded generator's FashionMNISTDataModule
    # for the caption wrapper, which has no image_size
    data = load_recipe(CONFIG_ROOT / "foundation/contextual_generator.yaml")["data"]
    assert data["class_path"].endswith("AttributeCaptionedDataModule")
    assert "image_size" not in data["init_args"] and data["init_args"]["data"]["init_args"]["image_size"] == 32
    # the same class: everything of the base kept
    real = load_recipe(CONFIG_ROOT / "classifier/fashion_contextual_5shot.yaml")["data"]["init_args"]
    assert real["image_size"] == 64 and real["samples_per_epoch"] == 640 and real["bias"] == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("config_path", CONFIGS, ids=_name)
def test_config_parses_and_runs_fast_dev_run(config_path, recipe_paths, tmp_path, capsys):
    stage = stage_of(config_path)
    chain = [word for path in recipe_chain(config_path) for word in ("-c", str(path))]
    with pytest.raises(SystemExit) as done:
        cli_main([stage, *chain, "--print_config"])
    assert done.value.code == 0
    # what the CLI resolves holds every value the files give, so load_recipe (what every recipe test runs) is the
    # recipe a user runs
    assert_contains(yaml.safe_load(capsys.readouterr().out), load_recipe(config_path), _name(config_path))
    # no recipe is only parsed: the real-scale ones run on the SD-shaped tiny generator at 256 px (conftest's shrink)
    assert "lbgen-test: parse-only" not in config_path.read_text(), f"{_name(config_path)}: run it, do not skip it"
    cli = run_recipe(config_path, {**recipe_paths, "out": tmp_path}, "--trainer.fast_dev_run=true")
    assert cli.trainer.state.finished
    if stage == "fit":  # it trained (then maybe tested: test_after_fit)
        assert cli.trainer.global_step > 0 and cli.trainer.state.fn in ("fit", "test")
    else:
        assert cli.trainer.state.fn == "predict"
    if getattr(cli.model, "num_classes", None) is not None:
        assert cli.model.num_classes == cli.datamodule.num_classes  # linked from the data


def test_fit_then_test_writes_a_complete_run_directory(recipe_paths, tmp_path):
    config = REPO / "configs/classifier/fashion_5shot.yaml"
    paths = {**recipe_paths, "out": tmp_path}
    run_recipe(config, paths, "--trainer.max_steps=4", "--trainer.check_val_every_n_epoch=1")
    run = tmp_path / "version_0"
    for name in ("config.yaml", "splits.json", "metrics.csv", "test_metrics.json", "confusion_matrix.json"):
        assert (run / name).is_file(), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["init_args"]["root"] == str(recipe_paths["fmnist"])  # the resolved config
    assert resolved["trainer"]["max_steps"] == 4  # command-line overrides included
    assert json.loads((run / "splits.json").read_text())["train_class_counts"] == [5] * 10
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    metrics = json.loads((run / "test_metrics.json").read_text())
    matrix = json.loads((run / "confusion_matrix.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == 60  # every test image of the fixture counted once
    # a later `lbgen test` of the checkpoint gets a run directory of its own and the same accuracy
    cli_main(["test", "-c", str(run / "config.yaml"), f"--ckpt_path={checkpoint}"])
    retest = json.loads((tmp_path / "version_1" / "test_metrics.json").read_text())
    assert retest["acc"] == pytest.approx(metrics["acc"])


def _lbgen(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lbgen")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_console_script_help_and_errors():
    done = _lbgen("--help")
    assert done.returncode == 0
    for stage in ("fit", "validate", "test", "predict"):
        assert f"\n  {stage} " in done.stdout
    bad = _lbgen("fit", "-c", str(REPO / "configs/classifier/fashion_5shot.yaml"), "--data.init_args.shotz=5")
    assert bad.returncode != 0 and "shotz" in bad.stderr
