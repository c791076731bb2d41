"""The retrieval baseline: top-k pool images per class by CLIP text similarity, none a copy of a real training or
test image, written as a dataset folder the synthetic DataModule reads."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lbgen.components.clip import ClipScorer
from lbgen.datamodules import FashionMNISTDataModule, SyntheticDataModule
from lbgen.datamodules.reference import RealReferenceDataModule
from lbgen.evaluation.leakage import find_copies, image_hashes, pixel_features
from lbgen.models.retrieval import RetrievalSystem
from lbgen.storage.dataset_format import RUN_FILE, load_images, png_bytes, read_manifest, write_images_as_dataset

from .test_alignment_components import TINY_CLIP
from .test_leakage import planted_set


def stack(source) -> torch.Tensor:
    return torch.stack([source.load(i) for i in range(len(source))])


@pytest.mark.slow
def test_retrieval_takes_the_most_similar_non_copies_per_class(fmnist_fixture, tmp_path):
    reference = FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, shots=5, split_seed=0,
                                       eval_batch_size=64)
    train_pool = stack(reference.pool[0])
    test = stack(reference.load_test()[0])
    planted, exact, perturbed = planted_set(test)
    copies = planted[exact + perturbed]  # 3 exact and 3 perturbed copies of test images hide in the pool
    pool_images = torch.cat([train_pool, copies])
    # the pool: unlabelled images in shards (one dummy class: labels are never read). Distinct fixture images of a
    # class correlate at 0.992-0.994 in pixel space (one bar, weak noise), a lightly perturbed copy at 0.9997
    write_images_as_dataset(tmp_path / "pool", ["unlabelled"], ((0, png_bytes(im)) for im in pool_images),
                            shard_size=64)
    pool = SyntheticDataModule(str(tmp_path / "pool"), image_size=16, predict_split="train", eval_batch_size=64)
    torch.manual_seed(0)
    clip = ClipScorer(model_config=TINY_CLIP, pretrained=None)
    system = RetrievalSystem(clip, str(tmp_path / "retrieved"), images_per_class=4, dedup_space="pixels",
                             dedup_threshold=0.998, shard_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.predict(system, datamodule=RealReferenceDataModule(pool, reference), return_predictions=False)

    run, records = read_manifest(tmp_path / "retrieved")
    assert records and all(r["method"] == "retrieval" and {"similarity", "clip_prob", "pool_id"} <= set(r)
                           for r in records)
    assert len({r["pool_id"] for r in records}) == len(records)  # no image serves two classes
    assert max(sum(r["class_index"] == c for r in records) for c in range(10)) <= 4
    removed = run["retrieval"]["removed_as_copies"]
    assert removed >= len(reference.split.train) + len(copies)
    # nothing retrieved copies a training-split or a test image (the planted ones least of all)
    images = load_images(tmp_path / "retrieved", records, 16)
    split = train_pool[torch.as_tensor(reference.split.train)]
    for real in (split, test):
        found = find_copies(pixel_features(images / 255), image_hashes(images), pixel_features(real / 255),
                            image_hashes(real), threshold=0.998)
        assert not any(found["flagged"])
    planted_ids = {f"synthetic:{len(train_pool) + i}" for i in range(len(copies))}
    assert not planted_ids & {r["pool_id"] for r in records}
    # the recorded similarity is CLIP's, its class is CLIP's choice, and each class is ranked by it
    texts = [f"a photo of a {n}" for n in reference.class_names]
    with torch.no_grad():
        sims = clip.encode_images(images / 255) @ clip.encode_texts(texts).T
    assert torch.allclose(sims.max(1).values, torch.tensor([r["similarity"] for r in records]), atol=1e-4)
    assert sims.argmax(1).tolist() == [r["class_index"] for r in records]
    for c in range(10):
        own = sorted((r for r in records if r["class_index"] == c), key=lambda r: r["rank"])
        assert [r["similarity"] for r in own] == sorted((r["similarity"] for r in own), reverse=True)
    assert json.loads((tmp_path / "retrieved" / RUN_FILE).read_text())["requests"]["method"] == "retrieval"
    data = SyntheticDataModule(str(tmp_path / "retrieved"), image_size=16)  # a dataset like any generated one
    assert len(data.records) == len(records)
    with pytest.raises(FileExistsError, match="already holds"):
        trainer.predict(RetrievalSystem(clip, str(tmp_path / "retrieved")),
                        datamodule=RealReferenceDataModule(pool, reference), return_predictions=False)
