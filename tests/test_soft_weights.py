"""Soft weights: a manifest score becomes each image's loss weight; a weight of 0 removes the image's gradient, 0/1
weights are the hard filter, equal weights change nothing."""

from __future__ import annotations

import pytest
import torch

from lbgen.datamodules import FASHION_MNIST_CLASSES, FashionMNISTDataModule, MixedDataModule, SyntheticDataModule
from lbgen.datamodules.base import REAL, SYNTHETIC
from lbgen.losses import SourceWeightedCrossEntropy
from lbgen.models.batches import unpack_batch, unpack_weights
from lbgen.storage.dataset_format import png_bytes, read_manifest, write_images_as_dataset, write_manifest

from .test_leakage import clean_images


def test_a_zero_weight_removes_the_image_and_equal_weights_change_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    target, source = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([REAL, REAL, SYNTHETIC, SYNTHETIC, SYNTHETIC,
                                                                      SYNTHETIC])
    for loss in (SourceWeightedCrossEntropy(label_smoothing=0.1), SourceWeightedCrossEntropy(real_weight=0.8)):
        weight = torch.tensor([1.0, 1.0, 0.0, 0.7, 0.2, 1.0])
        (grad,) = torch.autograd.grad(loss(logits, target, source, weight), logits)
        assert grad[2].abs().sum() == 0 and all(grad[i].abs().sum() > 0 for i in (0, 1, 3, 4, 5))
        # 0/1 weights are the hard filter: the same loss as the batch without the zero-weighted image
        hard = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
        keep = hard.bool()
        torch.testing.assert_close(loss(logits, target, source, hard), loss(logits[keep], target[keep], source[keep]))
        torch.testing.assert_close(loss(logits, target, source, torch.full((6,), 0.3)), loss(logits, target, source))
    zero = SourceWeightedCrossEntropy()(logits, target, source, torch.zeros(6))
    assert zero == 0 and zero.requires_grad  # nothing to learn from, the graph kept
    with pytest.raises(ValueError, match="one per sample"):
        SourceWeightedCrossEntropy()(logits, target, source, torch.ones(5))


@pytest.fixture()
def scored_set(tmp_path):
    """20 images of 10 classes whose manifest holds a CLIP score (0 for the first image of each class)."""
    folder = tmp_path / "set"
    images = clean_images(20, 16, seed=0)
    write_images_as_dataset(folder, list(FASHION_MNIST_CLASSES),
                            ((i % 10, png_bytes(im)) for i, im in enumerate(images)), shard_size=8)
    _, records = read_manifest(folder)
    for r in records:
        r["scores"] = {"clip_prob": 0.0 if r["index"] == 0 else 0.25 + 0.05 * r["class_index"]}
    write_manifest(folder, records)
    return folder


def test_weights_reach_the_loss_from_the_manifest(scored_set, fmnist_fixture):
    data = SyntheticDataModule(str(scored_set), image_size=16, weight_field="clip_prob", batch_size=20,
                               augmentation="none")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    expected = {r["id"]: r["scores"]["clip_prob"] for r in data.records}
    got = unpack_weights(batch)
    assert got is not None and len(got) == 20
    assert sorted(got.tolist()) == pytest.approx(sorted(expected.values()))
    for index, w in zip(batch["index"].tolist(), got.tolist(), strict=True):
        assert w == pytest.approx(expected[data.records[index]["id"]])
    # through a classifier's loss: the zero-weighted images (the first of each class) get no gradient
    from lbgen.components import TimmBackbone
    from lbgen.models import ClassifierSystem

    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10).eval()  # eval: no batch-norm coupling
    images, labels, source = unpack_batch(batch)
    images = images.clone().requires_grad_(True)
    loss = model.loss(model(images), labels, source, unpack_weights(batch))
    (grad,) = torch.autograd.grad(loss, images)
    zero = got == 0
    assert zero.sum() == 10 and grad[zero].abs().sum() == 0 and (grad[~zero].flatten(1).abs().sum(1) > 0).all()
    # mixed with real images: those weigh 1.0
    real = FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, shots=2, batch_size=40, augmentation="none")
    mixed = MixedDataModule(real, data)
    mixed.setup("fit")
    batch = next(iter(mixed.train_dataloader()))
    weights, source = unpack_weights(batch), batch["source"]
    assert (weights[source == REAL] == 1).all() and (source == SYNTHETIC).any()
    scores = torch.tensor(list(expected.values()))
    assert all((scores - w).abs().min() < 1e-6 for w in weights[source == SYNTHETIC].tolist())


def test_a_missing_score_is_refused_with_the_fix(scored_set):
    with pytest.raises(ValueError, match="score the dataset first"):
        SyntheticDataModule(str(scored_set), image_size=16, weight_field="oracle_prob")
    with pytest.raises(ValueError, match="mode: memory"):
        SyntheticDataModule(str(scored_set), image_size=16, weight_field="clip_prob", mode="stream")


def test_the_classifier_step_passes_the_batch_weights_to_its_loss():
    from lbgen.components import TimmBackbone
    from lbgen.models import ClassifierSystem

    torch.manual_seed(0)
    system = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=4)
    images = torch.rand(4, 3, 16, 16)
    labels, source = torch.tensor([0, 1, 2, 3]), torch.tensor([SYNTHETIC] * 4)
    logits = system(images)
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])
    weighted, _ = system.training_loss(logits, labels, source, weight)
    keep = weight.bool()
    torch.testing.assert_close(weighted, system.loss(logits[keep], labels[keep], source[keep]))
    # and through training_step, from the batch dict the synthetic DataModule builds
    captured = {}
    system.training_loss = lambda *args: captured.setdefault("args", args) and (args[0].sum(), {})
    system.log = lambda *a, **k: None
    system.training_step({"image": images, "label": labels, "source": source, "weight": weight}, 0)
    assert torch.equal(captured["args"][3], weight)
    with pytest.raises(TypeError, match="takes none"):
        ClassifierSystem(TimmBackbone("test_resnet"), num_classes=4, loss=torch.nn.CrossEntropyLoss()).training_loss(
            logits, labels, source, weight)
