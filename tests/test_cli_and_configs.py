"""The `lbgen` command and every recipe in configs/, driven through the same LightningCLI a user runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lbgen.cli import cli_main

from .conftest import REPO
from .test_alignment_components import TINY_CLIP

# experiment files (a list of stages, not a recipe) are expanded and checked in test_experiment.py
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "stages" not in (yaml.safe_load(p.read_text()) or {}))


TINY_NEW_GENERATOR = {"image_size": 16, "vae_channels": [16, 32], "latent_channels": 4, "unet_channels": [16, 32],
                      "cross_attention_dim": 16, "attention_head_dim": 4, "text_layers": 1, "text_heads": 2,
                      "max_prompt_length": 16}


def shrink(node, paths: dict[str, Path]):
    """A copy of a recipe's tree where every heavy or external part is replaced by its tiny test stand-in."""
    if isinstance(node, list):
        return [shrink(v, paths) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: shrink(v, paths) for k, v in node.items()}
    cls, args = node.get("class_path", ""), node.get("init_args")
    if args is None:
        return node
    name = cls.rsplit(".", 1)[-1]
    if name in ("FashionMNISTDataModule", "ContextualFashionMNISTDataModule"):
        args.update(root=str(paths["fmnist"]), image_size=16, num_workers=0, batch_size=8)
        args.update({k: v for k, v in {"val_per_class": 2, "max_per_class": 20, "eval_batch_size": 16,
                                        "samples_per_epoch": 16}.items() if k in args})
        if args.get("shots"):
            args["shots"] = min(args["shots"], 5)
    elif name == "SyntheticDataModule":
        folder = paths["synthetic"]
        if args.get("predict_split") == "train" and "out" in paths:  # a scorer writes into it: score a copy
            folder = paths["out"] / "scored_copy"
            if not folder.exists():
                shutil.copytree(paths["synthetic"], folder)
        args.update(folder=str(folder), image_size=16)
    elif name == "MixedDataModule" and "samples_per_epoch" in args:
        args["samples_per_epoch"] = 16
    elif name == "GenerationRequestsDataModule":
        args.update(images_per_class=2, batch_size=4, num_workers=0)
        if args.get("attribute_bank"):
            args["attribute_bank"] = str(paths["bank"])
    elif name == "TimmBackbone":
        args["model_name"] = "test_resnet"
        if args.get("checkpoint_path"):
            args["checkpoint_path"] = str(paths["backbone"])
    elif name == "PretrainedGenerator":
        args["model"] = str(paths["generator"])
        if args.get("lora"):
            args["lora"] = str(paths["lora"])
    elif name == "NewGenerator":
        args.update(TINY_NEW_GENERATOR, vae=str(paths["generator"] / "vae"))
    elif name == "ClipScorer":
        args.update(model_name="tiny", pretrained=None, model_config=TINY_CLIP)
    elif name == "QualityLoss":
        args.update(checkpoint=None, metric_kwargs={"pretrained": None})
    elif name == "AttributeCaptionedDataModule" and args.get("attribute_bank"):
        args["attribute_bank"] = str(paths["bank"])
    elif name == "AttributeExtractionSystem":
        args["output"] = str(paths["out"] / "attributes.json")
    elif name == "FewShotEpisodes":
        # fast_dev_run reads one batch (16 test images): 2-way episodes with one query
        args.update(output=str(paths["out"] / "fewshot.json"), n_way=2, k_shots=[1], n_query=1, episodes=3,
                    synthetic_per_class=[0, 1])
    elif name == "ClassNamesDataModule":
        args.update(batch_size=2, samples_per_epoch=4, val_per_class=1)
    elif name == "LbGenTrainer":
        args.update(lora_rank=2, num_inference_steps=2, grad_steps=1, discriminator_hidden=8)
    elif name == "AutoencoderTrainer":
        args.update(image_size=16, block_out_channels=[16, 32])
    elif name == "SyntheticScorer" and args.get("oracle_checkpoint"):
        args["oracle_checkpoint"] = str(paths["oracle"])
    elif name == "ModelCheckpoint" and args.get("dirpath"):
        args["dirpath"] = str(paths["out"] / "checkpoints")
    if "output_dir" in args:
        args["output_dir"] = str(paths["out"] / name)
    return node


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on ``base`` as LightningCLI merges two ``-c`` files (dicts recursively, the rest replaced)."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(config_path: Path) -> dict:
    """A recipe's tree; an overlay (``# lbgen-test: overlay-of <base>``) merged onto its base recipe."""
    text = config_path.read_text()
    config = yaml.safe_load(text)
    match = re.search(r"lbgen-test: overlay-of (\S+)", text)
    return merge(load_recipe(REPO / "configs" / match.group(1)), config) if match else config


