"""ImageNet-style evaluation: a flat validation folder laid out as an ImageFolder, top-5 accuracy, and image checks
that decode a large folder once (in parallel, on rank 0, cached outside the data) or lazily."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lbgen import commands
from lbgen.components import TimmBackbone
from lbgen.datamodules import BadImageError, ImageFolderDataModule
from lbgen.datamodules import image_folder as image_folder_module
from lbgen.datamodules.image_folder import find_bad_images, imagefolder_from_labels, read_image
from lbgen.models import ClassifierSystem

from .conftest import REPO

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]


def class_map(path: Path) -> Path:
    path.write_text("".join(f"{w}\t{n}\n" for w, n in zip(WNIDS, NAMES, strict=True)))
    return path


def write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (18, 20, 3), dtype=np.uint8)).save(folder / name)


def write_class_folders(root: Path, per_class: int, seed: int = 0) -> Path:
    for c, wnid in enumerate(WNIDS):
        write_images(root / wnid, [f"{wnid}_{i}.JPEG" for i in range(per_class)], seed + c)
    return root


def flat_validation_set(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """ImageNet's layout: JPEGs in one folder, LOC_val_solution.csv naming each by its stem, boxes after the synset."""
    flat = tmp_path / "val"
    truth = {f"ILSVRC2012_val_{i:08d}": WNIDS[i % len(WNIDS)] for i in range(1, 13)}
    write_images(flat, [f"{stem}.JPEG" for stem in truth])
    rows = [f"{stem},{wnid} 10 20 30 40 {wnid} 1 2 3 4" for stem, wnid in truth.items()]
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return flat, labels, truth


def test_flat_validation_set_becomes_an_image_folder_by_hard_links_and_resumes(tmp_path, capsys):
    flat, labels, truth = flat_validation_set(tmp_path)
    write_images(flat, ["unlabelled.JPEG"])
    out = tmp_path / "val_folder"
    commands.main(["imagefolder-from-labels", str(flat), str(labels), str(out)])
    printed = capsys.readouterr().out
    assert "6 class folders; 12 linked" in printed and "1 file(s)" in printed and "left out" in printed
    assert sorted(p.name for p in out.iterdir()) == WNIDS
    for stem, wnid in truth.items():
        placed = out / wnid / f"{stem}.JPEG"
        assert placed.is_file() and placed.samefile(flat / f"{stem}.JPEG")  # a hard link: no copy
    assert not list(flat.glob(".*")) and sorted(p.name for p in flat.iterdir())[-1] == "unlabelled.JPEG"
    (out / WNIDS[0] / "ILSVRC2012_val_00000006.JPEG").unlink()  # a killed run: one file not there yet
    assert imagefolder_from_labels(flat, labels, out) == {"linked": 1, "symlinked": 0, "copied": 0,
                                                          "already there": 11, "unlabelled": 1, "classes": 6}


def test_two_column_labels_copies_and_symlinks(tmp_path):
    flat, _, truth = flat_validation_set(tmp_path)
    labels = tmp_path / "val_labels.txt"
    labels.write_text("".join(f"{stem}.JPEG {wnid}\n" for stem, wnid in truth.items()))
    copied = imagefolder_from_labels(flat, labels, tmp_path / "copied", mode="copy")
    linked = imagefolder_from_labels(flat, labels, tmp_path / "symlinked", mode="symlink")
    assert copied["copied"] == linked["symlinked"] == 12
    one = f"{WNIDS[1]}/ILSVRC2012_val_00000001.JPEG"
    assert not (tmp_path / "copied" / one).is_symlink() and (tmp_path / "copied" / one).stat().st_nlink == 1
    assert (tmp_path / "symlinked" / one).is_symlink()
    assert (tmp_path / "copied" / one).read_bytes() == (flat / "ILSVRC2012_val_00000001.JPEG").read_bytes()
    assert not list((tmp_path / "copied").rglob(".*"))  # no temporary file left


def test_a_label_for_a_missing_file_is_refused_before_anything_is_made(tmp_path):
    flat, labels, _ = flat_validation_set(tmp_path)
    (flat / "ILSVRC2012_val_00000007.JPEG").unlink()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"labels 1 file\(s\) not in .*ILSVRC2012_val_00000007 \(line 8\)"):
        imagefolder_from_labels(flat, labels, out)
    assert not out.exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("ILSVRC2012_val_00000001.JPEG ../escape\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: label '../escape' is not a plain file or folder name"):
        imagefolder_from_labels(flat, bad, out)
    with pytest.raises(ValueError, match="inside flat_dir"):
        imagefolder_from_labels(flat, labels, flat / "out")
    with pytest.raises(SystemExit):  # argparse: a missing argument
        commands.main(["imagefolder-from-labels", str(flat)])


