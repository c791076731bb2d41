"""The data card: its measures on features with known answers, the refusal of a folder whose manifest and shards
disagree, and the whole card written by `lbgen predict` for a tiny set with planted copies of test images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lbgen.cli import cli_main
from lbgen.datamodules import FASHION_MNIST_CLASSES, SyntheticDataModule
from lbgen.evaluation.card import (
    CARD_GRID,
    CARD_JSON,
    CARD_MARKDOWN,
    cards_section,
    check_manifest_matches_shards,
    domain_auc,
    kid,
    laplacian_variance,
    mean_pairwise_distance,
    vendi_score,
)
from lbgen.evaluation.leakage import LEAKAGE_FILE
from lbgen.storage.dataset_format import MANIFEST_FILE, png_bytes, read_manifest, write_images_as_dataset

from .conftest import REPO, load_recipe, run_recipe, shrink
from .test_leakage import clean_images, fixture_test_images, planted_set


def test_diversity_measures_have_their_known_values():
    same = torch.ones(10, 4)
    assert vendi_score(same) == pytest.approx(1.0) and mean_pairwise_distance(same) == pytest.approx(0.0)
    orthogonal = torch.eye(6)
    assert vendi_score(orthogonal) == pytest.approx(6.0) and mean_pairwise_distance(orthogonal) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    assert 1 < vendi_score(torch.randn(50, 8, generator=g)) < 8


def test_sharpness_falls_with_blur_and_is_zero_on_flat_images():
    g = torch.Generator().manual_seed(0)
    sharp = torch.rand(4, 3, 16, 16, generator=g)
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1)
    assert (laplacian_variance(blurred) < 0.2 * laplacian_variance(sharp)).all()
    assert torch.equal(laplacian_variance(torch.full((2, 3, 8, 8), 0.4)), torch.zeros(2))
    # one value per image, whatever the channels: a grey image equals its 3-channel copy
    grey = torch.rand(2, 1, 8, 8, generator=g)
    torch.testing.assert_close(laplacian_variance(grey), laplacian_variance(grey.expand(-1, 3, -1, -1)))


def test_kid_and_the_domain_classifier_tell_a_shifted_set_from_the_same_distribution():
    g = torch.Generator().manual_seed(0)
    real, same, shifted = (torch.randn(200, 16, generator=g) for _ in range(3))
    shifted = shifted + 1.0
    near, far = kid(real, same, subset_size=100, subsets=20), kid(real, shifted, subset_size=100, subsets=20)
    assert abs(near["mean"]) < 0.05 < far["mean"] and far["subset_size"] == 100
    assert kid(real[:1], same) is None  # too few images for an unbiased estimate
    assert 0.3 < domain_auc(real, same) < 0.7 and domain_auc(real, shifted) > 0.95
    assert domain_auc(real[:3], same) is None


def test_a_manifest_that_disagrees_with_its_shards_is_refused(tmp_path):
    folder = tmp_path / "set"
    write_images_as_dataset(folder, ["a", "b"], ((i % 2, png_bytes(im)) for i, im in enumerate(clean_images(6, 8, 0))),
                            shard_size=4)
    check_manifest_matches_shards(folder)
    lines = (folder / MANIFEST_FILE).read_text().splitlines()
    (folder / MANIFEST_FILE).write_text("\n".join(lines[:-1]) + "\n")  # one image of a shard no longer listed
    with pytest.raises(ValueError, match="disagree.*rewrites the manifest from the shards"):
        check_manifest_matches_shards(folder)


@pytest.fixture(scope="module")
def real_test(fmnist_fixture) -> torch.Tensor:
    return fixture_test_images(fmnist_fixture)


@pytest.fixture(scope="module")
def oracle(fmnist_fixture, tmp_path_factory) -> Path:
    """A tiny oracle checkpoint written by the CLI (one step of the 5-shot recipe)."""
    out = tmp_path_factory.mktemp("card_oracle")
    run_recipe(REPO / "configs/classifier/fashion_5shot.yaml", {"fmnist": fmnist_fixture, "out": out},
               "--trainer.max_steps=1", "--test_after_fit=no", f"--trainer.default_root_dir={out / 'oracle'}")
    (checkpoint,) = (out / "oracle").glob("version_*/checkpoints/last.ckpt")
    return checkpoint


@pytest.mark.slow
def test_the_card_of_a_tiny_set_has_every_field_and_finds_the_planted_copies(fmnist_fixture, oracle, real_test,
                                                                             tmp_path):
    # 60 clean images (noise and smooth colour fields, 6 per class) and 6 planted copies of test images (3 exact)
    g = torch.Generator().manual_seed(4)
    noise = torch.randint(0, 256, (20, 3, 16, 16), generator=g, dtype=torch.uint8)
    images, exact, perturbed = planted_set(real_test, seed=3)
    test_labels = [i // 6 for i in range(len(real_test))]  # the fixture's test set: 6 per class, in class order
    labels = [i % 10 for i in range(60)] + [test_labels[i] for i in (0, 1, 2, 3, 4, 5)]
    pixels = torch.cat([noise, clean_images(40, 16, seed=5), images[20:]])
    folder = tmp_path / "set"
    write_images_as_dataset(folder, list(FASHION_MNIST_CLASSES),
                            ((c, png_bytes(im)) for c, im in zip(labels, pixels, strict=True)), shard_size=16)
    paths = {"fmnist": fmnist_fixture, "out": tmp_path, "synthetic": folder, "oracle": oracle}
    tree = shrink(load_recipe(REPO / "configs/evaluate/data_card.yaml"), paths)
    tree["data"]["init_args"]["data"]["init_args"]["folder"] = str(folder)
    tree["model"]["init_args"].update(leakage_space="pixels", kid_subsets=5, grid_per_class=3)
    tree["trainer"].update(accelerator="cpu", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False)
    recipe = tmp_path / "card.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    cli_main(["predict", "-c", str(recipe)])

    card = json.loads((folder / CARD_JSON).read_text())
    _, records = read_manifest(folder)
    assert card["overall"]["count"] == len(records) == 66
    measures = ("count", "label_consistency", "clip_prob", "quality", "vendi", "vendi_real", "pairwise_distance",
                "pairwise_distance_real", "kid", "domain_auc", "sharpness", "sharpness_real")
    for row in [card["overall"], *card["per_class"].values()]:
        assert all(row[m] is not None for m in measures), row
    assert sum(row["count"] for row in card["per_class"].values()) == 66
    counts: dict[int, int] = {}
    ids = []
    for c in labels:  # records are numbered per class in the order written
        counts[c] = counts.get(c, -1) + 1
        ids.append(f"c{c:04d}-i{counts[c]:06d}")
    planted = set(ids[60:])
    leaks = json.loads((folder / LEAKAGE_FILE).read_text())["flagged"]
    assert set(leaks) == planted  # the planted copies and nothing else
    assert sum(1 for hits in leaks.values() if hits["test"]["exact_copy_of"]) == 3
    assert card["leakage"]["sets"]["test"]["overall"]["exact"] == 3
    assert card["leakage"]["sets"]["train"]["overall"]["n"] == 66
    data = SyntheticDataModule(str(folder), view="no_leaks", image_size=16)
    assert len(data.records) == 60 and not set(leaks) & {r["id"] for r in data.records}
    assert "## Leakage guard" in (folder / CARD_MARKDOWN).read_text()
    # the experiment report's table of cards
    lines = cards_section([{"label": "tiny", "folder": "set"}, {"label": "none", "folder": "nothing"}], tmp_path)
    row = next(line for line in lines if line.startswith("| tiny |"))
    assert row.startswith("| tiny | 66 |") and "| 6 (3) |" in row
    assert any(line.startswith("| none | no card |") for line in lines)
    grid = Image.open(folder / CARD_GRID)
    assert grid.size[1] > 3 * grid.size[0]  # a row of 3 samples per class, 10 classes

    # a set whose manifest lost an image is refused before any work
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    lines = (broken / MANIFEST_FILE).read_text().splitlines()
    (broken / MANIFEST_FILE).write_text("\n".join(lines[1:]) + "\n")
    tree["data"]["init_args"]["data"]["init_args"]["folder"] = str(broken)
    recipe.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match="disagree"):
        cli_main(["predict", "-c", str(recipe)])


@pytest.mark.slow
def test_a_feature_extractor_for_another_image_size_is_refused_with_the_fix(fmnist_fixture, tmp_path):
    out = tmp_path / "vit_oracle"
    # an oracle whose ViT is built for 16 px images
    run_recipe(REPO / "configs/classifier/fashion_5shot.yaml", {"fmnist": fmnist_fixture, "out": tmp_path},
               "--trainer.max_steps=1", "--test_after_fit=no", f"--trainer.default_root_dir={out}",
               "--model.init_args.backbone.init_args.model_name=test_vit", "--model.init_args.channels_last=false",
               "--model.init_args.backbone.init_args.model_kwargs={img_size: 16, dynamic_img_size: false}")
    (checkpoint,) = out.glob("version_*/checkpoints/last.ckpt")
    folder = tmp_path / "set"
    write_images_as_dataset(folder, list(FASHION_MNIST_CLASSES),
                            ((i % 10, png_bytes(im)) for i, im in enumerate(clean_images(20, 32, 0))), shard_size=8)
    paths = {"fmnist": fmnist_fixture, "out": tmp_path, "synthetic": folder, "oracle": checkpoint}
    tree = shrink(load_recipe(REPO / "configs/evaluate/data_card.yaml"), paths)
    for part in ("data", "reference"):  # the set and the real data at 32 px
        tree["data"]["init_args"][part]["init_args"]["image_size"] = 32
    tree["data"]["init_args"]["data"]["init_args"]["folder"] = str(folder)
    tree["model"]["init_args"].update(features="oracle", clip=None, quality=None)
    tree["trainer"].update(accelerator="cpu", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False)
    recipe = tmp_path / "card.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match="cannot take 32x32 images.*Set the DataModule's image_size"):
        cli_main(["predict", "-c", str(recipe)])
    assert not (folder / CARD_JSON).exists()


def test_per_class_card_section_puts_sets_side_by_side(tmp_path):
    from lbgen.evaluation.card import card_classes_section

    card = {"overall": {"label_consistency": 0.5, "most_frequent_wrong_label": None, "sharpness": 0.01,
                        "sharpness_real": 0.02},
            "per_class": {"Shirt": {"label_consistency": 0.25, "most_frequent_wrong_label": "T-shirt/top",
                                    "most_frequent_wrong_share": 0.6, "sharpness": 0.004, "sharpness_real": 0.03}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CARD_JSON).write_text(json.dumps(card))
    lines = card_classes_section([{"label": "A", "folder": "a"}, {"label": "B", "folder": "b"}], tmp_path)
    assert "No card yet: B." in lines[2] and "| class | A | real sharpness |" in lines
    assert "| Shirt | 25.0%, T-shirt/top (60%), 4.0 | 30.0 |" in lines
    assert "| overall | 50.0%, 10.0 | 20.0 |" in lines
