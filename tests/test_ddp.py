"""Distributed training: every system trained by 2 processes (DDP, gloo on the CPU) at half the per-process batch
reaches the weights of 1 process, because the global batches, each sample's random draws and the losses over pairs
of samples do not depend on the number of processes. Also: evaluation counts every test image exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lbgen.datamodules.order import KeyedIndex, SeededDistributedSampler
from lbgen.storage.dataset_format import MANIFEST_FILE, complete_shards, read_manifest

from .conftest import REPO, load_recipe, shrink
from .reliability.test_resume import SYSTEMS, last_weights, tiny_recipe
from .test_generation import pngs

SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}


def halve_batches(node) -> None:
    """Half the per-process batch size of every DataModule of a recipe (the global batch stays the same)."""
    if isinstance(node, dict):
        args = node.get("init_args")
        if isinstance(args, dict) and "batch_size" in args and "DataModule" in str(node.get("class_path", "")):
            assert args["batch_size"] % 2 == 0, node
            args["batch_size"] //= 2
        for value in node.values():
            halve_batches(value)


def layout_recipe(config: str, paths: dict, out: Path, processes: int) -> Path:
    recipe = tiny_recipe(config, paths, out, epochs=2)
    tree = yaml.safe_load(recipe.read_text())
    tree["seed_everything"] = 0
    model = tree["model"]["init_args"]
    # SGD: Adam's first steps are sign-like and would turn float-rounding differences into lr-sized ones
    model["optimizer"] = SGD
    if "discriminator_optimizer" in model:
        model["discriminator_optimizer"] = SGD
    if "scheduler" in model:
        model["scheduler"] = None
    # lbGen's discriminator and LoRA each get gradients from one of its two backward passes per step
    strategy = "ddp_find_unused_parameters_true" if "discriminator_optimizer" in model else "ddp"
    tree["trainer"].update(devices=processes, strategy=strategy if processes > 1 else "auto")
    if "backbone" in model:  # BatchNorm's batch statistics are per process (SyncBatchNorm needs GPUs): GroupNorm
        model["backbone"]["init_args"]["model_name"] = "test_efficientnet_gn"
    if processes > 1:
        halve_batches(tree["data"])
    recipe.write_text(yaml.safe_dump(tree))
    return recipe


def run_lbgen(*args: str, timeout: int = 300) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lbgen", *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_two_processes_at_half_batch_train_like_one(system, recipe_paths, tmp_path):
    weights = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        run_lbgen("fit", "-c", str(layout_recipe(SYSTEMS[system], recipe_paths, out, processes)),
                  "--test_after_fit=no")
        weights[processes] = last_weights(out / "runs")
    one, two = weights[1], weights[2]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=f"{system}: {key}")
    assert any(one[k].is_floating_point() and one[k].abs().sum() > 0 for k in one)


@pytest.mark.slow
@pytest.mark.ddp
def test_evaluation_on_two_processes_counts_every_test_image_once(recipe_paths, tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    recipe = layout_recipe("classifier/fashion_5shot.yaml", recipe_paths, out, 1)
    run_lbgen("fit", "-c", str(recipe), "--test_after_fit=no")
    (checkpoint,) = (out / "runs").glob("version_0/checkpoints/last.ckpt")
    metrics = {}
    for processes in (1, 2):
        root = tmp_path / f"test{processes}"
        # 60 test images and an evaluation batch of 16: 2 processes get uneven shares (32 + 28)
        run_lbgen("test", "-c", str(recipe), "--ckpt_path", str(checkpoint), f"--trainer.devices={processes}",
                  f"--trainer.strategy={'ddp' if processes > 1 else 'auto'}", f"--trainer.default_root_dir={root}")
        (folder,) = root.glob("version_*")
        metrics[processes] = (json.loads((folder / "test_metrics.json").read_text()),
                              json.loads((folder / "confusion_matrix.json").read_text()))
    assert metrics[1] == metrics[2]
    confusion = metrics[1][1]
    matrix = confusion["matrix"] if isinstance(confusion, dict) else confusion
    assert sum(map(sum, matrix)) == 60  # each test image counted once, none twice


def test_seeded_sampler_splits_one_global_order_by_rank():
    dataset = list(range(10))
    one = SeededDistributedSampler(dataset, num_samples=24, seed=3, num_replicas=1, rank=0)
    ranks = [SeededDistributedSampler(dataset, num_samples=24, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        order = list(one)
        assert all(isinstance(i, KeyedIndex) for i in order) and len(order) == 24
        # whole shuffled passes over the dataset, then part of a third
        assert sorted(order[:10]) == sorted(order[10:20]) == list(range(10)) and len(set(order[20:])) == 4
        interleaved = [i for pair in zip(*map(list, ranks), strict=True) for i in pair]
        assert interleaved == order and [i.key for i in interleaved] == [i.key for i in order]
        assert [i.key for i in order] == list(range(24 * epoch, 24 * (epoch + 1)))  # unique over the run
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert first != list(one)  # a new order each epoch
    weighted = SeededDistributedSampler(dataset, num_samples=2000, seed=0, weights=torch.tensor([0.0] * 9 + [1.0]),
                                        num_replicas=1, rank=0)
    assert set(weighted) == {9}


@pytest.mark.slow
@pytest.mark.ddp
def test_attribute_bank_from_two_processes_equals_one(recipe_paths, tmp_path):
    banks = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        tree = shrink(load_recipe(REPO / "configs/bob/attributes.yaml"), {**recipe_paths, "out": out})
        tree["trainer"].update(accelerator="cpu", devices=processes, strategy="ddp" if processes > 1 else "auto",
                               default_root_dir=str(out), enable_progress_bar=False)
        tree["data"]["init_args"]["eval_batch_size"] = 4  # 50 images: 13 batches, uneven over 2 processes
        out.mkdir()
        (out / "attributes.yaml").write_text(yaml.safe_dump(tree))
        run_lbgen("predict", "-c", str(out / "attributes.yaml"))
        banks[processes] = json.loads((out / "attributes.json").read_text())
    assert banks[1]["records"] == banks[2]["records"] and len(banks[1]["records"]) == 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_generation_on_two_torchrun_nodes_equals_one_process_and_resumes_on_one(recipe_paths, tmp_path):
    """``torchrun`` on 2 "nodes" (2 launchers on this machine, ``num_nodes: 2``) makes the 1-process image set; a run
    killed on 2 nodes is finished by 1 process (resume across a different number of ranks)."""
    tree = shrink(load_recipe(REPO / "configs/generate/fashion_txt2img.yaml"), {**recipe_paths, "out": tmp_path})
    tree["trainer"].update(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path / "runs"))
    folders = {}
    for layout in ("one", "nodes"):
        tree["model"]["init_args"]["output_dir"] = folders[layout] = str(tmp_path / layout)
        (tmp_path / f"{layout}.yaml").write_text(yaml.safe_dump(tree))
    run_lbgen("predict", "-c", str(tmp_path / "one.yaml"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    port = free_port()
    launchers = [subprocess.Popen(
        [str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "lbgen", "predict", "-c",
         str(tmp_path / "nodes.yaml"), "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    for launcher in launchers:
        output, _ = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, output[-4000:]
    one, nodes = Path(folders["one"]), Path(folders["nodes"])
    assert pngs(nodes) == pngs(one) and len(pngs(one)) == 20
    assert {s.name.split("-r")[1][:3] for s in complete_shards(nodes)} == {"000", "001"}  # each rank its shards
    # as if killed: rank 1's shards and the manifest are gone; one process finishes the run
    for shard in complete_shards(nodes):
        if "-r001-" in shard.name:
            shard.unlink()
            shard.with_suffix(".jsonl").unlink()
    (nodes / MANIFEST_FILE).unlink()
    run_lbgen("predict", "-c", str(tmp_path / "nodes.yaml"))
    assert pngs(nodes) == pngs(one)
    assert [r["id"] for r in read_manifest(nodes)[1]] == [r["id"] for r in read_manifest(one)[1]]
