"""The transfer study's parts: packaged downstream sets, L_en's alignment options, the paired transfer table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lbgen.datamodules import PackagedImageDataModule
from lbgen.datamodules.packaged import CLASS_NAMES, load_packaged
from lbgen.evaluation.transfer import episode_accuracies, finetune_accuracies, transfer_markdown, transfer_table
from lbgen.losses import DatasetAlignmentLoss


@pytest.mark.parametrize("name", sorted(CLASS_NAMES))
def test_packaged_sets_load_offline_with_a_fixed_disjoint_test_set(name):
    pool, pool_labels = load_packaged(name, "pool", 16)
    test, test_labels = load_packaged(name, "test", 16)
    assert pool.dtype == torch.uint8 and pool.shape[1:] == (1, 16, 16) and test.shape[1:] == (1, 16, 16)
    classes = len(CLASS_NAMES[name])
    assert set(np.unique(pool_labels)) == set(np.unique(test_labels)) == set(range(classes))
    assert 0.15 < len(test) / (len(test) + len(pool)) < 0.35
    assert pool.float().std() > 10  # real images, not blanks
    # no test image is also a pool image (the textures: patches of disjoint rows; the others: a partition)
    pool_keys = {bytes(x.numpy().tobytes()) for x in pool}
    assert sum(bytes(x.numpy().tobytes()) in pool_keys for x in test) <= 0.01 * len(test)


def test_packaged_datamodule_splits_by_seed_and_keeps_the_test_set():
    a = PackagedImageDataModule("faces", image_size=16, shots=5, split_seed=0)
    b = PackagedImageDataModule("faces", image_size=16, shots=5, split_seed=1)
    a.setup("fit"), b.setup("fit")
    a.setup("test"), b.setup("test")
    assert a.train_class_counts == [5, 5] and a.class_names == ["non-face", "face"]
    assert not np.array_equal(a.split.train, b.split.train)
    assert torch.equal(a.test_dataset[0]["image"], b.test_dataset[0]["image"])
    assert a.train_dataset[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="Unknown packaged dataset"):
        PackagedImageDataModule("cifar")


def _gap_features(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts and images of the same classes, whose clouds are offset: a modality gap, nothing else."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(4, dim, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    texts = classes[labels] + 0.1 * torch.randn(n, dim, generator=g)
    images = classes[labels] + 0.1 * torch.randn(n, dim, generator=g) + 3.0  # the gap
    return texts, images


def _trained(loss: DatasetAlignmentLoss, texts: torch.Tensor, images: torch.Tensor) -> DatasetAlignmentLoss:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-2)
    loss.train()
    for _ in range(150):
        optimizer.zero_grad()
        loss.discriminator_loss(texts, images).backward()
        optimizer.step()
    return loss.eval()


def test_centering_takes_the_modality_gap_away_from_the_discriminator():
    texts, images = _gap_features(256)
    held_texts, held_images = _gap_features(256, seed=1)
    raw = _trained(DatasetAlignmentLoss(8, 32), texts, images)
    assert raw.discriminator_accuracy(held_texts, held_images) > 0.95  # wins by the gap alone
    centred = DatasetAlignmentLoss(8, 32, center=True)
    centred.set_text_mean(texts)
    centred = _trained(centred, texts, images)
    assert centred.discriminator_accuracy(held_texts, held_images) < 0.75
    assert bool(centred.image_mean_ready) and centred.image_mean.norm() > 1  # the running image centre moved


def test_alignment_options_keep_the_generator_gradient():
    texts, images = _gap_features(32)
    images.requires_grad_(True)
    loss = DatasetAlignmentLoss(8, 16, normalize=True, center=True, spectral_norm=True)
    loss.set_text_mean(texts)
    loss.discriminator_loss(texts, images)  # sets the image centre
    loss(images).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert any("parametrizations" in name for name, _ in loss.named_parameters())
    with pytest.raises(ValueError, match="momentum"):
        DatasetAlignmentLoss(8, momentum=0)


def _fewshot_file(path, accuracies_by_k):
    rows = [{"k_shot": k, "synthetic_per_class": 0, "mean": float(np.mean(a)), "ci95": 0.0, "episodes": len(a),
             "accuracies": list(a)} for k, a in accuracies_by_k.items()]
    path.write_text(json.dumps({"results": rows}))
    return path


def test_transfer_table_pairs_by_seed_and_averages_over_sets(tmp_path):
    files = {}
    for source, shift in (("lbgen", 2.0), ("txt2img", 0.0)):
        files[source] = {}
        for d, base in (("mnist", 60.0), ("faces", 80.0)):
            files[source][d] = [_fewshot_file(tmp_path / f"{source}_{d}_{s}.json",
                                              {1: [base + shift + s + e for e in (0.0, 1.0, 2.0)],
                                               5: [base + 10 + shift / 2 + s for _ in range(3)]})
                                for s in range(3)]
    table = transfer_table(files, compare=[("lbgen", "txt2img")])
    diff = {(r["set"], r["k_shot"]): r for r in table["differences"]}
    # the seed effect (+s) is shared by both sources: the paired difference is exact, its interval zero
    assert diff[("average", 1)]["mean"] == pytest.approx(2.0) and diff[("average", 1)]["ci95"] == pytest.approx(0)
    assert diff[("average", 5)]["mean"] == pytest.approx(1.0) and diff[("average", 1)]["over"] == "seeds"
    average = {(r["source"], r["k_shot"]): r["mean"] for r in table["average"]}
    assert average[("txt2img", 1)] == pytest.approx((61 + 81) / 2 + 1)
    text = transfer_markdown(table)
    assert "lbgen - txt2img" in text and "average 5-shot" in text
    assert episode_accuracies(files["lbgen"]["mnist"][0])[1].tolist() == [62.0, 63.0, 64.0]
    with pytest.raises(ValueError, match="same sets"):
        transfer_table({"a": {"mnist": files["lbgen"]["mnist"]}, "b": {"faces": files["txt2img"]["faces"]}})


@pytest.mark.slow
def test_aligned_lbgen_variant_trains_and_reports_its_discriminator_and_diversity(recipe_paths, tmp_path):
    from .conftest import REPO, run_recipe

    cli = run_recipe(REPO / "configs/lbgen/variants/aligned.yaml", {**recipe_paths, "out": tmp_path},
                     "--trainer.fast_dev_run=true", "--data.init_args.val_per_class=2",
                     "--data.init_args.batch_size=20")  # one validation batch: two images of every class
    system = cli.model
    alignment = system.dataset_alignment
    assert alignment.normalize and alignment.center and system.en_text_samples == "all"
    assert any("parametrizations" in name for name, _ in alignment.named_parameters())
    # the text centre is the mean of every class text; the image centre was set by the discriminator step
    assert alignment.text_mean.norm() > 0 and bool(alignment.image_mean_ready)
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/discriminator_acc"]) <= 1.0
    assert float(metrics["val/diversity"]) > 0


def test_report_transfer_section_tables_the_sets_and_plots_the_gain(tmp_path):
    from lbgen.evaluation.report import write_report

    spec = {"files": "probe/{source}_s{seed}_{set}.json", "sources": ["lbgen", "txt2img"], "seeds": [0, 1],
            "sets": ["mnist", "faces"], "validation_set": "digits", "compare": [["lbgen", "txt2img"]]}
    (tmp_path / "probe").mkdir()
    report = write_report({"transfer": spec}, tmp_path)
    assert "Not complete: 12 results missing" in report.read_text()
    for source, gain in (("lbgen", 1.0), ("txt2img", 0.0)):
        for seed in (0, 1):
            for d in ("mnist", "faces", "digits"):
                _fewshot_file(tmp_path / "probe" / f"{source}_s{seed}_{d}.json",
                              {1: [50 + gain + seed, 52 + gain + seed], 5: [70 + seed, 71 + seed]})
    text = write_report({"transfer": spec}, tmp_path).read_text()
    assert "Validation downstream set** (digits" in text and "| lbgen - txt2img | +1.00 ± 0.00" in text
    assert (tmp_path / "report_transfer.png").is_file()


def _metrics_file(path, acc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"acc": acc / 100}))


def test_finetune_runs_table_by_shots_with_full_data_last(tmp_path):
    files = {}
    for source, gain in (("lbgen", 3.0), ("txt2img", 0.0)):
        files[source] = {}
        for seed in range(3):
            for k, base in (("full", 90.0), (10, 70.0), (1, 40.0)):
                _metrics_file(tmp_path / source / f"mnist_k{k}" / f"s{seed}" / "test_metrics.json",
                              base + seed + (gain if k == 1 else 0.0))
        files[source]["mnist"] = [finetune_accuracies({k: tmp_path / source / f"mnist_k{k}" / f"s{seed}" /
                                                       "test_metrics.json" for k in (1, 10, "full")})
                                  for seed in range(3)]
    table = transfer_table(files, compare=[("lbgen", "txt2img")])
    assert [r["k_shot"] for r in table["rows"] if r["source"] == "lbgen"] == [1, 10, "full"]
    diff = {(r["set"], r["k_shot"]): r["mean"] for r in table["differences"]}
    assert diff[("average", 1)] == pytest.approx(3.0) and diff[("average", "full")] == pytest.approx(0.0)
    text = transfer_markdown(table)
    assert "| pre-trained on | mnist 1-shot | mnist 10-shot | mnist full |" in text
    average = {(r["source"], r["k_shot"]): r["mean"] for r in table["average"]}
    assert average[("txt2img", 10)] == pytest.approx(71.0) and average[("txt2img", "full")] == pytest.approx(91.0)
    with pytest.raises(FileNotFoundError, match="fine-tune stage"):
        finetune_accuracies({5: tmp_path / "lbgen" / "mnist_k5" / "s0" / "test_metrics.json"})
    with pytest.raises(ValueError, match="'full'"):
        finetune_accuracies({"all": tmp_path / "lbgen" / "mnist_kfull" / "s0" / "test_metrics.json"})
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="no test accuracy"):
        finetune_accuracies({1: tmp_path / "other.json"})


def test_report_transfer_section_has_a_finetune_table_and_plot(tmp_path):
    from lbgen.evaluation.report import write_report

    finetune = {"files": "ft/{source}/{set}_k{k}/s{seed}/test_metrics.json", "shots": [1, "full"]}
    spec = {"files": "probe/{source}_s{seed}_{set}.json", "sources": ["lbgen", "txt2img"], "seeds": [0, 1],
            "sets": ["mnist"], "validation_set": "digits", "compare": [["lbgen", "txt2img"]], "finetune": finetune}
    (tmp_path / "probe").mkdir()
    for source in ("lbgen", "txt2img"):
        for seed in (0, 1):
            for d in ("mnist", "digits"):
                _fewshot_file(tmp_path / "probe" / f"{source}_s{seed}_{d}.json", {1: [50 + seed], "full": [80 + seed]})
    text = write_report({"transfer": spec}, tmp_path).read_text()
    assert "### Full fine-tune" in text and "Not complete: 16 results missing" in text  # 2 sources, seeds, sets, k
    assert "| lbgen - txt2img | +0.00 ± 0.00 | +0.00 ± 0.00 |" in text  # the probe's 1-shot and full columns
    for source, gain in (("lbgen", 2.0), ("txt2img", 0.0)):
        for seed in (0, 1):
            for d in ("mnist", "digits"):
                for k, base in ((1, 60.0), ("full", 90.0)):
                    _metrics_file(tmp_path / "ft" / source / f"{d}_k{k}" / f"s{seed}" / "test_metrics.json",
                                  base + seed + (gain if k == 1 else 0.0))
    text = write_report({"transfer": spec}, tmp_path).read_text()
    finetune_part = text[text.index("### Full fine-tune"):]
    assert "Validation downstream set** (digits" in finetune_part
    assert "| lbgen - txt2img | +2.00 ± 0.00 | +0.00 ± 0.00 |" in finetune_part
    assert "| txt2img | 60.50 ± 6.35 | 90.50 ± 6.35 |" in finetune_part  # 1-shot, then full
    assert "One test accuracy per run" in finetune_part
    # probe files written before full_data: the column is left out, and the report says so
    for source in ("lbgen", "txt2img"):
        _fewshot_file(tmp_path / "probe" / f"{source}_s0_mnist.json", {1: [50.0]})
    text = write_report({"transfer": spec}, tmp_path).read_text()
    assert "Left out: full (missing from 2 result files" in text
    with pytest.raises(ValueError, match="no \\{k\\}"):
        write_report({"transfer": {**spec, "finetune": {"files": "ft/x.json", "shots": [1]}}}, tmp_path)
    with pytest.raises(ValueError, match="keys files, shots"):
        write_report({"transfer": {**spec, "finetune": {"files": "ft/{k}.json"}}}, tmp_path)
    assert (tmp_path / "report_transfer.png").is_file() and (tmp_path / "report_finetune.png").is_file()


def test_linear_probe_on_the_whole_training_pool(tmp_path):
    import lightning as L

    from lbgen.components import TimmBackbone
    from lbgen.datamodules import EpisodeDataModule
    from lbgen.models import FewShotSystem

    def probe(train_pool: bool, full_data: bool):
        data = EpisodeDataModule(PackagedImageDataModule("faces", image_size=16, eval_batch_size=64),
                                 train_pool=train_pool)
        torch.manual_seed(0)  # the same random backbone every time
        system = FewShotSystem(TimmBackbone("test_resnet"), str(tmp_path / "probe.json"), n_way=None, k_shots=[1],
                               n_query=5, episodes=3, full_data=full_data)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.predict(system, datamodule=data, return_predictions=False)
        return json.loads((tmp_path / "probe.json").read_text())

    record = probe(train_pool=True, full_data=True)
    full = record["results"][-1]
    assert full["k_shot"] == "full" and full["train_images"] == 140 and len(full["accuracies"]) == 1
    assert 0 <= full["mean"] <= 100 and full["ci95"] > 0
    accuracies = episode_accuracies(tmp_path / "probe.json")
    assert list(accuracies) == [1, "full"] and len(accuracies[1]) == 3
    note = (tmp_path / "probe.md").read_text()
    assert "full: the classifier fitted on all 140 training images of every class" in note
    # the episodes are the same without the pool loader
    assert probe(train_pool=False, full_data=False)["results"] == record["results"][:1]
    assert full["n_way"] == 2
    with pytest.raises(ValueError, match="train_pool"):
        probe(train_pool=False, full_data=True)
    with pytest.raises(ValueError, match="predict_split"):
        EpisodeDataModule(PackagedImageDataModule("faces", image_size=16, predict_split="train"), train_pool=True)
    with pytest.raises(ValueError, match="'shots': 5"):
        EpisodeDataModule(PackagedImageDataModule("faces", image_size=16, shots=5), train_pool=True)
