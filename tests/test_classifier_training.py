"""timm-grade classifier training: crops read at the stored resolution, pad vs crop, presets, parameter groups
(no decay on norms and biases, layer decay), weight EMA (validation, final weights, resume), gradient
checkpointing and compile."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from PIL import Image
from torchvision.transforms import v2

from lbgen.components import TimmBackbone
from lbgen.datamodules import FASHION_MNIST_CLASSES, FashionMNISTDataModule, ImageFolderDataModule, SyntheticDataModule
from lbgen.datamodules.transforms import PAD_FILL, augmentation_preset, eval_transform
from lbgen.models import ClassifierSystem
from lbgen.storage.dataset_format import write_images_as_dataset


def _folder(root: Path, size: tuple[int, int] = (64, 48), classes: tuple[str, ...] = ("cat", "dog"), n: int = 3
            ) -> Path:
    """An ImageFolder of ``width x height`` photos."""
    rng = np.random.default_rng(0)
    width, height = size
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


class Recorder:
    """Wraps a dataset's transform and records the shape of each image it is given."""

    def __init__(self, transform) -> None:
        self.transform, self.shapes = transform, []

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(image.shape))
        return self.transform(image)


# --- resolution and geometry ------------------------------------------------------------------------------------


def test_the_random_crop_reads_the_stored_image_and_makes_image_size(tmp_path):
    root = _folder(tmp_path / "train")
    data = ImageFolderDataModule(str(root), image_size=16, val_per_class=1, train_resolution="source",
                                 check_images=False)
    data.setup("fit")
    for dataset in (data.train_dataset, data.val_dataset):
        dataset.transform = Recorder(dataset.transform)
        assert dataset[0]["image"].shape == (3, 16, 16) and dataset[0]["image"].dtype == torch.float32
        assert set(dataset.transform.shapes) == {(3, 48, 64)}  # the photo as stored, not shrunk first
    first = data.train_dataset.transform.transform.transforms[0]
    assert isinstance(first, v2.RandomResizedCrop) and first.scale == (0.08, 1.0)  # timm's default
    # the old geometry: shrunk to image_size first, then the crop (scale 0.5-1) works on the 16-px square
    old = ImageFolderDataModule(str(root), image_size=16, crop_scale=[0.3, 0.9], check_images=False)
    ops = old.train_transform(stored=True).transforms
    assert isinstance(ops[0], v2.Resize) and isinstance(ops[1], v2.CenterCrop)
    assert isinstance(ops[2], v2.RandomResizedCrop) and ops[2].scale == (0.3, 0.9)
    assert ImageFolderDataModule(str(root), image_size=16, check_images=False).train_transform(
        stored=True).transforms[2].scale == (0.5, 1.0)


def test_in_memory_sets_stay_at_image_size_and_refuse_source(fmnist_fixture):
    data = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, image_size=32)
    data.setup("fit")
    data.train_dataset.transform = Recorder(data.train_dataset.transform)
    assert data.train_dataset[0]["image"].shape == (3, 32, 32)
    assert data.train_dataset.transform.shapes == [(3, 32, 32)]
    crop = data.train_dataset.transform.transform.transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.5, 1.0)  # the embedded recipes' crop
    with pytest.raises(ValueError, match="holds its images decoded in memory"):
        FashionMNISTDataModule(root=str(fmnist_fixture), train_resolution="source")


