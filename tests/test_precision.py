"""Mixed precision for every stage, on CPU: under ``bf16-mixed`` (and ``16-mixed``, which Lightning turns into
``bf16-mixed`` on CPU) each stage runs with finite losses and outputs, every trainable weight stays fp32 and moves,
the frozen modules are in bf16, and results are close to fp32. Correctness only: this CPU has no bf16 units, so
nothing here says anything about speed. The fp16 path itself (``16-mixed`` on a GPU) is not exercised here.

Dtypes are recorded while a stage runs (``on_train_end`` of a generator may cast its pipeline back to fp32 to save
it); the frozen-module checks reuse each stage's run."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lbgen.attributes import AttributeBank, ClipAttributeExtractor
from lbgen.components import ClipScorer, PretrainedGenerator, TimmBackbone
from lbgen.datamodules import FashionMNISTDataModule, GenerationRequestsDataModule
from lbgen.datamodules.class_names import ClassNamesDataModule
from lbgen.datamodules.fashion_mnist import CLASS_NAMES
from lbgen.losses import QualityLoss
from lbgen.models import (
    AttributeExtractionSystem,
    AutoencoderSystem,
    ClassifierSystem,
    ClipSystem,
    GenerationSystem,
    LbGenSystem,
    QualitySystem,
    TextToImageSystem,
)

from .test_alignment_components import TINY_CLIP
from .test_clip_trainer import TINY_MODEL as TINY_CLIP_16PX

pytestmark = pytest.mark.slow

BF16, FP32 = "bf16-mixed", "32-true"
LOSS_RTOL = 0.02  # first-step loss, bf16-mixed vs fp32 from the same weights and batch (seen: < 0.1%)


class Spy(L.Callback):
    """Per training step: the logged ``train/*`` values and every parameter's dtype; per predicted batch: dtypes."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []
        self.dtypes: list[dict[str, torch.dtype]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self.dtypes.append({n: p.dtype for n, p in module.named_parameters()})

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.dtypes.append({n: p.dtype for n, p in module.named_parameters()})


def make_trainer(root: Path, precision: str = BF16, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=root)
    return L.Trainer(precision=precision, **{**defaults, **kwargs})


@dataclass
class Run:
    model: L.LightningModule
    spy: Spy
    before: dict[str, torch.Tensor]  # the trainable parameters before the run

    def first(self, key: str) -> float:
        return self.spy.losses[0][key]


def fit(model: L.LightningModule, data: L.LightningDataModule, root: Path, precision: str = BF16, **kwargs) -> Run:
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    spy = Spy()
    make_trainer(root, precision, callbacks=[spy], **kwargs).fit(model, data)
    return Run(model, spy, before)


def check_fit(run: Run, low: tuple[str, ...] = ()) -> None:
    """Losses finite at every step; trainable parameters fp32 during and after training, and moved; frozen
    parameters named ``low*`` in bf16 during training."""
    assert run.before and run.spy.losses and all(run.spy.losses)
    for step in run.spy.losses:
        assert all(np.isfinite(v) for v in step.values()), step
    for name, param in run.model.named_parameters():
        if name in run.before:
            assert param.requires_grad and param.dtype == torch.float32, name
            assert not torch.equal(param, run.before[name]), f"trainable {name} did not change"
    for dtypes in run.spy.dtypes:
        assert all(dtypes[n] == torch.float32 for n in run.before), "a trainable parameter left fp32 in training"
    if low:
        check_low(run.spy, low, exclude=set(run.before))


def check_first_loss_like_fp32(run: Run, make: Callable[[], L.LightningModule], data: L.LightningDataModule,
                               root: Path, key: str = "train/loss") -> None:
    """The bf16 run's first loss equals an fp32 run's (same seed, initial weights and batch) within LOSS_RTOL."""
    L.seed_everything(0)
    reference = fit(make(), data, root, FP32, max_steps=1)
    assert run.first(key) == pytest.approx(reference.first(key), rel=LOSS_RTOL)


def check_low(spy: Spy, prefixes: tuple[str, ...], exclude: set[str] = frozenset()) -> None:
    """Every parameter named ``prefixes*`` (but not in ``exclude``) was bf16 at every recorded batch."""
    assert spy.dtypes
    for dtypes in spy.dtypes:
        chosen = {n: d for n, d in dtypes.items() if n.startswith(prefixes) and n not in exclude}
        assert chosen, prefixes
        wrong = sorted(n for n, d in chosen.items() if d != torch.bfloat16)
        assert not wrong, f"{len(wrong)} frozen parameters not bf16, e.g. {wrong[:3]} ({chosen[wrong[0]]})"


def fashion(root: Path, **kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=str(root), **{"shots": 2, "batch_size": 8, "augmentation": "none", **kwargs})


def adam(params):
    return torch.optim.AdamW(params, lr=1e-3)


# --- classifier ----------------------------------------------------------------------------------------------------
def classifier(**kwargs) -> ClassifierSystem:
    torch.manual_seed(0)
    return ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, **{"optimizer": adam, **kwargs})


def test_classifier_fit(fmnist_fixture, tmp_path):
    L.seed_everything(0)
    run = fit(classifier(), fashion(fmnist_fixture), tmp_path)
    check_fit(run)
    check_first_loss_like_fp32(run, classifier, fashion(fmnist_fixture), tmp_path / "fp32")


@pytest.fixture(scope="module")
def linear_probe(fmnist_fixture, tmp_path_factory) -> tuple[Run, Run]:
    """A linear probe fitted under bf16-mixed, and its first step in fp32."""
    runs = []
    for precision, steps in ((BF16, 2), (FP32, 1)):
        L.seed_everything(0)
        runs.append(fit(classifier(finetune="linear"), fashion(fmnist_fixture), tmp_path_factory.mktemp(precision),
                        precision, max_steps=steps))
    return runs[0], runs[1]


def test_linear_probe_fit(linear_probe):
    run, reference = linear_probe
    check_fit(run)
    assert set(run.before) == {"head.weight", "head.bias"}
    assert run.first("train/loss") == pytest.approx(reference.first("train/loss"), rel=LOSS_RTOL)


def test_linear_probe_frozen_backbone_is_bf16(linear_probe):
    check_low(linear_probe[0].spy, ("backbone.",))


def test_classifier_test_and_predict(fmnist_fixture, tmp_path):
    """``lbgen test`` / predict of a (briefly trained, so not uniform) classifier: bf16-mixed matches fp32."""
    L.seed_everything(0)
    model = classifier(optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    make_trainer(tmp_path / "train", FP32, max_steps=20).fit(model, fashion(fmnist_fixture, shots=None, batch_size=32))
    results, probs = {}, {}
    for precision in (BF16, FP32):
        trainer = make_trainer(tmp_path / precision, precision)
        results[precision] = trainer.test(model, fashion(fmnist_fixture), verbose=False)[0]
        probs[precision] = torch.cat([o["probs"] for o in trainer.predict(model, fashion(fmnist_fixture))])
        report = json.loads((tmp_path / precision / "test_metrics.json").read_text())
        assert report["num_test_images"] == 60 and np.isfinite(report["acc"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # evaluation leaves the weights alone
    low, high = probs[BF16], probs[FP32]
    assert torch.isfinite(low).all()  # softmax outputs: in [0, 1] by construction, so only NaN / inf can be wrong
    assert high.max(1).values.mean() > 0.3  # trained: the comparison below is not between uniform vectors
    torch.testing.assert_close(low.float(), high, atol=0.03, rtol=0)
    assert (low.argmax(1) == high.argmax(1)).float().mean() >= 0.9
    assert results[BF16]["test/acc"] == pytest.approx(results[FP32]["test/acc"], abs=0.05)


# --- VAE -----------------------------------------------------------------------------------------------------------
def vae_system(root: Path) -> AutoencoderSystem:
    torch.manual_seed(0)
    return AutoencoderSystem(image_size=16, block_out_channels=(16, 32), optimizer=adam, output_dir=str(root / "vae"))


def test_vae_fit(fmnist_fixture, tmp_path):
    L.seed_everything(0)
    run = fit(vae_system(tmp_path), fashion(fmnist_fixture, image_size=16), tmp_path)
    check_fit(run)
    scaling = run.model.scaling_factor
    assert np.isfinite(scaling) and scaling != pytest.approx(1.0)  # estimated: moved off the 1.0 it starts from
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(scaling)
    check_first_loss_like_fp32(run, lambda: vae_system(tmp_path / "fp32"), fashion(fmnist_fixture, image_size=16),
                               tmp_path / "fp32")


# --- text-to-image generator ---------------------------------------------------------------------------------------
def t2i(tiny_generator: Path, mode: str, root: Path) -> TextToImageSystem:
    torch.manual_seed(0)
    return TextToImageSystem(PretrainedGenerator(str(tiny_generator)), mode=mode, lora_rank=4, lora_init=False,
                              caption_dropout=0.0, optimizer=adam, output_dir=str(root / "out"))


@pytest.mark.parametrize(("mode", "low"), [("lora", ("vae.", "text_encoder.", "unet.")), ("scratch", ("vae.",))])
def test_text_to_image_fit(mode, low, tiny_generator, fmnist_fixture, tmp_path):
    L.seed_everything(0)
    run = fit(t2i(tiny_generator, mode, tmp_path), fashion(fmnist_fixture, image_size=16), tmp_path)
    check_fit(run, low)
    assert (tmp_path / "out").is_dir()
    check_first_loss_like_fp32(run, lambda: t2i(tiny_generator, mode, tmp_path / "fp32"),
                               fashion(fmnist_fixture, image_size=16), tmp_path / "fp32", "train/denoising")


# --- CLIP and quality judges ---------------------------------------------------------------------------------------
def clip_system() -> ClipSystem:
    torch.manual_seed(0)
    return ClipSystem(model_config=TINY_CLIP_16PX, class_names=CLASS_NAMES, num_classes=10, optimizer=adam)


def test_clip_fit(fmnist_fixture, tmp_path):
    data = fashion(fmnist_fixture, image_size=16, shots=4, batch_size=20)
    L.seed_everything(0)
    run = fit(clip_system(), data, tmp_path)
    check_fit(run)
    check_first_loss_like_fp32(run, clip_system, data, tmp_path / "fp32")


def quality_system() -> QualitySystem:
    torch.manual_seed(0)
    quality = QualityLoss("cnniqa", metric_kwargs={"pretrained": None, "n_kers": 16, "n1_nodes": 64, "n2_nodes": 64})
    return QualitySystem(quality, optimizer=adam)


def test_quality_fit(fmnist_fixture, tmp_path):
    data = fashion(fmnist_fixture, image_size=16)
    L.seed_everything(0)
    run = fit(quality_system(), data, tmp_path)
    check_fit(run)
    check_first_loss_like_fp32(run, quality_system, data, tmp_path / "fp32", "train/ranking")


# --- lbGen ---------------------------------------------------------------------------------------------------------
LBGEN_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


def lbgen_system(tiny_generator: Path) -> LbGenSystem:
    torch.manual_seed(0)
    clip = ClipScorer(model_config=TINY_CLIP, pretrained=None)
    return LbGenSystem(PretrainedGenerator(str(tiny_generator)), clip=clip,
                        quality=QualityLoss("cnniqa", metric_kwargs={"pretrained": None}), lora_rank=4,
                        lora_init=False, num_inference_steps=3, grad_steps=1, discriminator_hidden=16,
                        class_names=LBGEN_CLASSES, optimizer=adam, discriminator_optimizer=adam)


@pytest.fixture(scope="module")
def lbgen_run(tiny_generator, tmp_path_factory) -> Run:
    data = ClassNamesDataModule(class_names=LBGEN_CLASSES, batch_size=2, samples_per_epoch=4, val_per_class=0)
    return fit(lbgen_system(tiny_generator), data, tmp_path_factory.mktemp("lbgen"), max_steps=-1, max_epochs=1)


def test_lbgen_fit(lbgen_run, tiny_generator):
    run = lbgen_run
    check_fit(run, low=("vae.", "text_encoder.", "unet.", "clip.model."))
    assert len(run.spy.losses) == 2
    assert {"train/loss", "train/discriminator", "train/en", "train/in", "train/q"} <= set(run.spy.losses[0])
    assert {n.split(".")[0] for n in run.before} == {"unet", "dataset_alignment"}
    # its images under autocast: in range, and close to fp32 generation with the same LoRA and seeds
    system, reference = run.model, lbgen_system(tiny_generator)
    with torch.no_grad():
        lora = {n: p for n, p in system.unet.state_dict().items() if "lora_" in n}
        assert lora and not reference.unet.load_state_dict(lora, strict=False).unexpected_keys
        expected = reference.generate(torch.tensor([0, 3]), seed=7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            images = system.generate(torch.tensor([0, 3]), seed=7)
    # (in [0, 1] by generate's clamp; NaN would survive it)
    assert images.dtype == torch.float32 and torch.isfinite(images).all() and images.std() > 0.01
    assert (images - expected).abs().mean() < 0.02


def test_lbgen_frozen_quality_judge_is_bf16(lbgen_run):
    check_low(lbgen_run.spy, ("quality.",))


# --- generation ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["txt2img", "img2img"])
def generated(request, tiny_generator, fmnist_fixture, tmp_path_factory) -> dict:
    """The same requests generated under bf16-mixed and fp32 (``lbgen predict``)."""
    out = {"method": request.param}
    for precision in (BF16, FP32):
        root = tmp_path_factory.mktemp(precision)
        data = GenerationRequestsDataModule(source_data=fashion(fmnist_fixture, image_size=16), batch_size=4,
                                            images_per_class=1, classes=[0, 1, 2, 3], method=request.param,
                                            strength=0.7 if request.param == "img2img" else None)
        model = GenerationSystem(PretrainedGenerator(str(tiny_generator)), output_dir=str(root / "data"),
                                   num_inference_steps=3, shard_size=4)
        spy = Spy()
        batches = make_trainer(root, precision, callbacks=[spy]).predict(model, data)
        out[precision] = torch.cat([b["images"] for b in batches]).float() / 255
        out[precision + " spy"] = spy
    return out


def test_generation_predict(generated):
    low, high = generated[BF16], generated[FP32]
    assert low.shape == (4, 3, 16, 16) and low.std() > 0.01  # not black (NaN through uint8) nor constant
    assert (low - high).abs().mean() < 0.02 and (low - high).abs().max() < 0.2
    assert all(d == torch.float32 for d in generated[FP32 + " spy"].dtypes[0].values())


def test_generation_frozen_pipeline_is_bf16(generated):
    check_low(generated[BF16 + " spy"], ("unet.", "vae.", "text_encoder."))


# --- attribute extraction ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def banks(fmnist_fixture, tmp_path_factory) -> dict:
    """The attribute bank of 30 training images extracted by a tiny CLIP under bf16-mixed and fp32."""
    out = {}
    for precision in (BF16, FP32):
        root = tmp_path_factory.mktemp(precision)
        torch.manual_seed(0)
        extractor = ClipAttributeExtractor(ClipScorer(model_config=TINY_CLIP, pretrained=None),
                                           ["brick wall", "green grass", "moon surface", "gravel"],
                                           ["upright", "tilted left"], descriptor="garment")
        system = AttributeExtractionSystem(extractor, output=str(root / "attributes.json"))
        spy = Spy()
        make_trainer(root, precision, callbacks=[spy]).predict(
            system, fashion(fmnist_fixture, predict_split="train", shots=3), return_predictions=False)
        out[precision], out[precision + " spy"] = AttributeBank.load(root / "attributes.json"), spy
    return out


def test_attribute_extraction_predict(banks):
    low, high = banks[BF16], banks[FP32]
    assert len(low) == len(high) == 30
    same = [(a["id"], a["background"], a["pose"]) == (b["id"], b["background"], b["pose"])
            for a, b in zip(low.records, high.records, strict=True)]
    assert np.mean(same) >= 0.8


def test_attribute_extraction_frozen_clip_is_bf16(banks):
    check_low(banks[BF16 + " spy"], ("extractor.clip.",))


# --- 16-mixed ------------------------------------------------------------------------------------------------------
def test_16_mixed_on_cpu_falls_back_to_bf16_and_trains(tiny_generator, fmnist_fixture, tmp_path):
    """Lightning refuses fp16 AMP on CPU: it warns and runs bf16-mixed, and the system follows the precision that
    actually runs (``trainer.precision``): frozen parts bf16, trainable fp32, finite loss."""
    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        assert make_trainer(tmp_path, "16-mixed").precision == BF16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run = fit(t2i(tiny_generator, "lora", tmp_path), fashion(fmnist_fixture, image_size=16), tmp_path, "16-mixed")
    check_fit(run, low=("vae.", "text_encoder.", "unet."))


def test_generation_resume_at_another_precision_is_refused(tiny_generator, fmnist_fixture, tmp_path):
    from .test_generation import _source

    def run(precision: str) -> None:
        data = GenerationRequestsDataModule(source_data=_source(fmnist_fixture), batch_size=4, images_per_class=1)
        model = GenerationSystem(PretrainedGenerator(str(tiny_generator)), output_dir=str(tmp_path / "out"),
                                   num_inference_steps=2, shard_size=8)
        L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                  enable_progress_bar=False).predict(model, data, return_predictions=False)

    run("bf16-mixed")
    with pytest.raises(ValueError, match="other settings"):
        run("32-true")