def test_test_folder_must_have_the_training_class_folders(tmp_path):
    mapping = class_map(tmp_path / "map.tsv")
    train = write_class_folders(tmp_path / "train", 2)
    test = tmp_path / "test"
    for wnid in (WNIDS[0], WNIDS[2]):
        write_images(test / wnid, ["0.png"])
    data = ImageFolderDataModule(str(train), test_dir=str(test), class_names_file=str(mapping), image_size=8)
    with pytest.raises(ValueError, match=r"6 vs 2 classes; first difference at position 1: train_dir .* "
                                         r"'n01443537', test_dir .* 'n01484850'.*must match"):
        data.setup("test")


def _trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path, ""),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("classes", [6, 5])
def test_classifier_reports_top5_on_the_laid_out_validation_folder(tmp_path, classes):
    flat, labels, truth = flat_validation_set(tmp_path)
    test = tmp_path / "val_folder"
    imagefolder_from_labels(flat, labels, test)
    train = write_class_folders(tmp_path / "train", 2)
    for wnid in WNIDS[classes:]:  # a 5-class variant: top-5 would always be 100%, so it is not reported
        for root in (train, test):
            for path in (root / wnid).iterdir():
                path.unlink()
            (root / wnid).rmdir()
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(dict(zip(WNIDS[:classes], NAMES[:classes], strict=True))))
    data = ImageFolderDataModule(str(train), test_dir=str(test), class_names_file=str(mapping), image_size=16,
                                 batch_size=4)
    torch.manual_seed(0)
    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=classes)
    result = _trainer(tmp_path).test(model, data)[0]
    metrics = json.loads((tmp_path / "version_0" / "test_metrics.json").read_text())
    assert metrics["class_names"] == NAMES[:classes] and metrics["num_test_images"] == len(truth) * classes // 6
    if classes == 5:
        assert "acc_top5" not in metrics and "test/acc_top5" not in result
        return
    model.eval()  # the same numbers by hand: a true class among the 5 largest logits
    images = torch.stack([data.test_dataset[i]["image"] for i in range(len(data.test_dataset))])
    targets = torch.tensor([data.test_dataset[i]["label"] for i in range(len(data.test_dataset))])
    with torch.no_grad():
        top5 = model(images).topk(5, dim=1).indices
    expected = (top5 == targets[:, None]).any(1).float().mean().item()
    assert metrics["acc_top5"] == pytest.approx(expected) == pytest.approx(result["test/acc_top5"])
    assert metrics["acc"] <= metrics["acc_top5"]


# --- image checks ---------------------------------------------------------------------------------------------------
def folder_with_bad_images(root: Path) -> Path:
    write_class_folders(root, 3)
    good = (root / WNIDS[1] / f"{WNIDS[1]}_1.JPEG").read_bytes()
    (root / WNIDS[1] / f"{WNIDS[1]}_1.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    (root / WNIDS[4] / "notes.png").write_text("not an image")
    return root


def test_parallel_check_finds_every_bad_image(tmp_path):
    root = folder_with_bad_images(tmp_path / "train")
    paths = sorted(root.rglob("*.*"))
    bad = find_bad_images(paths, workers=2, chunk=2)
    assert [paths[i].name for i, _ in bad] == [f"{WNIDS[1]}_1.JPEG", "notes.png"]
    assert all(str(paths[i]) in message for i, message in bad)


def test_check_is_cached_outside_the_data_folder(tmp_path, monkeypatch):
    root = folder_with_bad_images(tmp_path / "train")
    before = sorted(root.rglob("*"))
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="Skipped 2 unreadable"):
        first = ImageFolderDataModule(str(root), skip_bad_images=True, check_cache_dir=str(cache), image_size=8)
        first.setup("fit")
    assert sorted(root.rglob("*")) == before  # nothing written into the data folder
    [record] = cache.glob("image_check_*.json")
    assert len(json.loads(record.read_text())["bad"]) == 2

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the folder did not change")

    monkeypatch.setattr(image_folder_module, "find_bad_images", no_decoding)
    with pytest.warns(UserWarning, match="Skipped 2 unreadable"):
        again = ImageFolderDataModule(str(root), skip_bad_images=True, check_cache_dir=str(cache), image_size=8)
        again.setup("fit")
    assert len(again.pool[1]) == len(first.pool[1]) == 6 * 3 + 1 - 2
    with pytest.raises(BadImageError, match=r"notes.png|n01443537_1.JPEG"):  # the cached error, without skipping
        ImageFolderDataModule(str(root), check_cache_dir=str(cache)).setup("fit")
    (root / WNIDS[4] / "notes.png").unlink()  # the folder changed: checked again
    with pytest.raises(AssertionError, match="decoded again"):
        ImageFolderDataModule(str(root), skip_bad_images=True, check_cache_dir=str(cache)).setup("fit")