def run_recipe(config_path: Path, paths: dict[str, Path], *extra: str):
    """Run a recipe through `lbgen` with tiny stand-ins, as the CLI a user runs."""
    config = shrink(load_recipe(config_path), paths)
    config.setdefault("trainer", {}).update(accelerator="cpu", devices=1, strategy="auto", precision="32-true",
                                            default_root_dir=str(paths["out"]))
    tiny = paths["out"] / config_path.name
    tiny.write_text(yaml.safe_dump(config))
    return cli_main([stage_of(config_path), "-c", str(tiny), *extra])


def stage_of(config_path: Path) -> str:
    """``predict`` for generation and attribute extraction recipes (they set return_predictions), else ``fit``."""
    return "predict" if "return_predictions" in load_recipe(config_path) else "fit"


@pytest.fixture(scope="session")
def recipe_paths(fmnist_fixture, tiny_generator, tmp_path_factory) -> dict[str, Path]:
    """Inputs the recipes read (data, a generator folder, a generated dataset), all tiny."""
    out = tmp_path_factory.mktemp("synthetic_fixture")
    from lbgen.components import load_generator
    from lbgen.components.lora import add_lora, save_lora

    unet = load_generator(str(tiny_generator)).unet
    add_lora(unet, 2, None, ["to_q", "to_v"], init=False)
    save_lora(out / "lora", unet)
    from safetensors.torch import save_file

    from lbgen.components import TimmBackbone

    save_file(TimmBackbone("test_resnet").state_dict(), out / "backbone.safetensors")
    paths = {"fmnist": fmnist_fixture, "generator": tiny_generator, "out": out, "lora": out / "lora",
             "backbone": out / "backbone.safetensors"}
    run_recipe(REPO / "configs/generate/fashion_txt2img.yaml", paths)
    paths["synthetic"] = out / "DiffusionGenerator"
    run_recipe(REPO / "configs/bob/attributes.yaml", paths)  # the BOB recipes read this bank
    paths["bank"] = out / "attributes.json"
    # an oracle for the scoring recipe: a tiny classifier checkpoint written by the CLI (loadable hparams)
    run_recipe(REPO / "configs/classifier/fashion_5shot.yaml", paths, "--trainer.max_steps=1", "--test_after_fit=no",
               f"--trainer.default_root_dir={out / 'oracle'}")
    (paths["oracle"],) = (out / "oracle").glob("version_*/checkpoints/last.ckpt")
    return paths


def test_every_config_is_covered():
    assert {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS} >= {
        "classifier/fashion_5shot.yaml", "classifier/fashion_full.yaml", "classifier/fashion_lt100.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_config_parses_and_runs_fast_dev_run(config_path, recipe_paths, tmp_path, capsys):
    stage = stage_of(config_path)
    if "lbgen-test: parse-only" in config_path.read_text():  # real-scale recipe: its weights cannot load here
        with pytest.raises(SystemExit) as done:
            cli_main([stage, "-c", str(config_path), "--print_config"])
        assert done.value.code == 0 and "class_path" in capsys.readouterr().out
        return
    overlay = re.search(r"lbgen-test: overlay-of (\S+)", config_path.read_text())
    if overlay:  # the real CLI merges the two files as load_recipe does
        with pytest.raises(SystemExit) as done:
            cli_main([stage, "-c", str(REPO / "configs" / overlay.group(1)), "-c", str(config_path), "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert done.value.code == 0 and printed["model"] == merge(printed["model"], load_recipe(config_path)["model"])
    cli = run_recipe(config_path, {**recipe_paths, "out": tmp_path}, "--trainer.fast_dev_run=true")
    assert cli.trainer.state.finished
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