def _framed(width: int, height: int, bar: int) -> torch.Tensor:
    """Black with white vertical bars ``bar`` pixels wide at the left and right edges."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[..., :bar] = image[..., -bar:] = 255
    return image


def test_pad_keeps_the_whole_image_and_crop_cuts_its_sides():
    image = _framed(64, 32, 8)  # 2:1, the edges carry the content
    padded = eval_transform(16, "pad")(image)
    assert padded.shape == (3, 16, 16)
    assert padded[:, 8, 0].min() > 0.8 and padded[:, 8, -1].min() > 0.8  # both edges kept
    bar = torch.tensor(PAD_FILL, dtype=torch.float32) / 255
    torch.testing.assert_close(padded[:, 0, 8], bar, atol=2 / 255, rtol=0)  # letterbox bars in the mean colour
    cropped = eval_transform(16, "crop")(image)
    assert cropped[:, 8, 0].max() < 0.1 and cropped[:, 8, -1].max() < 0.1  # the centre square lost both edges
    # training in pad mode letterboxes before the random crop: a crop of scale 1 holds the whole image
    train = augmentation_preset("weak", 16, train_resolution="source", fit="pad", crop_scale=(1.0, 1.0))
    torch.manual_seed(0)
    out = train(image)
    assert out[:, 8, 0].min() > 0.8 and out[:, 8, -1].min() > 0.8


def test_evaluation_uses_timms_crop_pct_with_source_resolution(tmp_path):
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    expected = v2.CenterCrop(16)(v2.Resize(18, antialias=True)(image))  # floor(16 / 0.875) = 18
    torch.testing.assert_close(eval_transform(16, "crop", 0.875)(image), expected.float() / 255)
    root = _folder(tmp_path / "train")
    source = ImageFolderDataModule(str(root), image_size=16, train_resolution="source", check_images=False)
    torch.testing.assert_close(source.evaluation_transform(stored=True)(image), expected.float() / 255)
    whole = ImageFolderDataModule(str(root), image_size=16, check_images=False)  # image_size: the whole square
    torch.testing.assert_close(whole.evaluation_transform(stored=True)(image),
                               v2.CenterCrop(16)(v2.Resize(16, antialias=True)(image)).float() / 255)
    with pytest.raises(ValueError, match="crop_pct"):
        ImageFolderDataModule(str(root), crop_pct=1.5, check_images=False)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageFolderDataModule(str(root), crop_scale=[0.5, 0.1], check_images=False)
    with pytest.raises(ValueError, match="fit must be"):
        ImageFolderDataModule(str(root), fit="stretch", check_images=False)


def _png(value: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_streamed_shards_reach_the_crop_as_stored_and_memory_mode_refuses_it(tmp_path):
    folder = tmp_path / "set"
    write_images_as_dataset(folder, FASHION_MNIST_CLASSES[:2], [(c, _png(40 * c + i, 24)) for c in range(2)
                                                                for i in range(3)], shard_size=4)
    data = SyntheticDataModule(str(folder), image_size=8, train_resolution="source", batch_size=2)
    assert data.mode == "stream"  # auto: the memory mode keeps no stored image
    data.setup("fit")
    stream = data.train_dataset
    stream.transform = Recorder(stream.transform)
    samples = list(stream)
    assert len(samples) == 6 and all(s["image"].shape == (3, 8, 8) for s in samples)
    assert set(stream.transform.shapes) == {(3, 24, 24)}
    with pytest.raises(ValueError, match="mode 'memory'"):
        SyntheticDataModule(str(folder), image_size=8, train_resolution="source", mode="memory")
    memory = SyntheticDataModule(str(folder), image_size=8, mode="memory")  # the default: decoded at image_size
    assert memory.pool[0].images.shape == (6, 3, 8, 8)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment"])
def test_policy_presets_and_random_erasing(name):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8)
    transform = augmentation_preset(name, 32, train_resolution="source", fit="crop", random_erasing=1.0)
    kinds = [type(op).__name__ for op in transform.transforms]
    assert kinds[-1] == "RandomErasing" and ("RandAugment" if name == "randaugment" else "TrivialAugmentWide") in kinds
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="random_erasing"):
        augmentation_preset(name, 32, random_erasing=2.0)


# --- optimizer parameter groups ---------------------------------------------------------------------------------


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "max_steps": 1}
    return L.Trainer(default_root_dir=tmp_path, **{**defaults, **kwargs})


def _data(root: Path, **kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=str(root), **{"shots": 2, "batch_size": 4, "image_size": 32,
                                                     "augmentation": "none", **kwargs})


def test_no_weight_decay_on_norms_and_biases(fmnist_fixture, tmp_path):
    torch.manual_seed(0)
    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10,
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))
    trainer = _trainer(tmp_path)
    trainer.fit(model, _data(fmnist_fixture))
    decay = {id(p): g["weight_decay"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == {id(p) for p in names.values()}  # every trainable parameter, once
    for name, param in names.items():
        expected = 0.0 if param.ndim <= 1 else 0.05  # BatchNorm weights / biases, every bias, the head's bias
        assert decay[id(param)] == expected, name
    assert decay[id(model.head.bias)] == 0.0 and decay[id(model.head.weight)] == 0.05
    plain = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, weight_decay_exclude_norm_bias=False,
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))
    trainer = _trainer(tmp_path)
    trainer.fit(plain, _data(fmnist_fixture))
    assert {g["weight_decay"] for g in trainer.optimizers[0].param_groups} == {0.05}


def test_vit_position_embedding_is_not_decayed_and_layer_decay_scales_each_block(fmnist_fixture, tmp_path):
    torch.manual_seed(0)
    backbone = TimmBackbone("test_vit", model_kwargs={"img_size": 32})
    model = ClassifierSystem(backbone, num_classes=10, layer_decay=0.5,
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.05),
                             scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-2,
                                                         total_steps=None))
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(model, _data(fmnist_fixture))
    groups = trainer.optimizers[0].param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    vit = backbone.model
    assert by_param[id(vit.pos_embed)]["weight_decay"] == 0.0 and by_param[id(vit.cls_token)]["weight_decay"] == 0.0
    blocks = len(vit.blocks)
    scale = [by_param[id(vit.blocks[i].attn.qkv.weight)]["lr_scale"] for i in range(blocks)]
    # timm's layers: the stem (patch embedding, tokens), then one per block; each block learns at half the next's
    assert scale == pytest.approx([scale[-1] * 0.5 ** (blocks - 1 - i) for i in range(blocks)]) and scale[-1] <= 1
    assert by_param[id(vit.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(scale[0] * 0.5)
    assert by_param[id(model.head.weight)].get("lr_scale", 1.0) == 1.0
    # the schedule keeps the ratios: OneCycleLR's scalar max_lr became one value per group
    head = by_param[id(model.head.weight)]
    for i in range(blocks):
        group = by_param[id(vit.blocks[i].attn.qkv.weight)]
        assert group["lr"] == pytest.approx(head["lr"] * scale[i]) and group["max_lr"] == pytest.approx(1e-2 * scale[i])


def test_layer_decay_refuses_a_schedule_that_flattens_it(fmnist_fixture, tmp_path):
    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, layer_decay=0.7,
                             scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=5))
    with pytest.raises(ValueError, match="undoes layer_decay"):
        _trainer(tmp_path).fit(model, _data(fmnist_fixture))
    with pytest.raises(ValueError, match="layer_decay"):
        ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, layer_decay=1.5)


# --- weight EMA -------------------------------------------------------------------------------------------------


class WeightsSeen(Callback):
    """Records the head weights the model validates with, and the ones it starts training with."""

    def __init__(self) -> None:
        self.validated: list[torch.Tensor] = []
        self.started: torch.Tensor | None = None
        self.averaged_at_start: torch.Tensor | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.validated.append(pl_module.head.weight.detach().clone())

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = pl_module.head.weight.detach().clone()
        (ema,) = [c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging)]
        self.averaged_at_start = ema._average_model.module.head.weight.detach().clone()


def _ema_run(root: Path, out: Path, steps: int, ckpt_path: str | None = None) -> tuple[ClassifierSystem, L.Trainer,
                                                                                          WeightsSeen]:
    L.seed_everything(0)
    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, ema_decay=0.5,
                             optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    seen = WeightsSeen()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out, max_steps=steps, check_val_every_n_epoch=1,
                        callbacks=[seen, ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1,
                                                         filename="{step}")])
    trainer.fit(model, _data(root, val_per_class=1, samples_per_epoch=8), ckpt_path=ckpt_path)
    return model, trainer, seen


def test_ema_weights_validate_end_training_and_resume(fmnist_fixture, tmp_path):
    model, trainer, seen = _ema_run(fmnist_fixture, tmp_path / "a", steps=4)
    (ema,) = [c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging)]
    assert ema._average_model.module.head.weight.device == model.device
    checkpoint = torch.load(tmp_path / "a" / "step=4.ckpt", weights_only=True)
    averaged, raw = checkpoint["state_dict"]["head.weight"], checkpoint["current_model_state"]["head.weight"]
    assert not torch.allclose(averaged, raw)  # the average lags the raw weights
    assert len(seen.validated) == 2  # two epochs of two steps, one validation batch each
    torch.testing.assert_close(seen.validated[-1], averaged)  # validation ran with the averaged weights
    torch.testing.assert_close(model.head.weight.detach(), averaged)  # the final weights are the averaged ones
    # resume: the raw weights train on, the average is restored, and 4 + 2 steps equal 6 uninterrupted
    resumed, _, seen_resumed = _ema_run(fmnist_fixture, tmp_path / "b", steps=6,
                                        ckpt_path=str(tmp_path / "a" / "step=4.ckpt"))
    torch.testing.assert_close(seen_resumed.started, raw)
    torch.testing.assert_close(seen_resumed.averaged_at_start, averaged)  # the average's state came back too
    straight, _, _ = _ema_run(fmnist_fixture, tmp_path / "c", steps=6)
    torch.testing.assert_close(resumed.head.weight, straight.head.weight)
    # `lbgen validate / test --ckpt_path`: the checkpoint's weights are the average, read as they are
    fresh = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, ema_decay=0.5)
    evaluator = _trainer(tmp_path / "d")
    evaluator.validate(fresh, _data(fmnist_fixture, val_per_class=1), ckpt_path=str(tmp_path / "a" / "step=4.ckpt"))
    assert not any(isinstance(c, EMAWeightAveraging) for c in evaluator.callbacks)
    torch.testing.assert_close(fresh.head.weight.detach(), averaged)
    with pytest.raises(ValueError, match="ema_decay"):
        ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, ema_decay=1.0)


# --- memory and speed options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    plain = TimmBackbone(name)
    checkpointed = TimmBackbone(name, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.model.grad_checkpointing and not plain.model.grad_checkpointing
    images = torch.rand(2, 3, 32, 32) if name == "test_resnet" else torch.rand(2, 3, 160, 160)
    outputs, grads = [], []
    for backbone in (plain, checkpointed):
        backbone.train()
        out = backbone(images)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[0], outputs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(plain.parameters()))
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], msg=key)


@pytest.mark.slow
def test_compile_flag_compiles_the_backbone_in_place(fmnist_fixture, tmp_path):
    torch.manual_seed(0)
    # dynamo's eager backend: the wiring without inductor's C++ build (minutes on a CPU; `compile: true` uses it)
    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10, compile={"backend": "eager"})
    keys = set(model.state_dict())
    trainer = _trainer(tmp_path)
    trainer.fit(model, _data(fmnist_fixture))
    assert trainer.global_step == 1 and model.backbone._compiled_call_impl is not None
    assert set(model.state_dict()) == keys  # no `_orig_mod.`: checkpoints and backbone_output keep their names
