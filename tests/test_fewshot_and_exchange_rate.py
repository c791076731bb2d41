"""Few-shot episodes with confidence intervals, and the exchange-rate fit recovering known constants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lbgen.evaluation.exchange_rate import exchange_points, fit_exchange_rate, law
from lbgen.evaluation.fewshot import evaluate_episodes, extract_features, mean_ci, sample_episodes


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert mean_ci([5.0]) == (5.0, 0.0)
    rng = np.random.default_rng(0)  # coverage: ~95% of intervals from N(0, 1) samples hold 0
    covered = np.mean([abs(m) <= h for m, h in (mean_ci(rng.normal(size=20)) for _ in range(2000))])
    assert 0.93 < covered < 0.97


def blobs(n_classes=8, per_class=40, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return features / np.linalg.norm(features, axis=1, keepdims=True), labels, centres


def test_episodes_are_seeded_disjoint_and_checked():
    _, labels, _ = blobs()
    episodes = sample_episodes(labels, n_way=5, k_shot=2, n_query=15, episodes=20, seed=3)
    again = sample_episodes(labels, n_way=5, k_shot=2, n_query=15, episodes=20, seed=3)
    assert all((a.support == b.support).all() and (a.query == b.query).all()
               for a, b in zip(episodes, again, strict=True))
    for e in episodes:
        assert len(set(e.classes)) == 5 and len(e.support) == 10 and len(e.query) == 75
        assert not set(e.support) & set(e.query)
        assert set(labels[e.support]) == set(labels[e.query]) == set(e.classes)
    with pytest.raises(ValueError, match="Only 8 classes"):
        sample_episodes(labels, n_way=9, k_shot=1)


def test_episode_accuracy_reflects_separability_and_synthetic_support():
    features, labels, centres = blobs(spread=1.5)
    episodes = sample_episodes(labels, n_way=5, k_shot=1, n_query=15, episodes=60, seed=0)
    one_shot = evaluate_episodes(features, labels, episodes)
    shuffled = evaluate_episodes(features, np.random.default_rng(1).permutation(labels), episodes)
    assert one_shot["mean"] > 40 and abs(shuffled["mean"] - 20) < 10 and one_shot["ci95"] > 0
    # good synthetic images (near the class centres) help 1-shot; mislabelled ones hurt
    rng = np.random.default_rng(2)
    syn_labels = np.repeat(np.arange(8), 20)
    syn = centres[syn_labels] + 1.5 * rng.normal(size=(len(syn_labels), centres.shape[1]))
    syn /= np.linalg.norm(syn, axis=1, keepdims=True)
    helped = evaluate_episodes(features, labels, episodes, synthetic_features=syn, synthetic_labels=syn_labels,
                               synthetic_per_class=10)
    hurt = evaluate_episodes(features, labels, episodes, synthetic_features=syn,
                             synthetic_labels=(syn_labels + 1) % 8, synthetic_per_class=10)
    assert helped["mean"] > one_shot["mean"] + 3 > hurt["mean"] + 3
    assert evaluate_episodes(features, labels, episodes[:5], classifier="svm")["episodes"] == 5


def test_extract_features_are_l2_normalised():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    loader = DataLoader(TensorDataset(torch.rand(10, 3, 2, 2), torch.arange(10) % 2), batch_size=4)
    features, labels = extract_features(backbone, loader)
    assert features.shape == (10, 4) and np.allclose(np.linalg.norm(features, axis=1), 1) and labels.tolist()[:3] == [
        0, 1, 0]


def test_exchange_rate_fit_recovers_known_constants():
    c1, c2, k = 1.3, 2.5, 10

    def accuracy(real_per_class):  # any increasing curve: accuracy of a classifier with this many real images
        return 90 - 60 * np.exp(-real_per_class / 40)

    points = []
    for n_base in (5, 10, 20, 40):
        real_added = np.linspace(0, 16 * n_base, 400)  # a densely measured real curve
        equivalents = np.array([0.2, 0.5, 1, 2, 4, 8]) * n_base  # synthetic points worth these many real images
        n_syn = n_base * law(np.stack([np.full_like(equivalents, n_base), equivalents]), np.log(c1), np.log(c2), k)
        points += exchange_points(n_base, list(real_added), list(accuracy(n_base + real_added)), list(n_syn),
                                  list(accuracy(n_base + equivalents)))
    fit = fit_exchange_rate(points, k=k)
    # not exact: the real curve is interpolated linearly between its measured points
    assert fit.c1 == pytest.approx(c1, rel=0.02) and fit.c2 == pytest.approx(c2, rel=0.02)
    assert fit.c1_ci[0] <= fit.c1 <= fit.c1_ci[1] and fit.c2_ci[0] <= fit.c2 <= fit.c2_ci[1]
    noisy = [(b, r * np.exp(np.random.default_rng(i).normal(0, 0.05)), s) for i, (b, r, s) in enumerate(points)]
    fit = fit_exchange_rate(noisy, k=k)  # with noise: the truth lies in the interval
    assert fit.c1_ci[0] < c1 < fit.c1_ci[1] and fit.c2_ci[0] < c2 < fit.c2_ci[1]
    with pytest.raises(ValueError, match="at least 3"):
        fit_exchange_rate(points[:2], k=k)


def test_fewshot_episodes_system_writes_rows_for_every_shot_and_support(fmnist_fixture, tiny_generator, tmp_path):
    import json

    import lightning as L

    from lbgen.components import TimmBackbone
    from lbgen.datamodules import EpisodeDataModule, FashionMNISTDataModule, SyntheticDataModule
    from lbgen.models import FewShotSystem

    from .test_generation import generate

    generate(tiny_generator, fmnist_fixture, tmp_path / "syn", images_per_class=3)

    def run(out: str, synthetic: bool, per_class: list[int]) -> dict:
        real = FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, predict_split="test")
        syn = SyntheticDataModule(str(tmp_path / "syn"), image_size=16) if synthetic else None
        torch.manual_seed(0)
        model = FewShotSystem(TimmBackbone("test_resnet"), str(tmp_path / out), k_shots=[1, 2], n_query=2,
                                episodes=4, synthetic_per_class=per_class)
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(
            model, EpisodeDataModule(real, syn), return_predictions=False)
        return json.loads((tmp_path / out).read_text())

    result = run("a.json", True, [0, 3])
    rows = {(r["k_shot"], r["synthetic_per_class"]): r for r in result["results"]}
    assert set(rows) == {(1, 0), (1, 3), (2, 0), (2, 3)} and result["real_images"] == 60
    assert all(0 <= r["mean"] <= 100 and r["episodes"] == 4 for r in rows.values())
    assert "+ synthetic" in (tmp_path / "a.md").read_text()
    again = run("b.json", False, [0])  # same seed, no synthetic set: the real-only rows are the same episodes
    assert [r for r in again["results"]] == [rows[(1, 0)], rows[(2, 0)]]
    with pytest.raises(ValueError, match="needs a synthetic dataset"):
        run("c.json", False, [0, 3])


def test_exchange_rate_report_maps_each_seed_on_its_own_real_curve(tmp_path):
    from lbgen.evaluation.report import exchange_rate_section

    def run(root: str, acc: float) -> None:
        (tmp_path / root / "version_0").mkdir(parents=True)
        (tmp_path / root / "version_0" / "test_metrics.json").write_text(json.dumps({"acc": acc / 100}))

    # seed 1 is 10 points below seed 0 everywhere: on its own curve each synthetic point is worth the same
    for seed, offset in ((0, 0.0), (1, -10.0)):
        for added, acc in ((0, 60.0), (10, 65.0), (20, 70.0), (40, 75.0)):
            run(f"real_a{added}/s{seed}", acc + offset)
        for n_syn, acc in ((20, 67.5), (40, 70.0)):
            run(f"open_n{n_syn}/s{seed}", acc + offset)
    spec = {"classes": 10, "bases": [{"n_base": 10, "real": {a: f"real_a{a}/s*" for a in (0, 10, 20, 40)},
                                      "synthetic": {"open": {n: f"open_n{n}/s*" for n in (20, 40)}}}]}
    text = "\n".join(exchange_rate_section(spec, tmp_path, "report"))
    assert "| 10 | open | 20 | 62.50 | 15.0 | 15.00 ± 0.00 (2) |" in text
    assert "| 10 | open | 40 | 65.00 | 20.0 | 20.00 ± 0.00 (2) |" in text
    assert "| generator | n_base 10 |" in text and "| open | 0.50 ± 0.00 (2) |" in text  # 20 real for 40 synthetic
    assert "| open | - | - | 2 (" in text  # two points: too few for the law's fit, said so
