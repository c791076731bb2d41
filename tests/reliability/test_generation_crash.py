"""Generation survives crashes: kills at random points, a SIGTERM, a half-written shard; the rerun of the same
command gives the uninterrupted dataset byte for byte, none duplicated, none missing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lbgen.storage.dataset_format import MANIFEST_FILE, SHARD_DIR, complete_shards, read_manifest

from ..conftest import REPO, load_recipe, shrink
from ..test_generation import pngs

IMAGES_PER_CLASS, BATCH, SHARD = 6, 4, 4  # 60 images in 15 batches and 15 shards


def recipe(paths: dict, out: Path, name: str) -> tuple[Path, Path]:
    tree = shrink(load_recipe(REPO / "configs/generate/fashion_txt2img.yaml"), {**paths, "out": out})
    tree["model"]["init_args"].update(output_dir=str(out / name), shard_size=SHARD, num_inference_steps=8)
    tree["data"]["init_args"].update(images_per_class=IMAGES_PER_CLASS, batch_size=BATCH)
    tree["trainer"].update(accelerator="cpu", devices=1, enable_progress_bar=False, default_root_dir=str(out / "logs"))
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, out / name


def lbgen_predict(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lbgen", "predict", "-c", str(config)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for_shards(proc: subprocess.Popen, folder: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if folder.exists() and len(complete_shards(folder)) >= n:
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_again_and_again_then_rerun_gives_the_uninterrupted_dataset(recipe_paths, tmp_path):
    config, reference = recipe(recipe_paths, tmp_path, "reference")
    assert lbgen_predict(config).wait() == 0
    config, target = recipe(recipe_paths, tmp_path, "killed")
    rng = random.Random(0)
    for kill in range(3):  # SIGKILL at seeded random moments, each after a few more shards
        proc = lbgen_predict(config)
        wait_for_shards(proc, target, 2 + 3 * kill)
        time.sleep(rng.uniform(0, 0.3))  # mid-batch, mid-encode or mid-rename
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, "the run finished before it was killed"
    assert not (target / MANIFEST_FILE).exists()
    # a crash between writing a shard and its index leaves a shard without an index: it must be redone
    done = complete_shards(target)
    done[-1].with_suffix(".jsonl").unlink()
    (target / SHARD_DIR / "shard-crashed-00000.tar.tmp").write_bytes(b"half a tar")
    proc = lbgen_predict(config)
    assert proc.wait() == 0, proc.stderr.read()
    assert pngs(target) == pngs(reference)
    assert [r["id"] for r in read_manifest(target)[1]] == [r["id"] for r in read_manifest(reference)[1]]
    assert len(read_manifest(target)[1]) == 10 * IMAGES_PER_CLASS
    assert not list((target / SHARD_DIR).glob("*.tmp"))


@pytest.mark.slow
def test_sigterm_stops_generation_promptly_with_complete_shards(recipe_paths, tmp_path):
    config, target = recipe(recipe_paths, tmp_path, "terminated")
    proc = lbgen_predict(config)
    wait_for_shards(proc, target, 1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 143, proc.stderr.read()  # 128 + SIGTERM: not mistaken for a finished run
    assert time.time() - sent < 30
    assert not (target / MANIFEST_FILE).exists() and len(complete_shards(target)) < 10 * IMAGES_PER_CLASS / SHARD
    assert lbgen_predict(config).wait() == 0
    assert len(read_manifest(target)[1]) == 10 * IMAGES_PER_CLASS
