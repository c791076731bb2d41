"""Contextual Fashion-MNIST: determinism, the asked class-background bias, class-independent val/test, records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2_contingency

from lbgen.datamodules import ContextualFashionMNISTDataModule
from lbgen.datamodules.contextual import DEFAULT_BACKGROUNDS, OFFLINE_BACKGROUNDS, background_photo
from lbgen.datamodules.fashion_mnist import load_fashion_mnist

FOUR = ["brick", "grass", "coffee", "hubble_deep_field"]  # few backgrounds: enough images per (class, background)


def build(root, stages=("fit",), **kwargs) -> ContextualFashionMNISTDataModule:
    kwargs = {"image_size": 24, "shots": 5, "val_per_class": 5, "augmentation": "none", **kwargs}
    dm = ContextualFashionMNISTDataModule(root=str(root), **kwargs)
    for stage in stages:
        dm.setup(stage)
    return dm


def images_of(dataset) -> torch.Tensor:
    return torch.stack([dataset.images.load(int(p)) for p in dataset.positions])


def own_share(records: list[dict]) -> float:
    return float(np.mean([r["own_background"] for r in records]))


def contingency_p(records: list[dict], backgrounds: list[str]) -> float:
    """p-value of a chi-square test that the background is independent of the class."""
    table = np.zeros((10, len(backgrounds)))
    for r in records:
        table[r["label"], backgrounds.index(r["background"])] += 1
    return chi2_contingency(table[table.sum(1) > 0]).pvalue


def test_default_backgrounds_are_bundled_with_scikit_image():
    assert len(DEFAULT_BACKGROUNDS) == 10 and set(DEFAULT_BACKGROUNDS) <= set(OFFLINE_BACKGROUNDS)
    for name in OFFLINE_BACKGROUNDS:  # read from the wheel's folder: the test harness forbids any network use
        photo = background_photo(name, 32)
        assert photo.dtype == torch.uint8 and photo.shape[0] == 3 and min(photo.shape[1:]) == 32


def test_same_arguments_give_identical_images_and_another_seed_differs(fmnist_fixture):
    a = build(fmnist_fixture, ("fit", "test"), seed=3)
    b = build(fmnist_fixture, ("fit", "test"), seed=3, batch_size=7)
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        assert torch.equal(images_of(getattr(a, split)), images_of(getattr(b, split))), split
    assert a.attributes("train") == b.attributes("train")
    other = build(fmnist_fixture, ("fit",), seed=4)
    assert not torch.equal(images_of(a.train_dataset), images_of(other.train_dataset))
    sample = a.train_dataset[0]
    assert set(sample) == {"image", "label", "source", "index"}
    assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= 0 and sample["image"].max() <= 1
    # the photograph shows: colour and texture, not Fashion-MNIST's black frame
    assert images_of(a.train_dataset).float().std(dim=(1, 2, 3)).min() > 5


@pytest.mark.parametrize("bias", [0.8, 0.25, 0.0, 1.0])
def test_training_split_has_the_asked_bias(fmnist_fixture, bias):
    # the whole pool (300 images) trains; no hold-out
    dm = ContextualFashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, backgrounds=FOUR, bias=bias)
    records = dm.attributes("train")
    assert len(records) == 300
    assert all(r["own_background"] == (r["background"] == FOUR[r["label"] % 4]) for r in records)
    tolerance = 3.5 * np.sqrt(bias * (1 - bias) / len(records))  # binomial; exact at bias 0 and 1
    assert abs(own_share(records) - bias) <= tolerance
    off = [r["background"] for r in records if not r["own_background"]]
    if off:  # the others are drawn uniformly
        counts = np.unique(off, return_counts=True)[1]
        assert len(counts) == 4 and counts.min() > 0.15 * len(off)
    if bias == 0.25:  # 1 / len(backgrounds): the background says nothing about the class
        assert contingency_p(records, FOUR) > 0.01
    else:
        assert contingency_p(records, FOUR) < 1e-6


def test_validation_and_test_backgrounds_are_independent_of_the_class(fmnist_fixture):
    dm = build(fmnist_fixture, ("fit", "test"), backgrounds=FOUR, bias=1.0, shots=5, val_per_class=24)
    assert own_share(dm.attributes("train")) == 1.0
    for split, n in (("val", 240), ("test", 60)):
        records = dm.attributes(split)
        assert len(records) == n
        assert abs(own_share(records) - 0.25) <= 3.5 * np.sqrt(0.25 * 0.75 / n), split
    assert contingency_p(dm.attributes("val"), FOUR) > 0.01


def test_records_rebuild_the_images_and_are_written_with_the_split(fmnist_fixture, tmp_path):
    dm = build(fmnist_fixture, ("fit", "test"), bias=0.5)
    dm.save_split(tmp_path)
    written = json.loads((tmp_path / "context.json").read_text())
    assert set(written) == {"train", "val", "test"}
    assert written["train"] == dm.attributes("train") and written["test"] == dm.attributes("test")
    context = json.loads((tmp_path / "splits.json").read_text())["context"]
    assert context["bias"] == 0.5 and context["backgrounds"] == DEFAULT_BACKGROUNDS
    objects = {s: load_fashion_mnist(str(fmnist_fixture), s, 28)[0] for s in ("train", "test")}
    for split, dataset in (("train", dm.train_dataset), ("val", dm.val_dataset), ("test", dm.test_dataset)):
        records = written[split][:6]
        positions = [int(r["id"].split(":")[1]) for r in records]
        assert positions == dataset.positions[:6].tolist()
        prefix = "test" if split == "test" else "train"
        rebuilt = dm.compositor.render(objects[prefix][positions], dm.compositor.poses_from_records(records))
        # one by one from the JSON record, the same bytes as the bulk composition
        assert torch.equal(rebuilt, torch.stack([dataset.images.load(p) for p in positions])), split
        # the recorded background is the one used: another background changes the image
        swapped = [{**r, "background": DEFAULT_BACKGROUNDS[DEFAULT_BACKGROUNDS.index(r["background"]) - 1]}
                   for r in records]
        other = dm.compositor.render(objects[prefix][positions], dm.compositor.poses_from_records(swapped))
        assert all(not torch.equal(x, y) for x, y in zip(other, rebuilt, strict=True))
    record = written["train"][0]
    assert 0.55 <= record["scale"] <= 0.9 and -30 <= record["rotation"] <= 30
    assert 0 <= record["center_x"] <= 24 and 0 <= record["center_y"] <= 24


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"backgrounds": ["brick", "lena"]}, r"\['lena'\].*'astronaut', 'brick'"),
    ({"backgrounds": []}, "at least one"),
    ({"backgrounds": ["brick", "brick"]}, "repeats"),
    ({"bias": 1.5}, r"bias must be a probability in \[0, 1\], got 1.5"),
    ({"bias": -0.1}, "got -0.1"),
    ({"scale_range": (0.0, 0.5)}, "scale_range"),
    ({"scale_range": (0.5, 1.2)}, "scale_range"),
    ({"rotation_range": (30.0, -30.0)}, "rotation_range"),
    ({"context_sides": 0.5}, r"context_sides must be >= 1"),
])
def test_bad_arguments_say_what_to_change(fmnist_fixture, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContextualFashionMNISTDataModule(root=str(fmnist_fixture), **kwargs)


def test_context_sides_sets_how_much_of_the_photograph_a_crop_shows(fmnist_fixture):
    whole = build(fmnist_fixture, backgrounds=["gravel"], context_sides=1, image_size=16)
    part = build(fmnist_fixture, backgrounds=["gravel"], context_sides=4, image_size=16)
    assert whole.compositor.photos[0].shape[1:] == (16, 16)  # a square photograph: the whole scene, one view
    assert part.compositor.photos[0].shape[1:] == (64, 64)
    assert {(r["crop_x"], r["crop_y"]) for r in whole.attributes("train")} == {(0, 0)}
    assert len({(r["crop_x"], r["crop_y"]) for r in part.attributes("train")}) > 10
    assert json.loads(json.dumps(whole.split_record()))["context"]["context_sides"] == 1.0


def test_save_grid_writes_one_row_per_class(fmnist_fixture, tmp_path):
    dm = build(fmnist_fixture, (), image_size=16, shots=2, val_per_class=0)
    path = dm.save_grid(tmp_path / "grid.png", n_per_class=3)  # 2 shots: the third column stays black
    with Image.open(path) as grid:
        assert grid.size == (3 * (16 + 2) + 2, 10 * (16 + 2) + 2) and grid.mode == "RGB"
        pixels = np.asarray(grid)
    assert pixels[2:18, 2:18].std() > 0 and pixels[2:18, 2 + 2 * 18:18 + 2 * 18].max() == 0
