"""Nothing lost on a crash: every system resumes with ``--ckpt_path last`` to the weights of an uninterrupted run;
a killed process leaves a loadable checkpoint; non-finite losses stop the run, naming the step and the term."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lbgen.cli import cli_main
from lbgen.models.lean_checkpoint import LEAN_KEY

from ..conftest import REPO, load_recipe, shrink

SYSTEMS = {"ClassifierSystem": "classifier/fashion_5shot.yaml", "AutoencoderSystem": "foundation/fashion_vae.yaml",
           "TextToImageSystem": "bob/finetune.yaml", "ClipSystem": "foundation/fashion_clip.yaml",
           "QualitySystem": "foundation/fashion_quality.yaml", "LbGenSystem": "lbgen/fashion.yaml"}
LEAN = {"TextToImageSystem", "LbGenSystem"}  # LoRA fine-tunes: their checkpoints leave the frozen generator out


def short_epochs(node) -> None:
    """Two or three batches per epoch in every real-data DataModule of a shrunk recipe."""
    if isinstance(node, dict):
        args = node.get("init_args")
        if isinstance(args, dict) and str(node.get("class_path", "")).endswith(
                ("FashionMNISTDataModule", "ClassNamesDataModule")):
            args["samples_per_epoch"] = 16 if "ClassNames" not in node["class_path"] else 4
        for value in node.values():
            short_epochs(value)


def tiny_recipe(config: str, paths: dict, out: Path, epochs: int = 2, crash_at: int | None = None) -> Path:
    """The recipe with tiny stand-ins, ``epochs`` short epochs, validation and a checkpoint after each."""
    tree = shrink(load_recipe(REPO / "configs" / config), {**paths, "out": out})
    short_epochs(tree)
    trainer = tree.setdefault("trainer", {})
    for key in ("val_check_interval", "limit_val_batches", "fast_dev_run"):
        trainer.pop(key, None)
    trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_epochs=epochs,
                   max_steps=-1, check_val_every_n_epoch=1, limit_val_batches=1, default_root_dir=str(out / "runs"),
                   enable_checkpointing=True, enable_progress_bar=False, logger=None,
                   callbacks=[{"class_path": "tests.reliability.crash.CrashAtEpoch", "init_args": {"epoch": crash_at}}]
                   if crash_at is not None else None)
    path = out / f"{Path(config).stem}{'-crash' if crash_at is not None else ''}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def last_weights(run_root: Path) -> dict[str, torch.Tensor]:
    (last,) = run_root.glob("version_*/checkpoints/last.ckpt")
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


def logged_epochs(run_root: Path) -> set[str]:
    path = run_root / "version_0" / "metrics.csv"
    if not path.exists():  # a recipe that logs nothing in its few steps (the check is then that neither run did)
        return set()
    with path.open() as rows:
        return {row["epoch"] for row in csv.DictReader(rows)}


@pytest.mark.slow
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_crash_then_resume_gives_the_uninterrupted_weights(system, recipe_paths, tmp_path):
    config = SYSTEMS[system]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    for folder in (straight, crashed):
        folder.mkdir()
    cli_main(["fit", "-c", str(tiny_recipe(config, recipe_paths, straight)), "--test_after_fit=no"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main(["fit", "-c", str(tiny_recipe(config, recipe_paths, crashed, crash_at=1)), "--test_after_fit=no"])
    interrupted = last_weights(crashed / "runs")
    cli = cli_main(["fit", "-c", str(tiny_recipe(config, recipe_paths, crashed)), "--ckpt_path", "last",
                    "--test_after_fit=no"])
    assert cli.trainer.current_epoch == 2 and cli.trainer.log_dir.endswith("version_0")  # continued, not restarted
    # metrics.csv appended to: the rows logged before the crash are kept (Lightning's CSV logger deletes them)
    assert logged_epochs(crashed / "runs") == logged_epochs(straight / "runs")
    expected, resumed = last_weights(straight / "runs"), last_weights(crashed / "runs")
    assert expected.keys() == resumed.keys()
    assert any(not torch.equal(interrupted[k], resumed[k]) for k in resumed)  # it trained after the crash
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=f"{system}: {key}")
    (last,) = (crashed / "runs").glob("version_*/checkpoints/last.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert (LEAN_KEY in checkpoint) == (system in LEAN)
    if system in LEAN:  # resumed exactly from a checkpoint without the frozen UNet / VAE / text encoder / judges
        assert not [k for k in resumed if k.startswith(("unet.", "vae.", "text_encoder.", "clip.", "quality."))
                    and "lora_" not in k]


@pytest.mark.slow
def test_killed_process_resumes_from_a_loadable_checkpoint(recipe_paths, tmp_path):
    recipe = tiny_recipe("classifier/fashion_5shot.yaml", recipe_paths, tmp_path, epochs=40)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "lbgen", "fit", "-c", str(recipe), "--test_after_fit=no"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "runs/version_0/checkpoints"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(list(checkpoints.glob("*.ckpt"))) < 2:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of the next epochs, perhaps while a checkpoint is written
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)  # whole, not truncated
    assert 0 < state["epoch"] < 40
    assert not list(checkpoints.glob("*.tmp*"))
    cli = cli_main(["fit", "-c", str(recipe), "--ckpt_path", "last", "--test_after_fit=no"])
    assert cli.trainer.current_epoch == 40 and cli.trainer.global_step > state["global_step"]


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(recipe_paths, tmp_path):
    recipe = tiny_recipe("classifier/fashion_5shot.yaml", recipe_paths, tmp_path, epochs=6)
    # an absurd learning rate overflows the weights within a few steps
    with pytest.raises(FloatingPointError, match=r"not finite at step \d+") as error:
        cli_main(["fit", "-c", str(recipe), "--test_after_fit=no", "--model.init_args.optimizer.init_args.lr=1e30",
                  "--model.init_args.scheduler=null"])
    assert "cross_entropy" in str(error.value) or "Weights" in str(error.value)
    for checkpoint in (tmp_path / "runs").glob("version_*/checkpoints/*.ckpt"):
        weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), checkpoint


def test_fit_refuses_to_overwrite_a_previous_output(recipe_paths, tmp_path):
    recipe = tiny_recipe("foundation/fashion_vae.yaml", recipe_paths, tmp_path, epochs=1)
    output = Path(yaml.safe_load(recipe.read_text())["model"]["init_args"]["output_dir"])
    output.mkdir(parents=True)
    (output / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite true"):
        cli_main(["fit", "-c", str(recipe)])
    assert (output / "config.json").read_text() == "{}"
    cli_main(["fit", "-c", str(recipe), "--overwrite", "true", "--test_after_fit=no"])
    assert (output / "config.json").read_text() != "{}"
