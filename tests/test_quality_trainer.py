"""The embedded quality model: graded distortions, the ranking loss, training raises the Spearman correlation, and
the saved folder loads back through pyiqa (QualityLoss) with identical scores and no download."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lbgen.components.distortions import DISTORTIONS, distort, distort_each, distortion_strength
from lbgen.datamodules import FashionMNISTDataModule
from lbgen.losses import QualityLoss
from lbgen.losses.quality import QUALITY_CONFIG_FILE, QUALITY_WEIGHTS_FILE
from lbgen.models import QualitySystem
from lbgen.models.quality import pairwise_ranking_loss


def test_distortions_are_graded_seeded_and_level_zero_is_clean():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16)
    for kind in DISTORTIONS:
        assert torch.equal(distort(images, kind, 0), images)
        errors = [(distort(images, kind, level, 4, torch.Generator().manual_seed(1)) - images).abs().mean()
                  for level in (1, 2, 4)]
        assert errors[0] < errors[1] < errors[2], kind  # stronger level, more damage
    with pytest.raises(ValueError, match="level"):
        distortion_strength("blur", 5, 4)
    with pytest.raises(ValueError, match="Unknown distortion"):
        distortion_strength("sharpen", 1, 4)
    kinds, levels = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 0, 2, 1])
    a = distort_each(images, kinds, levels, generator=torch.Generator().manual_seed(5))
    b = distort_each(images, kinds, levels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a[1], images[1])


def test_pairwise_ranking_loss():
    levels = torch.tensor([0, 1, 2])
    assert pairwise_ranking_loss(torch.tensor([1.0, 0.5, 0.0]), levels, margin=0.1) == 0
    wrong = pairwise_ranking_loss(torch.tensor([0.0, 0.5, 1.0]), levels, margin=0.1)
    assert wrong.item() == pytest.approx((0.6 + 1.1 + 0.6) / 3)
    # equal levels are not compared
    assert pairwise_ranking_loss(torch.tensor([0.0, 9.0]), torch.tensor([1, 1]), 0.1).isnan()


def make_system(tmp_path, **kwargs) -> QualitySystem:
    torch.manual_seed(0)
    quality = QualityLoss("cnniqa", metric_kwargs={"pretrained": None, "n_kers": 16, "n1_nodes": 64,
                                                   "n2_nodes": 64})
    return QualitySystem(quality, output_dir=str(tmp_path / "quality"), **kwargs)


def test_every_trainable_parameter_gets_a_gradient(tmp_path, monkeypatch):
    system = make_system(tmp_path)
    batch = {"image": torch.rand(8, 3, 16, 16), "label": torch.zeros(8, dtype=torch.long)}
    training_loss, returned = system.training_loss, []
    monkeypatch.setattr(system, "training_loss", lambda *args: returned.append(training_loss(*args)) or returned[-1])
    loss = system.training_step(batch, 0)
    assert loss is returned[0][0] and set(returned[0][1]) == {"ranking"}  # the step trains on training_loss's total
    loss.backward()
    trainable = {n: p for n, p in system.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("quality.metric.net.") for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.slow
def test_training_learns_to_rank_and_the_folder_loads_back_through_pyiqa(fmnist_fixture, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    data = FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, val_per_class=2, augmentation="none",
                                  batch_size=32, eval_batch_size=100)
    system = make_system(tmp_path, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=1000)
    before = trainer.validate(system, datamodule=data, verbose=False)[0]["val/spearman"]
    trainer.fit(system, datamodule=data)
    after = trainer.validate(system, datamodule=data, verbose=False)[0]["val/spearman"]
    assert after > 0.6 and after > before + 0.2, (before, after)
    folder = tmp_path / "quality"
    assert (folder / QUALITY_CONFIG_FILE).is_file() and (folder / QUALITY_WEIGHTS_FILE).is_file()
    loaded = QualityLoss("cnniqa", checkpoint=str(folder))  # architecture arguments come from the folder
    images = torch.rand(3, 3, 16, 16)
    system.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), system.quality(images))
    assert not any((tmp_path / "torch_home").rglob("*.pth"))  # nothing downloaded
    with pytest.raises(ValueError, match="musiq"):
        QualityLoss("musiq", checkpoint=str(folder))
    with pytest.raises(FileNotFoundError, match="quality"):
        QualityLoss("cnniqa", checkpoint=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QualityLoss("cnniqa", checkpoint=str(tmp_path / "missing.safetensors"))


def test_bad_arguments_are_reported(tmp_path):
    with pytest.raises(ValueError, match="Unknown distortions"):
        make_system(tmp_path, distortions=["sharpen"])
    with pytest.raises(ValueError, match="num_levels"):
        make_system(tmp_path, num_levels=0)
    with pytest.raises(ValueError, match="Unknown pyiqa metric"):
        QualityLoss("not-a-metric")


def test_spearman_matches_scipy_on_large_tied_samples():
    from scipy.stats import spearmanr

    from lbgen.models.quality import Spearman

    torch.manual_seed(0)
    levels = torch.randint(5, (200_000,)).float()  # the size of this system's test set, 5 tied target values
    scores = -levels + 0.5 * torch.randn(len(levels))
    metric = Spearman()
    for s, t in zip(scores.split(30_000), levels.split(30_000), strict=True):
        metric.update(s, -t)
    expected = spearmanr(scores.numpy(), -levels.numpy()).statistic
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6) and expected > 0.9
