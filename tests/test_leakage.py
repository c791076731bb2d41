"""The leakage guard: the chunked nearest-neighbour search is exact, planted copies of test images (exact and lightly
perturbed) are found, a clean set raises no flag, and the view without the copies is one SyntheticDataModule reads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lbgen.datamodules import FashionMNISTDataModule, SyntheticDataModule
from lbgen.evaluation.leakage import (
    find_copies,
    image_hashes,
    leakage_report,
    nearest_neighbours,
    no_leaks_view,
    pixel_features,
)
from lbgen.storage.dataset_format import png_bytes, read_manifest, write_images_as_dataset


def test_chunked_search_equals_the_full_similarity_matrix():
    g = torch.Generator().manual_seed(0)
    queries, references = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    full = F.normalize(queries, dim=1) @ F.normalize(references, dim=1).T
    sims, where = nearest_neighbours(queries, references, block_queries=5, block_references=7)
    assert torch.allclose(sims, full.max(1).values, atol=1e-6) and torch.equal(where, full.argmax(1))
    own = F.normalize(queries, dim=1) @ F.normalize(queries, dim=1).T
    own.fill_diagonal_(-2)
    sims, where = nearest_neighbours(queries, queries, block_queries=4, block_references=6, exclude_self=True)
    assert torch.equal(where, own.argmax(1)) and torch.allclose(sims, own.max(1).values, atol=1e-6)
    with pytest.raises(ValueError, match="one feature space"):
        nearest_neighbours(queries, torch.randn(3, 5))


def clean_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields: nothing like a Fashion-MNIST-shaped image."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def planted_set(test_images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """20 clean images, then exact copies of test images 0-2 and perturbed copies (noise, brightness) of 3-5."""
    g = torch.Generator().manual_seed(seed)
    exact = test_images[[0, 1, 2]]
    noisy = test_images[[3, 4, 5]].int() + torch.randint(-4, 5, test_images[[3, 4, 5]].shape, generator=g) + 6
    images = torch.cat([clean_images(20, test_images.shape[-1], seed), exact, noisy.clamp(0, 255).to(torch.uint8)])
    return images, list(range(20, 23)), list(range(23, 26))


def fixture_test_images(root) -> torch.Tensor:
    """The Fashion-MNIST-shaped fixture's test images at 16 px, as the real DataModule delivers them."""
    source, _ = FashionMNISTDataModule(root=str(root), image_size=16).load_test()
    return torch.stack([source.load(i) for i in range(len(source))])


@pytest.fixture(scope="module")
def real_test(fmnist_fixture) -> torch.Tensor:
    return fixture_test_images(fmnist_fixture)


def test_planted_copies_of_test_images_are_found_and_a_clean_set_raises_no_flag(real_test):
    images, exact, perturbed = planted_set(real_test)
    found = find_copies(pixel_features(images / 255), image_hashes(images), pixel_features(real_test / 255),
                        image_hashes(real_test), threshold=0.95, block_queries=7, block_references=11)
    assert [i for i, f in enumerate(found["flagged"]) if f] == exact + perturbed
    assert [found["exact"][i] for i in exact] == [0, 1, 2] and all(found["exact"][i] is None for i in perturbed)
    assert [found["neighbour"][i] for i in perturbed] == [3, 4, 5]
    assert min(found["similarity"][i] for i in perturbed) > 0.98  # light perturbations stay near copies
    clean = clean_images(200, 16, seed=1)
    found = find_copies(pixel_features(clean / 255), image_hashes(clean), pixel_features(real_test / 255),
                        image_hashes(real_test), threshold=0.95)
    assert not any(found["flagged"]) and max(found["similarity"]) < 0.9


def test_the_no_leaks_view_is_read_by_the_synthetic_datamodule(real_test, tmp_path):
    images, exact, perturbed = planted_set(real_test)
    labels = [i % 2 for i in range(len(images))]
    folder = tmp_path / "set"
    write_images_as_dataset(folder, ["a", "b"], ((c, png_bytes(im)) for c, im in zip(labels, images, strict=True)),
                            shard_size=8)
    _, records = read_manifest(folder)
    position = {(r["class_index"], r["index"]): k for k, r in enumerate(records)}
    # records are numbered per class in the order written: image i is record (class i % 2, index i // 2)
    order = [position[(i % 2, i // 2)] for i in range(len(images))]
    records = [records[k] for k in order]
    found = find_copies(pixel_features(images / 255), image_hashes(images), pixel_features(real_test / 255),
                        image_hashes(real_test), threshold=0.95)
    ids = [f"test:{i}" for i in range(len(real_test))]
    report = leakage_report(records, ["a", "b"], {"test": found}, {"test": ids})
    planted = {records[i]["id"] for i in exact + perturbed}
    assert set(report["flagged"]) == planted
    assert report["flagged"][records[exact[0]]["id"]]["test"]["exact_copy_of"] == "test:0"
    block = report["sets"]["test"]
    assert block["overall"]["flagged"] == 6 and block["overall"]["exact"] == 3 and block["overall"]["n"] == 26
    assert sum(row["flagged"] for row in block["per_class"].values()) == 6
    view = no_leaks_view(records, ["a", "b"], set(report["flagged"]))
    (folder / "views").mkdir()
    (folder / "views" / "no_leaks.json").write_text(json.dumps(view))
    data = SyntheticDataModule(str(folder), view="no_leaks", image_size=16)
    assert {r["id"] for r in data.records} == {r["id"] for r in records} - planted
