"""The CLIP classifier (DataDream / BOB): ClipBackbone, the zero-shot text head, LoRA on either tower, the zero-shot
report before training and the CLI path (checkpoints, resume), on a tiny open_clip model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml

from lbgen.cli import cli_main
from lbgen.components import ClipBackbone, TimmBackbone
from lbgen.models import ClassifierSystem
from lbgen.models.batches import unpack_batch

from .conftest import REPO, load_recipe, shrink
from .test_alignment_components import TINY_CLIP

NAMES = ["shirt", "shoe", "bag"]
PROMPTS = [f"a photo of a {name}." for name in NAMES]
# LoRA parameters of one tiny tower (2 blocks of width 64, MLP 256) per unit of rank: q/k/v in_proj 64 -> 192,
# out_proj 64 -> 64, c_fc 64 -> 256, c_proj 256 -> 64; A is r x in, B is out x r
LORA_PER_RANK = 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))


def tiny_backbone(**kwargs) -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone(model_name="tiny", pretrained=None, model_config=TINY_CLIP, **kwargs)


def test_backbone_normalises_inside_and_gives_open_clips_zero_shot_classifier():
    backbone = tiny_backbone()
    model, images = backbone.clip.model, torch.rand(2, 3, 32, 32)
    assert backbone.num_features == TINY_CLIP["embed_dim"]
    expected = model.encode_image((images - backbone.clip.mean) / backbone.clip.std, normalize=True)
    torch.testing.assert_close(backbone(images), expected)  # images in [0, 1], the model's own mean / std inside
    templates = ["a photo of a {}.", "a {} on a table."]
    reference = open_clip.build_zero_shot_classifier(model, backbone.clip.tokenizer, NAMES, templates,
                                                     num_classes_per_batch=2)
    torch.testing.assert_close(backbone.class_text_embeddings(NAMES, templates, classes_per_batch=2), reference.T)
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad} == {"visual"}
    with pytest.raises(ValueError, match="exactly one"):
        backbone.tokenize_classes(NAMES, ["no place for the name"])


def test_text_head_makes_the_untrained_classifier_clips_zero_shot_classifier():
    model = ClassifierSystem(tiny_backbone(), num_classes=3, class_names=NAMES, head_init="text").eval()
    images = torch.rand(4, 3, 32, 32)
    probabilities = model.backbone.clip.class_probabilities(images, PROMPTS)  # ClipScorer: CLIP zero-shot
    torch.testing.assert_close(model(images).softmax(-1), probabilities)
    assert not model.head.bias.any()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"backbone": "timm", "head_init": "text"}, TypeError, "class text embeddings"),
    ({"backbone": "timm", "finetune": "lora"}, TypeError, "LoRA adapters"),
    ({"head_init": "text", "class_names": None}, ValueError, "class_names"),
    ({"head_init": "text", "normalize": False}, ValueError, "normalize"),
    ({"head_init": "text", "lora_text": True}, ValueError, "finetune 'lora'"),
    ({"finetune": "lora", "lora_text": True}, ValueError, "head_init 'text'"),
    ({"head_init": "zero"}, ValueError, "head_init must be"),
])
def test_options_a_backbone_cannot_serve_are_refused(kwargs, error, match):
    kwargs = {"class_names": NAMES, **kwargs}
    backbone = (TimmBackbone("test_resnet") if kwargs.pop("backbone", None) == "timm"
                else tiny_backbone(normalize=kwargs.pop("normalize", True)))
    with pytest.raises(error, match=match):
        ClassifierSystem(backbone, num_classes=3, **kwargs)


@pytest.mark.parametrize("finetune, lora_text, expected", [
    ("full", False, "visual + head"), ("linear", False, "head"), ("lora", False, "image LoRA + head"),
    ("lora", True, "LoRA of both towers"),
])
def test_trainable_parameters_and_every_one_gets_a_gradient(finetune, lora_text, expected):
    rank = 2
    model = ClassifierSystem(tiny_backbone(), num_classes=3, class_names=NAMES, head_init="text", finetune=finetune,
                             lora_text=lora_text, lora_rank=rank)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    head = 3 * TINY_CLIP["embed_dim"] + 3
    visual = sum(p.numel() for p in model.backbone.clip.model.visual.parameters())
    count = {"visual + head": visual + head, "head": head, "image LoRA + head": rank * LORA_PER_RANK + head,
             "LoRA of both towers": 2 * rank * LORA_PER_RANK}[expected]
    assert sum(p.numel() for p in trainable.values()) == count
    if finetune == "lora":
        assert all("lora_" in name or name.startswith("head.") for name in trainable)
        assert any(".visual." not in name and "lora_" in name for name in trainable) == lora_text
        for name, p in trainable.items():  # B = 0 at init would keep A's gradient at 0: make every B non-zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    loss = F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"trainable parameters without a gradient: {missing}"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_text_lora_head_is_recomputed_in_training_and_cached_per_evaluation():
    model = ClassifierSystem(tiny_backbone(), num_classes=3, class_names=NAMES, head_init="text", finetune="lora",
                             lora_text=True, lora_rank=2)
    assert model.head is None and "class_tokens" not in model.state_dict()  # the head is the text tower
    images = torch.rand(4, 3, 32, 32)
    zero_shot = model.backbone.clip.class_probabilities(images, PROMPTS)  # B = 0: LoRA changes nothing yet
    model.eval()
    with torch.no_grad():
        before = model(images)
    cached = model._text_weights
    with torch.no_grad():
        model(images)
    assert cached is not None and model._text_weights is cached  # encoded once per evaluation
    torch.testing.assert_close(before.softmax(-1), zero_shot)
    model.train()
    assert model._text_weights is None
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name and ".visual." not in name:
                p.normal_(std=0.05)  # what training the text LoRA does
    model.eval()
    with torch.no_grad():
        after = model(images)
    assert not torch.allclose(before, after)


def test_grad_checkpointing_gives_the_same_gradients():
    gradients = []
    for checkpointing in (False, True):
        backbone = tiny_backbone(gradient_checkpointing=checkpointing)
        assert backbone.clip.model.visual.transformer.grad_checkpointing == checkpointing
        assert backbone.clip.model.transformer.grad_checkpointing == checkpointing
        torch.manual_seed(1)
        backbone.add_lora(2, text=True, init=False)  # random non-zero B: every LoRA weight has a gradient
        torch.manual_seed(2)
        images = torch.rand(2, 3, 32, 32)
        texts = backbone.class_text_embeddings(NAMES)
        (backbone(images) @ texts.t()).square().sum().backward()
        gradients.append({n: p.grad for n, p in backbone.named_parameters() if p.requires_grad})
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 * 2 * 4  # 2 towers x 2 blocks x 4 layers x A/B
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def _tiny_recipe(tmp_path, fmnist_fixture, name: str = "clip_5shot.yaml") -> str:
    config = shrink(load_recipe(REPO / "configs/classifier" / name), {"fmnist": fmnist_fixture, "out": tmp_path})
    config["trainer"].update(accelerator="cpu", devices=1, precision="32-true", default_root_dir=str(tmp_path),
                             check_val_every_n_epoch=1, max_steps=2)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_zero_shot_is_reported_before_training_and_an_untrained_test_is_zero_shot(tmp_path, fmnist_fixture):
    recipe = _tiny_recipe(tmp_path, fmnist_fixture)
    cli_main(["fit", "-c", recipe, "--test_after_fit=no"])
    run = tmp_path / "version_0"
    report = json.loads((run / "zero_shot.json").read_text())
    logged = [float(row["val/zero_shot_acc"]) for row in csv.DictReader((run / "metrics.csv").open())
              if row.get("val/zero_shot_acc")]
    assert logged == [pytest.approx(report["val_zero_shot_acc"])] and len(report["templates"]) == 3
    # it is the untrained classifier's validation accuracy (the same seeded weights, validated without training)
    validated = cli_main(["validate", "-c", recipe])
    assert validated.trainer.callback_metrics["val/acc"].item() == pytest.approx(report["val_zero_shot_acc"])
    # `lbgen test` without a checkpoint: the zero-shot test accuracy, as open_clip's own zero-shot classifier scores
    tested = cli_main(["test", "-c", recipe])
    clip, names, templates = tested.model.backbone.clip, tested.model.class_names, tested.model.text_templates
    classifier = open_clip.build_zero_shot_classifier(clip.model, clip.tokenizer, names, templates)
    correct = total = 0
    with torch.no_grad():
        for batch in tested.datamodule.test_dataloader():
            images, labels, _ = unpack_batch(batch)
            correct += int(((clip.encode_images(images) @ classifier).argmax(-1) == labels).sum())
            total += len(labels)
    assert json.loads(Path(tested.trainer.log_dir, "test_metrics.json").read_text())["acc"] == pytest.approx(
        correct / total)
    # and so does a fit of no step (then its test after fit; OneCycleLR cannot plan 0 steps: no scheduler)
    untrained = cli_main(["fit", "-c", recipe, "--trainer.max_steps=0", "--model.init_args.scheduler=null"])
    assert untrained.trainer.global_step == 0
    assert json.loads(Path(untrained.trainer.log_dir, "test_metrics.json").read_text())["acc"] == pytest.approx(
        correct / total)


@pytest.mark.slow
def test_clip_lora_checkpoint_loads_weights_only_tests_and_resumes(tmp_path, fmnist_fixture):
    recipe = _tiny_recipe(tmp_path, fmnist_fixture)
    cli_main(["fit", "-c", recipe, "--model.init_args.scheduler.init_args.total_steps=4"])  # stops half-way
    checkpoint = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    assert any("lora_" in key for key in state) and not any(key.startswith("head.") for key in state)
    first = json.loads((tmp_path / "version_0" / "test_metrics.json").read_text())["acc"]
    cli_main(["test", "-c", recipe, f"--ckpt_path={checkpoint}"])
    assert json.loads((tmp_path / "version_1" / "test_metrics.json").read_text())["acc"] == pytest.approx(first)
    zero_shot = tmp_path / "version_0" / "zero_shot.json"
    written = zero_shot.stat().st_mtime_ns
    resumed = cli_main(["fit", "-c", recipe, "--ckpt_path=last", "--trainer.max_steps=4", "--test_after_fit=no",
                        "--model.init_args.scheduler.init_args.total_steps=4"])
    assert resumed.trainer.global_step == 4
    # a resumed head is no zero-shot head: nothing measured or written again
    assert list(tmp_path.glob("version_*/zero_shot.json")) == [zero_shot] and zero_shot.stat().st_mtime_ns == written


def write_synthetic(folder, class_names: list[str], size: int, per_class: int = 2):
    """A generated dataset (lbgen's shard format) of random images for ``class_names``."""
    from lbgen.storage.dataset_format import png_bytes, write_images_as_dataset

    generator = torch.Generator().manual_seed(0)
    images = [(c, png_bytes(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)))
              for c in range(len(class_names)) for _ in range(per_class)]
    write_images_as_dataset(folder, class_names, images, shard_size=8)
    return folder


