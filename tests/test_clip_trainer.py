"""ClipSystem: contrastive training on class captions, zero-shot evaluation, and the saved local-dir folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from open_clip.loss import ClipLoss

from lbgen.components.clip import ClipScorer
from lbgen.datamodules import FashionMNISTDataModule
from lbgen.datamodules.fashion_mnist import CLASS_NAMES
from lbgen.models import ClipSystem
from lbgen.models.clip import CONFIG_FILE, WEIGHTS_FILE, label_contrastive_loss

TINY_MODEL = {"embed_dim": 32,
              "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 64, "head_width": 32, "layers": 2},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def make_model(**kwargs) -> ClipSystem:
    torch.manual_seed(0)
    return ClipSystem(model_config=TINY_MODEL, class_names=CLASS_NAMES, num_classes=len(CLASS_NAMES), **kwargs)


def make_data(root: Path) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=str(root), image_size=16, val_per_class=3, augmentation="none", batch_size=50,
                                  eval_batch_size=100)


def fit(model: ClipSystem, data: FashionMNISTDataModule, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=1000)
    trainer.fit(model, datamodule=data)
    return trainer


@pytest.fixture(scope="module")
def trained(fmnist_fixture, tmp_path_factory) -> dict:
    """A tiny CLIP before and after training on the learnable fixture, saved to a local-dir folder."""
    L.seed_everything(0)
    data = make_data(fmnist_fixture)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model = make_model(output_dir=str(tmp_path_factory.mktemp("clip") / "clip"),
                       optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))  # 3e-3 is on the edge of divergence
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    before = trainer.test(model, datamodule=data, verbose=False)[0]["test/zero_shot_acc"]
    torch.manual_seed(0)
    loss_before = model.training_loss(batch["image"], batch["label"])[0].item()
    trainer = fit(model, data, steps=120)
    after = trainer.test(model, datamodule=data, verbose=False)[0]["test/zero_shot_acc"]
    torch.manual_seed(0)
    loss_after = model.training_loss(batch["image"], batch["label"])[0].item()
    return {"model": model.eval(), "folder": Path(model.output_dir), "acc": (before, after),
            "loss": (loss_before, loss_after)}


def test_training_lowers_the_loss_and_learns_zero_shot(trained):
    before, after = trained["acc"]
    assert trained["loss"][1] < trained["loss"][0] - 0.5
    assert after >= 0.6 > before + 0.3  # 10 classes: chance is 0.1


def test_saved_folder_loads_through_clip_scorer_with_identical_features(trained):
    model, folder = trained["model"], trained["folder"]
    assert (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
    scorer = ClipScorer(model_name=f"local-dir:{folder}", pretrained=None)
    images = torch.rand(4, 3, 28, 28)  # not the model's size: both resize the same way
    texts = [f"a photo of a {name}." for name in CLASS_NAMES]
    with torch.no_grad():
        torch.testing.assert_close(scorer.encode_images(images), model.clip.encode_images(images))
        torch.testing.assert_close(scorer.encode_texts(texts),
                                   model.clip.model.encode_text(model.clip.tokenizer(texts), normalize=True))
    torch.testing.assert_close(scorer.mean, model.clip.mean)
    torch.testing.assert_close(scorer.std, model.clip.std)
    assert scorer.model.visual.preprocess_cfg["mean"] == list(model.hparams.image_mean)
    assert scorer.tokenizer.context_length == TINY_MODEL["text_cfg"]["context_length"]
    # a fresh model differs, so the equality above means the weights were really loaded
    fresh = ClipScorer(model_config=TINY_MODEL, pretrained=None)
    assert not torch.allclose(fresh.model.visual.conv1.weight, scorer.model.visual.conv1.weight)


@pytest.mark.parametrize("term", ["image_to_text", "text_to_image"])
def test_every_weighted_term_reaches_every_trainable_parameter(term):
    model = make_model()
    images, labels = torch.rand(12, 3, 16, 16), torch.arange(12) % 4
    _, terms = model.training_loss(images, labels)
    assert set(terms) == {"image_to_text", "text_to_image"}
    terms[term].backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert "clip.model.token_embedding.weight" not in trainable  # frozen by default (see the docstring)
    assert sum(p.numel() for p in trainable.values()) == sum(
        p.numel() for n, p in model.clip.model.named_parameters() if n != "token_embedding.weight")
    missing = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{term} does not reach {missing}"


def test_trained_total_is_the_weighted_sum_of_every_term(monkeypatch):
    """``training_loss``'s total, which ``training_step`` returns for Lightning to back-propagate, carries each
    term's gradient with its weight. Mutations checked: with ``training_loss`` returning only the weighted
    ``image_to_text`` term, this test fails at the ``assert_close`` of the total; with ``training_step`` returning
    ``terms["image_to_text"]``, at its last line."""
    model = make_model(image_to_text_weight=0.7, text_to_image_weight=1.3)  # not 1: a dropped weight fails too
    images, labels = torch.rand(12, 3, 16, 16), torch.arange(12) % 4
    total, terms = model.training_loss(images, labels, [torch.Generator().manual_seed(i) for i in range(12)])
    assert set(terms) == set(model.weights) == {"image_to_text", "text_to_image"}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, trainable, retain_graph=True, materialize_grads=True)
        return torch.cat([g.flatten() for g in grads])

    full, parts = gradient(total), {name: gradient(term) for name, term in terms.items()}
    for name, part in parts.items():
        assert not torch.allclose(full, full - model.weights[name] * part, rtol=1e-3, atol=1e-6), name
    torch.testing.assert_close(full, sum(model.weights[n] * g for n, g in parts.items()), rtol=1e-3, atol=1e-6,
                               msg="the total is not the weighted sum of its terms")
    # training_step returns that very total (Lightning back-propagates what the step returns)
    training_loss, returned = model.training_loss, []
    monkeypatch.setattr(model, "training_loss", lambda *args: returned.append(training_loss(*args)) or returned[-1])
    assert model.training_step({"image": images, "label": labels}, 0) is returned[0][0]


def test_zero_weight_drops_the_term():
    model = make_model(text_to_image_weight=0.0)
    total, terms = model.training_loss(torch.rand(4, 3, 16, 16), torch.arange(4))
    assert set(terms) == {"image_to_text"}
    torch.testing.assert_close(total, terms["image_to_text"])
    with pytest.raises(ValueError, match="loss weights"):
        make_model(image_to_text_weight=0.0, text_to_image_weight=0.0)


def test_label_contrastive_loss_is_clip_loss_when_labels_are_distinct():
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 8), dim=-1) for _ in range(2))
    scale = torch.tensor(10.0)
    image_to_text, text_to_image = label_contrastive_loss(scale * image @ text.t(), torch.arange(6))
    torch.testing.assert_close((image_to_text + text_to_image) / 2, ClipLoss()(image, text, scale))
    # same-class captions are all positives: with perfect features the loss is the entropy of the targets, log(2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    features = torch.nn.functional.one_hot(labels).float()
    for loss in label_contrastive_loss(100 * features @ features.t(), labels):
        torch.testing.assert_close(loss, torch.tensor(2.0).log())

def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="class_names"):
        ClipSystem(model_config=TINY_MODEL)
    with pytest.raises(ValueError, match="num_classes=3"):
        ClipSystem(model_config=TINY_MODEL, class_names=CLASS_NAMES, num_classes=3)
    with pytest.raises(ValueError, match="template"):
        ClipSystem(model_config=TINY_MODEL, class_names=CLASS_NAMES, templates=["a photo."])


def test_own_captions_with_one_template_give_the_class_caption_loss():
    # a batch's own captions equal to its class captions (one template): the same positives, the same loss
    model = make_model(templates=["a photo of a {}."])
    images, labels = torch.rand(12, 3, 16, 16), torch.arange(12) % 4
    captions = [f"a photo of a {CLASS_NAMES[int(c)]}." for c in labels]
    torch.testing.assert_close(model.caption_training_loss(images, captions)[0], model.training_loss(images, labels)[0])
    # attribute words split a class: images of the same class with other captions are no longer positives
    split = [f"{c} on grass" if i % 2 else f"{c} on gravel" for i, c in enumerate(captions)]
    assert not torch.allclose(model.caption_training_loss(images, split)[0], model.training_loss(images, labels)[0])
    # a plain class caption is true of its whole class: marked plain, every caption of a batch of plain ones is the
    # class caption again, so the loss is the class caption loss whatever the other images' attribute words
    plain = torch.ones(12, dtype=torch.bool)
    torch.testing.assert_close(model.caption_training_loss(images, captions, labels, plain)[0],
                               model.training_loss(images, labels)[0])
    half = torch.arange(12) < 6  # plain captions for the first six (classes 0-3, 0, 1): shared with the rest
    mixed = [c if p else s for c, s, p in zip(captions, split, half.tolist(), strict=True)]
    assert not torch.allclose(model.caption_training_loss(images, mixed, labels, half)[0],
                              model.caption_training_loss(images, mixed)[0])  # the plain ones gained positives


def test_caption_terms_reach_every_trainable_parameter_and_training_step_uses_them(monkeypatch):
    model = make_model(image_to_text_weight=0.7, text_to_image_weight=1.3)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    captions = [f"a photo of a garment in the {b} background, a {CLASS_NAMES[int(c)]}"
                for b, c in zip(["grass", "brick"] * 4, labels, strict=True)]
    total, terms = model.caption_training_loss(images, captions)
    assert set(terms) == {"image_to_text", "text_to_image"}
    torch.testing.assert_close(total, 0.7 * terms["image_to_text"] + 1.3 * terms["text_to_image"])
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing
    calls = []
    monkeypatch.setattr(model, "training_loss", lambda *a: calls.append("labels") or (total, terms))
    original = model.caption_training_loss
    monkeypatch.setattr(model, "caption_training_loss", lambda *a: calls.append("captions") or original(*a))
    model.training_step({"image": images, "label": labels, "caption": captions}, 0)
    model.training_step({"image": images, "label": labels}, 0)
    assert calls == ["captions", "labels"]
