"""Real-data DataModules: idx reader, splits, Fashion-MNIST, ImageFolder, augmentation."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lbgen.datamodules import (
    FASHION_MNIST_CLASSES,
    BadImageError,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    long_tail_counts,
    make_split,
)
from lbgen.datamodules.idx import read_idx, write_idx
from lbgen.datamodules.transforms import MixCollate, augmentation_preset

# --- idx --------------------------------------------------------------------------------------------------------


def test_idx_round_trip_and_corruption(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(ValueError, match="short.gz is truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "junk")


# --- splits -----------------------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(4), 50)


def test_k_shot_split_sizes_determinism_and_nesting():
    a = make_split(LABELS, 4, shots=5, val_per_class=10, seed=3)
    assert len(a.train) == 20 and len(a.val) == 40
    assert np.bincount(LABELS[a.train]).tolist() == [5] * 4
    assert not set(a.train) & set(a.val)
    again = make_split(LABELS, 4, shots=5, val_per_class=10, seed=3)
    np.testing.assert_array_equal(a.train, again.train)
    np.testing.assert_array_equal(a.val, again.val)
    other = make_split(LABELS, 4, shots=5, val_per_class=10, seed=4)
    assert set(other.train) != set(a.train)
    # k-shot sets are nested and independent of the validation size
    ten = make_split(LABELS, 4, shots=10, val_per_class=0, seed=3)
    assert set(a.train) <= set(ten.train)


def test_long_tail_profile():
    assert long_tail_counts(1000, 10, 100) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    split = make_split(np.repeat(np.arange(10), 1100), 10, imbalance_factor=100, max_per_class=1000, seed=0)
    counts = np.bincount(np.repeat(np.arange(10), 1100)[split.train])
    assert counts[0] / counts[-1] == pytest.approx(100)
    assert (np.diff(counts) < 0).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shots": 5, "imbalance_factor": 10.0}, "not both"),
    ({"shots": 0}, "positive"),
    ({"shots": 45, "val_per_class": 10}, "only 40 remain"),
    ({"val_per_class": 50}, "too few"),
    ({"imbalance_factor": 0.5}, ">= 1"),
])
def test_split_errors_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_split(LABELS, 4, **kwargs)


# --- Fashion-MNIST ----------------------------------------------------------------------------------------------


def test_fashion_mnist_reader_and_split_record(fmnist_fixture, tmp_path):
    dm = FashionMNISTDataModule(root=str(fmnist_fixture), shots=5, val_per_class=4, image_size=32)
    assert dm.num_classes == 10 and dm.class_names == FASHION_MNIST_CLASSES
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    dm.setup("fit")
    dm.setup("test")
    sample = dm.train_dataset[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    assert len(dm.train_dataset) == 50 and len(dm.val_dataset) == 40 and len(dm.test_dataset) == 60
    assert dm.train_class_counts == [5] * 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "source", "index", "sample_key"}  # the key seeds per-sample draws
    path = dm.save_split(tmp_path)
    record = json.loads(path.read_text())
    assert len(record["train"]) == 50 and record["train"][0].startswith("train:")
    # the recorded ids reproduce the split, whatever the seed says
    again = FashionMNISTDataModule(root=str(fmnist_fixture), split_file=str(path), split_seed=99)
    np.testing.assert_array_equal(again.split.train, dm.split.train)
    np.testing.assert_array_equal(again.split.val, dm.split.val)


def test_fashion_mnist_missing_files_name_path_and_package(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"), shots=1)
    with pytest.raises(FileNotFoundError, match=r"nowhere/train-images-idx3-ubyte.gz.*dataset-fashion-mnist"):
        dm.setup("fit")


@pytest.mark.fmnist
def test_real_fashion_mnist(real_fmnist):
    dm = FashionMNISTDataModule(root=str(real_fmnist), val_per_class=100)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) == 59000 and len(dm.val_dataset) == 1000 and len(dm.test_dataset) == 10000
    assert dm.train_class_counts == [5900] * 10
    image = dm.test_dataset[0]["image"]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[1])
    assert dm.test_dataset[0]["label"] == 9  # the first test image is an ankle boot


# --- ImageFolder ------------------------------------------------------------------------------------------------


def _write_folder(root, classes=("cat", "dog"), n=4, size=20):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_reads_classes_and_resizes(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "test", n=2)
    dm = ImageFolderDataModule(str(tmp_path / "train"), test_dir=str(tmp_path / "test"), image_size=16, shots=3)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_dataset[0]["image"].shape == (3, 16, 16)
    assert len(dm.test_dataset) == 4
    assert dm.split_record()["train"][0].split("/")[0] in ("cat", "dog")


def test_image_folder_bad_file_is_named_or_skipped(tmp_path):
    root = _write_folder(tmp_path / "train")
    data = (root / "dog" / "1.png").read_bytes()
    (root / "dog" / "1.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    (root / "cat" / "notes.jpg").write_text("not an image")
    with pytest.raises(BadImageError, match=r"cat/notes.jpg"):
        ImageFolderDataModule(str(root)).setup("fit")
    dm = ImageFolderDataModule(str(root), skip_bad_images=True)
    with pytest.warns(UserWarning, match="Skipped 2 unreadable"):
        dm.setup("fit")
    assert len(dm.train_dataset) == 7


def test_image_folder_empty_class_and_mismatched_test(tmp_path):
    root = _write_folder(tmp_path / "train")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"without images.*train/empty"):
        ImageFolderDataModule(str(root))
    (root / "empty").rmdir()
    _write_folder(tmp_path / "test", classes=("cat", "cow"))
    dm = ImageFolderDataModule(str(root), test_dir=str(tmp_path / "test"))
    with pytest.raises(ValueError, match="must match"):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing"))


# --- augmentation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["none", "weak", "strong", "randaugment", "trivialaugment"])
def test_augmentation_presets(name):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = augmentation_preset(name, 32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    if name == "none":
        torch.testing.assert_close(out, image.float() / 255)
    with pytest.raises(ValueError, match="Unknown augmentation"):
        augmentation_preset("medium", 32)


def test_cutmix_mixup_collate_gives_soft_labels():
    torch.manual_seed(0)
    samples = [{"image": torch.rand(3, 8, 8), "label": i % 4, "source": 0, "index": i} for i in range(8)]
    batch = MixCollate("cutmix_or_mixup", num_classes=4)(samples)
    assert batch["label"].shape == (8, 4)
    torch.testing.assert_close(batch["label"].sum(1), torch.ones(8))
    assert batch["image"].shape == (8, 3, 8, 8)
