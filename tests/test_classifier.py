"""Classifier system and backbone: what trains, what is written, what transfers."""

from __future__ import annotations

import json
import pickle

import lightning as L
import pytest
import torch

from lbgen.components import TimmBackbone
from lbgen.datamodules import FashionMNISTDataModule
from lbgen.models import ClassifierSystem


def _classifier(**kwargs) -> ClassifierSystem:
    torch.manual_seed(0)
    return ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, **kwargs)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {"accelerator": "cpu", "logger": L.pytorch.loggers.CSVLogger(tmp_path, name=""),
                "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(default_root_dir=tmp_path, **{**defaults, **kwargs})


def test_backbone_takes_images_in_unit_range():
    backbone = TimmBackbone("test_resnet")
    features = backbone(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, backbone.num_features)
    with pytest.raises(ValueError, match="Unknown timm model"):
        TimmBackbone("resnet_does_not_exist")


def test_one_step_trains_only_trainable_parameters(fmnist_fixture, tmp_path):
    model = _classifier(finetune="linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.backbone.named_buffers()}
    dm = FashionMNISTDataModule(root=str(fmnist_fixture), shots=5, batch_size=16)
    _trainer(tmp_path, max_steps=1).fit(model, dm)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name
    for name, buffer in model.backbone.named_buffers():  # a linear probe keeps BatchNorm statistics frozen
        torch.testing.assert_close(buffer, buffers[name], msg=name)


def test_full_finetune_learns_and_writes_test_report(fmnist_fixture, tmp_path):
    model = _classifier(optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = FashionMNISTDataModule(root=str(fmnist_fixture), val_per_class=5, batch_size=32, augmentation="none")
    trainer = _trainer(tmp_path, max_steps=60, check_val_every_n_epoch=100)
    trainer.fit(model, dm)
    result = trainer.test(model, dm)[0]
    assert result["test/acc"] > 0.5  # fixture classes are separable; chance is 0.1
    metrics = json.loads((tmp_path / "version_0" / "test_metrics.json").read_text())
    confusion = json.loads((tmp_path / "version_0" / "confusion_matrix.json").read_text())
    assert metrics["acc"] == pytest.approx(result["test/acc"], abs=1e-6)
    assert confusion["class_names"][0] == "T-shirt/top"
    matrix = torch.tensor(confusion["matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 60 and (matrix.sum(1) == 6).all()
    assert metrics["buckets"] is None  # balanced training set: no Many / Medium / Few


def test_long_tail_run_reports_buckets(fmnist_fixture, tmp_path):
    model = _classifier(many_threshold=15, few_threshold=5)
    dm = FashionMNISTDataModule(root=str(fmnist_fixture), imbalance_factor=20, max_per_class=25, batch_size=32)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(model, dm)
    result = trainer.test(model, dm)[0]
    assert {"test/acc_many", "test/acc_medium", "test/acc_few"} <= set(result)
    metrics = json.loads((tmp_path / "version_0" / "test_metrics.json").read_text())
    assert metrics["train_class_counts"][0] == 25 and metrics["train_class_counts"][-1] == 1
    assert metrics["buckets"][0] == "many" and metrics["buckets"][-1] == "few"


def test_tuple_batches_are_accepted():
    model = _classifier()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = model.training_step((images, labels), 0)
    logits = model(images)  # train mode, so batch statistics: the step's logits again
    total, terms = model.training_loss(logits, labels)
    assert set(terms) == {"cross_entropy"}
    torch.testing.assert_close(loss, total)  # the step trains on training_loss's total: cross-entropy here
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_backbone_transfers_from_a_classifier_checkpoint(fmnist_fixture, tmp_path):
    model = _classifier()
    dm = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, batch_size=8)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    trainer.fit(model, dm)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    ckpt = ckpt or str(tmp_path / "manual.ckpt")
    trainer.save_checkpoint(ckpt)
    loaded = TimmBackbone("test_resnet", checkpoint_path=ckpt)
    for (name, a), b in zip(model.backbone.model.state_dict().items(), loaded.model.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="does not hold weights"):
        TimmBackbone("resnet10t", checkpoint_path=ckpt)


def test_pretrained_backbone_is_saved_for_transfer(fmnist_fixture, tmp_path):
    """Pre-train -> ``backbone_output`` (safetensors) -> a transfer run's ``TimmBackbone(checkpoint_path=...)``."""
    out = tmp_path / "pretrain" / "backbone.safetensors"
    model = _classifier(backbone_output=str(out))
    _trainer(tmp_path, max_steps=2).fit(model, FashionMNISTDataModule(root=str(fmnist_fixture), shots=2,
                                                                       batch_size=8))
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    probe = ClassifierSystem(TimmBackbone("test_resnet", checkpoint_path=str(out)), num_classes=10, finetune="linear")
    for (name, a), b in zip(model.backbone.state_dict().items(), probe.backbone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(p.requires_grad for p in probe.backbone.parameters())


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    with pytest.raises(ValueError, match="cannot be loaded safely|not a plain weights file"):
        TimmBackbone("test_resnet", checkpoint_path=str(path))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 1}, "at least 2"),
    ({"class_names": ["a", "b"]}, "2 class_names given"),
    ({"finetune": "partial"}, "'full' or 'linear'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierSystem(TimmBackbone("test_resnet"), **{"num_classes": 10, **kwargs})