def test_without_the_check_a_bad_file_fails_when_read_or_is_replaced_in_its_class(tmp_path, monkeypatch):
    root = folder_with_bad_images(tmp_path / "train")
    monkeypatch.setattr(image_folder_module, "find_bad_images", lambda *a, **k: pytest.fail("checked eagerly"))
    data = ImageFolderDataModule(str(root), check_images=False, image_size=8, augmentation="none")
    data.setup("fit")
    positions = {data.pool[0].sample_id(p): p for p in range(len(data.pool[0]))}
    truncated = positions[f"{WNIDS[1]}/{WNIDS[1]}_1.JPEG"]
    with pytest.raises(BadImageError, match=rf"{WNIDS[1]}_1.JPEG"):
        data.pool[0].load(truncated)

    lazy = ImageFolderDataModule(str(root), check_images=False, skip_bad_images=True, image_size=8,
                                 augmentation="none")
    lazy.setup("fit")
    assert len(lazy.train_dataset) == 6 * 3 + 1  # nothing dropped at set-up
    item = next(i for i in range(len(lazy.train_dataset)) if lazy.train_dataset.positions[i] == truncated)
    with pytest.warns(UserWarning, match=rf"Skipped unreadable image .*{WNIDS[1]}_1.JPEG.*{WNIDS[1]}_2.JPEG of the "
                                         r"same class in its place \(1 skipped"):
        sample = lazy.train_dataset[item]
    assert sample["label"] == 1
    replacement = lazy.pool[0].load(positions[f"{WNIDS[1]}/{WNIDS[1]}_2.JPEG"]).float() / 255
    torch.testing.assert_close(sample["image"], replacement)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the readable ones read as themselves
        lazy.train_dataset[next(i for i in range(len(lazy.train_dataset))
                                if lazy.train_dataset.positions[i] == positions[f"{WNIDS[0]}/{WNIDS[0]}_0.JPEG"])]


def test_a_bad_file_is_replaced_only_from_its_own_split(tmp_path):
    root = folder_with_bad_images(tmp_path / "train")
    data = ImageFolderDataModule(str(root), check_images=False, skip_bad_images=True, image_size=8, shots=1,
                                 split_seed=0, augmentation="none")
    data.setup("fit")
    ids = {data.pool[0].sample_id(int(p)) for p in data.train_dataset.positions}
    bad_id = f"{WNIDS[1]}/{WNIDS[1]}_1.JPEG"
    if bad_id not in ids:  # make the 1-shot split draw the truncated file: the seed that does
        seed = next(s for s in range(1, 100) if bad_id in {
            data.pool[0].sample_id(int(p)) for p in ImageFolderDataModule(
                str(root), check_images=False, shots=1, split_seed=s).split.train})
        data = ImageFolderDataModule(str(root), check_images=False, skip_bad_images=True, image_size=8, shots=1,
                                     split_seed=seed, augmentation="none")
        data.setup("fit")
    item = next(i for i, p in enumerate(data.train_dataset.positions) if data.pool[0].sample_id(int(p)) == bad_id)
    # the only class-1 image of the split is unreadable: no image from outside the 1-shot split stands in
    with pytest.raises(BadImageError, match=rf"No readable image left in class folder .*{WNIDS[1]}"):
        data.train_dataset[item]


@pytest.mark.slow
def test_two_processes_decode_once_on_rank_zero(tmp_path):
    root = folder_with_bad_images(tmp_path / "train")
    script = f"""
import json, os, sys, warnings
import torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
from lbgen.datamodules import image_folder
from lbgen.datamodules.image_folder import ImageFolderDataModule
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1:
    def refuse(*args, **kwargs):
        raise AssertionError("rank 1 decoded the folder")
    image_folder.find_bad_images = refuse
warnings.simplefilter("ignore")
data = ImageFolderDataModule({str(root)!r}, skip_bad_images=True, image_size=8)
images, labels = data.pool
print(json.dumps({{"rank": rank, "ids": [images.sample_id(p) for p in range(len(images))]}}))
dist.destroy_process_group()
"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0]["ids"] == results[1]["ids"] and len(results[0]["ids"]) == 6 * 3 + 1 - 2
    assert f"{WNIDS[1]}/{WNIDS[1]}_1.JPEG" not in results[1]["ids"]


def test_read_image_names_the_file(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(BadImageError, match=r"x.png .*skip_bad_images"):
        read_image(tmp_path / "x.png")