@pytest.mark.slow
def test_real_scale_recipe_runs_on_an_image_folder_with_a_generated_set(tmp_path, fmnist_fixture, photo_folder):
    from lbgen.datamodules import ImageFolderDataModule

    # the real-scale mix runs as the recipe says, with tiny stand-ins: the shrunk ImageFolder and a generated set of
    # its classes at its size (the recipe test's shared generated set has the Fashion-MNIST classes)
    paths = {"fmnist": fmnist_fixture, "out": tmp_path, "photos": photo_folder, "synthetic": tmp_path / "synthetic"}
    config = shrink(load_recipe(REPO / "configs/classifier/clip_vitb16_5shot.yaml"), paths)
    data = config["data"]["init_args"]
    real = data["real"]["init_args"]
    write_synthetic(paths["synthetic"], ImageFolderDataModule(**real).class_names, real["image_size"])
    data["synthetic"]["init_args"]["image_size"] = real["image_size"]
    config["trainer"].update(accelerator="cpu", devices=1, precision="32-true", default_root_dir=str(tmp_path),
                             max_steps=2, check_val_every_n_epoch=1)
    (tmp_path / "real_scale.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "-c", str(tmp_path / "real_scale.yaml"), "--test_after_fit=no"])
    assert cli.trainer.global_step == 2 and cli.model.lora_text and cli.model.loss.real_weight == 0.8
    assert cli.model.backbone.clip.model.visual.transformer.grad_checkpointing
    assert json.loads((tmp_path / "version_0" / "zero_shot.json").read_text())["templates"] == [
        "a photo of a {}, a type of aircraft."]


@pytest.mark.slow
def test_lora_under_bf16_keeps_frozen_weights_low_and_trainable_ones_fp32(fmnist_fixture):
    import lightning as L

    from lbgen.datamodules import FashionMNISTDataModule

    dtypes: dict[str, set[torch.dtype]] = {"frozen": set(), "trainable": set()}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            for p in module.parameters():
                dtypes["trainable" if p.requires_grad else "frozen"].add(p.dtype)

    L.seed_everything(0)
    model = ClassifierSystem(tiny_backbone(), num_classes=10, head_init="text", finetune="lora", lora_text=True,
                             lora_rank=2, class_names=[str(i) for i in range(10)])
    data = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, val_per_class=1, image_size=32, batch_size=8,
                                  augmentation="none")
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, callbacks=[Spy()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert dtypes == {"frozen": {torch.bfloat16}, "trainable": {torch.float32}}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_timm_style_groups_keep_clips_position_embedding_from_weight_decay():
    from lbgen.models.optim import param_groups

    backbone = tiny_backbone()
    groups = param_groups(backbone, exclude_norm_bias=True)
    undecayed = {id(p) for g in groups if g.get("weight_decay", None) == 0.0 for p in g["params"]}
    named = dict(backbone.named_parameters())
    assert id(named["clip.model.visual.positional_embedding"]) in undecayed
    assert id(named["clip.model.visual.class_embedding"]) in undecayed
    assert any(id(p) not in undecayed for n, p in named.items() if p.ndim == 2 and p.requires_grad)
