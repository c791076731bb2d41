"""lbGen building blocks: CLIP as a differentiable scorer, L_in, L_en and L_q (tiny real models, offline)."""

from __future__ import annotations

import pytest
import torch

from lbgen.components.clip import ClipScorer
from lbgen.losses import DatasetAlignmentLoss, InstanceAlignmentLoss, QualityLoss

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def clip() -> ClipScorer:
    torch.manual_seed(0)
    return ClipScorer(model_config=TINY_CLIP, pretrained=None)


def test_clip_scorer_is_differentiable_and_caches_text(clip):
    images = torch.rand(3, 3, 48, 40, requires_grad=True)  # any size: resized on the shorter side, centre-cropped
    features = clip.encode_images(images)
    assert features.shape == (3, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    features.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    texts = clip.encode_texts(["a photo of a Bag", "a photo of a Coat"])
    assert texts.shape == (2, 32) and clip.encode_texts(["a photo of a Bag", "a photo of a Coat"]) is texts
    assert not any(p.requires_grad for p in clip.parameters())


def test_instance_alignment_uses_each_images_own_class():
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([2, 0, 3])
    loss = InstanceAlignmentLoss()
    assert loss(text[labels], text, labels).item() == pytest.approx(0.0, abs=1e-6)
    wrong_labels = torch.tensor([0, 3, 2])
    per_image = [1 - torch.nn.functional.cosine_similarity(text[i], text[w], dim=0)
                 for i, w in zip(labels, wrong_labels, strict=True)]  # each image against its (wrong) own class only
    torch.testing.assert_close(loss(text[labels], text, wrong_labels), torch.stack(per_image).mean())
    # the official code's average over all pairs is not zero even for perfectly aligned images
    all_pairs = (1 - text[labels] @ text.T).mean()
    assert all_pairs > 0.1


def test_dataset_alignment_discriminator_learns_and_generator_gets_gradient():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(64, 16) + 2, dim=-1)
    image = torch.nn.functional.normalize(torch.randn(64, 16) - 2, dim=-1).requires_grad_(True)
    loss = DatasetAlignmentLoss(feature_dim=16, hidden_dim=32)
    optimizer = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-2)
    first = loss.discriminator_loss(text, image)
    for _ in range(30):
        optimizer.zero_grad()
        d_loss = loss.discriminator_loss(text, image)
        d_loss.backward()
        optimizer.step()
    assert d_loss < first * 0.5
    assert image.grad is None  # the discriminator step never reaches the generator
    loss(image).backward()
    assert image.grad.abs().sum() > 0


def test_quality_loss_offline_direction_and_gradient(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    quality = QualityLoss("cnniqa", input_size=32, metric_kwargs={"pretrained": None})
    assert quality.lower_better is False  # cnniqa: higher is better, so the loss is its negative
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    value = quality(images)
    score = quality.metric(torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True))
    assert value.item() == pytest.approx(-score.mean().item(), rel=1e-5)
    value.backward()
    assert images.grad.abs().sum() > 0
    assert not list(tmp_path.rglob("*.pth"))  # nothing downloaded or cached


def test_every_alignment_term_reaches_the_pixels(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    quality = QualityLoss("cnniqa", input_size=32, metric_kwargs={"pretrained": None})
    names = ["T-shirt/top", "Bag", "Coat"]
    text = clip.encode_texts([f"a photo of a {n}" for n in names])
    dataset = DatasetAlignmentLoss(feature_dim=32, hidden_dim=16)
    terms = {"instance": lambda f, x: InstanceAlignmentLoss()(f, text, torch.tensor([0, 2])),
             "dataset": lambda f, x: dataset(f), "quality": lambda f, x: quality(x)}
    for name, term in terms.items():
        images = torch.rand(2, 3, 32, 32, requires_grad=True)
        term(clip.encode_images(images), images).backward()
        assert images.grad is not None and images.grad.abs().sum() > 0, name
