"""Test harness: no network, no writes to the user's caches, tiny seeded data in the real file formats."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

# before anything imports huggingface_hub, which reads these once at import: offline from the first import on
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"

from lbgen.datamodules.fashion_mnist import DEFAULT_ROOT, FILES
from lbgen.datamodules.idx import write_idx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _offline_and_sandboxed(tmp_path_factory: pytest.TempPathFactory):
    """Any download fails at once, and model caches point into a temporary folder."""
    cache = tmp_path_factory.mktemp("caches")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCH_HOME": str(cache / "torch"),
           "HF_HOME": str(cache / "hf"), "XDG_CACHE_HOME": str(cache / "xdg")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    original_connect = socket.socket.connect

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family == socket.AF_UNIX or str(host) in ("127.0.0.1", "::1", "localhost") or str(host).startswith(
                "127."):
            return original_connect(sock, address)  # DDP's gloo rendezvous stays on loopback
        raise OSError(f"Tests must not use the network (tried to connect to {address}).")

    socket.socket.connect = guarded_connect
    # runs without a default_root_dir write into the current folder (Lightning's default): keep the checkout clean
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)
    socket.socket.connect = original_connect
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_fashion_like(num_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 uint8 images whose class is learnable: a bright bar whose position and angle depend on the class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), num_per_class)
    images = rng.integers(0, 60, size=(labels.size, 28, 28), dtype=np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    for i, c in enumerate(labels):
        angle = np.pi * c / 10
        dist = np.abs((xx - 14) * np.sin(angle) - (yy - 14) * np.cos(angle) - (c % 3 - 1) * 5)
        images[i][dist < 2.5] = 200 + rng.integers(0, 55)
    return images, labels


def write_fashion_fixture(root: Path, train_per_class: int = 30, test_per_class: int = 6) -> Path:
    """A Fashion-MNIST-shaped dataset in the real idx .gz format."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        images, labels = make_fashion_like(n, seed)
        write_idx(root / f"{FILES[split][0]}.gz", images)
        write_idx(root / f"{FILES[split][1]}.gz", labels)
    return root


@pytest.fixture(scope="session")
def fmnist_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_fixture(tmp_path_factory.mktemp("fashion_fixture"))


@pytest.fixture(scope="session")
def real_fmnist() -> Path:
    """The real Fashion-MNIST files: required in CI (the README's set-up installs them), skipped elsewhere."""
    root = Path(os.environ.get("LBGEN_FASHION_MNIST") or DEFAULT_ROOT)
    if not (root / f"{FILES['train'][0]}.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST is missing from {root}; ./run.sh installs dataset-fashion-mnist.")
        pytest.skip(f"Fashion-MNIST not installed in {root}")
    return root


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion-style pipeline saved as a diffusers folder (what `model:` points at)."""
    from lbgen.components.diffusion import build_generator

    folder = tmp_path_factory.mktemp("tiny_generator") / "generator"
    build_generator(image_size=16, vae_channels=(16, 32), unet_channels=(16, 32), cross_attention_dim=16,
                    attention_head_dim=4, text_layers=1, text_heads=2, max_prompt_length=16,
                    seed=0).save_pretrained(folder)
    return folder


# --- real resolution: an SD-shaped tiny generator, non-square photos (what the SD recipes read in the tests) ---

SD_SIDE = 256
"""The SD-shaped tiny generator's side (latent 32) and the largest side an SD recipe's data is shrunk to."""
PHOTO_CLASSES = ["707-320", "A300B4", "DC-3"]
"""Class folders of the photo fixture (aircraft variants, as the real-scale recipes' FGVC-Aircraft)."""


@pytest.fixture(scope="session")
def sd_generators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SD 1.5- and SD 2.1-shaped tiny pipelines (``build_sd_like``, 256 px) saved as diffusers folders."""
    from lbgen.components.diffusion import build_sd_like

    root = tmp_path_factory.mktemp("sd_generators")
    folders = {version: root / f"sd{version.replace('.', '')}" for version in ("1.5", "2.1")}
    for version, folder in folders.items():
        # fewer attention heads than SD's 8 (1.5; 2.1: heads of width 16): attention over the 32x32 latent's 1024
        # tokens costs heads x 1024^2 per image, most of a CPU step; the layout stays SD's
        build_sd_like(version, image_size=SD_SIDE, attention_head_dim=2 if version == "1.5" else 16,
                      seed=0).save_pretrained(folder)
    return folders


def write_photo_folder(root: Path, train_per_class: int = 8, test_per_class: int = 3) -> Path:
    """``root/{train,test}/<class>/*.jpg``: non-square JPEG photos (300x200 and 200x300) of the fashion-like class
    patterns, coloured and noised, as a real ImageFolder dataset; plus a ``confusion_matrix.json`` for its classes."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n, seed in (("train", train_per_class, 2), ("test", test_per_class, 3)):
        images, labels = make_fashion_like(n, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            if label >= len(PHOTO_CLASSES):
                continue
            size = (300, 200) if i % 2 else (200, 300)
            grey = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float32)
            colour = grey[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 8, (*grey.shape, 3))
            folder = root / split / PHOTO_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colour.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    # what `lbgen test` writes, for GeNIe's confusion-matrix sources: class 0 mostly confused with class 2
    (root / "confusion_matrix.json").write_text(json.dumps(
        {"class_names": PHOTO_CLASSES, "matrix": [[1, 0, 2], [0, 3, 0], [1, 0, 2]]}))
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


BLIP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "in", "front", "seen", "from",
              "side", "top", "sky", "runway", "grass", "wall", "flying", "parked"]


def save_tiny_blip(folder: Path, vocab: list[str] | None = None, favoured: list[str] | None = None) -> Path:
    """A random BLIP captioner (model + processor) saved with ``save_pretrained``: BOB's captioner stand-in.

    ``vocab``: its word-piece vocabulary (default ``BLIP_VOCAB``); ``favoured``: words its language head is biased
    towards (a test can then see whether they leak into captions)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab = vocab or BLIP_VOCAB
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder)  # BertTokenizer(vocab_file=...) is ignored in transformers 5
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(0)
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(vision_config={**tiny, "image_size": 32, "patch_size": 8},
                        text_config={**tiny, "vocab_size": len(vocab), "max_position_embeddings": 64, "pad_token_id": 0,
                                     "bos_token_id": 2, "sep_token_id": 3, "eos_token_id": 3},
                        projection_dim=16, image_text_hidden_size=16)
    model = BlipForConditionalGeneration(config).eval()
    if favoured:
        with torch.no_grad():
            model.text_decoder.cls.predictions.decoder.bias[[vocab.index(w) for w in favoured]] += 5.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --- the recipes of configs/, read as the CLI reads them and shrunk to tiny stand-ins (shared by the recipe tests) ---

OVERLAY_MARK = re.compile(r"^# lbgen-test: overlay-of (\S+)", re.MULTILINE)

TINY_NEW_GENERATOR = {"image_size": 16, "vae_channels": [16, 32], "latent_channels": 4, "unet_channels": [16, 32],
                      "cross_attention_dim": 16, "attention_head_dim": 4, "text_layers": 1, "text_heads": 2,
                      "max_prompt_length": 16}


def overlay_base(config_path: Path) -> Path | None:
    """The recipe an overlay is read on top of (its ``# lbgen-test: overlay-of <path under configs/>`` line)."""
    match = OVERLAY_MARK.search(config_path.read_text())
    return REPO / "configs" / match.group(1) if match else None


def recipe_chain(config_path: Path) -> list[Path]:
    """The files a recipe is read from, in ``-c`` order: its base's chain, then the recipe itself."""
    chain = [Path(config_path)]
    while (base := overlay_base(chain[0])) is not None:
        if base in chain:
            raise ValueError(f"{config_path}: its overlay-of chain goes round in a circle at {base}.")
        chain.insert(0, base)
    return chain


def init_arguments(class_path: str) -> set[str] | None:
    """The ``__init__`` arguments of a class, following ``**kwargs`` to its bases as jsonargparse does; None when it
    cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on ``base`` as LightningCLI merges two ``-c`` files: dicts recursively, the rest replaced; a new
    ``class_path`` keeps only the earlier ``init_args`` that the new class accepts."""
    out = dict(base)
    new_class = overlay.get("class_path")
    if new_class and new_class != base.get("class_path") and isinstance(base.get("init_args"), dict):
        accepted = init_arguments(new_class)
        if accepted is not None:
            out["init_args"] = {k: v for k, v in base["init_args"].items() if k in accepted}
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(config_path: Path) -> dict:
    """A recipe's tree; an overlay merged onto its base recipe (and that onto its own base, ...)."""
    tree: dict = {}
    for path in recipe_chain(config_path):
        tree = merge(tree, yaml.safe_load(path.read_text()) or {})
    return tree


def reads_photos(data) -> bool:
    """Whether a (shrunk) DataModule node reads the photo fixture, an ImageFolder: its classes are the photos'."""
    return isinstance(data, dict) and data.get("class_path", "").endswith("ImageFolderDataModule")


def shrink(node, paths: dict[str, Path]):
    """A copy of a recipe's tree where every heavy or external part is replaced by its tiny test stand-in."""
    if isinstance(node, list):
        return [shrink(v, paths) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: shrink(v, paths) for k, v in node.items()}
    cls, args = node.get("class_path", ""), node.get("init_args")
    if args is None:
        return node
    name = cls.rsplit(".", 1)[-1]
    if name in ("FashionMNISTDataModule", "ContextualFashionMNISTDataModule"):
        args.update(root=str(paths["fmnist"]), image_size=16, num_workers=0, batch_size=8)
        args.update({k: v for k, v in {"val_per_class": 2, "max_per_class": 20, "eval_batch_size": 16,
                                        "samples_per_epoch": 16}.items() if k in args})
        if args.get("shots"):
            args["shots"] = min(args["shots"], 5)
    elif name == "SyntheticDataModule":
        folder = paths["synthetic"]
        if args.get("predict_split") == "train" and "out" in paths:  # a scorer writes into it: score a copy
            folder = paths["out"] / "scored_copy"
            if not folder.exists():
                shutil.copytree(paths["synthetic"], folder)
        args.update(folder=str(folder), image_size=16)
    elif name == "ImageFolderDataModule" and (args.get("image_size") or 0) >= SD_SIDE:
        # what a generator reads (SD recipes: 384-768 px): the non-square photos at SD_SIDE, the tiny SD's side
        args.update(train_dir=str(paths["photos"] / "train"), num_workers=0, class_names_file=None,
                    check_cache_dir=None, batch_size=min(args.get("batch_size", 4), 4), image_size=SD_SIDE)
        if args.get("test_dir"):
            args["test_dir"] = str(paths["photos"] / "test")
        if args.get("samples_per_epoch"):
            args["samples_per_epoch"] = 16
    elif name == "ImageFolderDataModule":  # tiny non-square photos in WordNet-id folders, named by a class map
        from PIL import Image

        from lbgen.datamodules.fashion_mnist import CLASS_NAMES

        root = paths["out"] / "image_folder"
        if not root.exists():
            rng = np.random.default_rng(0)
            for split, n in (("train", 3), ("test", 2)):
                for c in range(len(CLASS_NAMES)):
                    (root / split / f"n{c:08d}").mkdir(parents=True)
                    for i in range(n):
                        Image.fromarray(rng.integers(0, 255, (14, 20, 3), dtype=np.uint8)).save(
                            root / split / f"n{c:08d}" / f"{i}.png")
            (root / "class_map.txt").write_text("".join(f"n{c:08d}\t{n}\n" for c, n in enumerate(CLASS_NAMES)))
        # the map always: the classes are the generated fixture's (Fashion-MNIST's), so the folder mixes with it
        args.update(train_dir=str(root / "train"), class_names_file=str(root / "class_map.txt"), image_size=16,
                    batch_size=8, eval_batch_size=16, num_workers=0)
        if args.get("test_dir"):
            args["test_dir"] = str(root / "test")
        args.update({k: 1 for k in ("val_per_class", "shots") if args.get(k)})
    elif name == "MixedDataModule" and "samples_per_epoch" in args:
        args["samples_per_epoch"] = 16
    elif name == "GenerationRequestsDataModule":
        args.update(images_per_class=2, batch_size=4, num_workers=0)
        photos = reads_photos(args.get("source_data"))
        if args.get("attribute_bank"):
            args["attribute_bank"] = str(paths["sd_bank" if photos else "bank"])
        if args.get("confusion_file"):
            args["confusion_file"] = str(paths["photos"] / "confusion_matrix.json")
        if args.get("class_names_file"):  # ImageNet's 1000 classes: generate for two of them
            args["classes"] = [0, 1]
    elif name == "TimmBackbone":
        args["model_name"] = "test_resnet"
        if args.get("checkpoint_path"):
            args["checkpoint_path"] = str(paths["backbone"])
    elif name == "PretrainedGenerator":
        real_scale = "stable-diffusion" in args["model"]  # a hub id of SD 1.5 / 2.1: the SD-shaped tiny one
        args["model"] = str(paths[("sd21" if "2-1" in args["model"] else "sd15") if real_scale else "generator"])
        if args.get("lora"):
            args["lora"] = str(paths["sd_lora" if real_scale else "lora"])
    elif name == "NewGenerator":
        args.update(TINY_NEW_GENERATOR, vae=str(paths["generator"] / "vae"))
    elif name == "GenerationSystem" and (args.get("generator") or {}).get("init_args", {}).get("model") in (
            str(paths.get("sd15")), str(paths.get("sd21"))):
        args["num_inference_steps"] = 2  # real scale: 50 steps at 256 px would be most of the test's time
    elif name in ("ClipScorer", "ClipBackbone"):  # a CLIP judge or classifier (ViT-*/openai, local-dir:): tiny
        from .test_alignment_components import TINY_CLIP

        args.update(model_name="tiny", pretrained=None, model_config=TINY_CLIP)
    elif name == "QualityLoss":
        # random weights; topiq_nr (real scale) would still download its ResNet-50: the embedded world's cnniqa
        args.update(checkpoint=None, metric_kwargs={"pretrained": None})
        if args.get("metric", "topiq_nr") != "cnniqa":
            args.update(metric="cnniqa", input_size=None)
    elif name == "AttributeCaptionedDataModule" and args.get("attribute_bank"):
        args["attribute_bank"] = str(paths["sd_bank" if reads_photos(args.get("data")) else "bank"])
    elif name == "CaptionerAttributeExtractor":
        args.update(model=str(paths["blip"]), max_new_tokens=4)
    elif name == "AttributeExtractionSystem":
        args["output"] = str(paths["out"] / "attributes.json")
    elif name == "FewShotSystem":
        # fast_dev_run reads one batch (16 test images): 2-way episodes with one query
        args.update(output=str(paths["out"] / "fewshot.json"), n_way=2, k_shots=[1], n_query=1, episodes=3,
                    synthetic_per_class=[0, 1] if args.get("synthetic_per_class", [0]) != [0] else [0])
    elif name == "ClassNamesDataModule":
        args.update(batch_size=2, samples_per_epoch=4, val_per_class=1)
    elif name == "LbGenSystem":
        args.update(lora_rank=2, num_inference_steps=2, grad_steps=1, discriminator_hidden=8)
    elif name == "AutoencoderSystem":
        args.update(image_size=16, block_out_channels=[16, 32])
    elif name == "ScoringSystem" and args.get("oracle_checkpoint"):
        args["oracle_checkpoint"] = str(paths["oracle"])
    elif name == "DataCardSystem":  # the data card (issue 23): the tiny oracle, KID on a few subsets
        args.update(kid_subsets=5)
        if args.get("oracle_checkpoint"):
            args["oracle_checkpoint"] = str(paths["oracle"])
    elif name == "ModelCheckpoint" and args.get("dirpath"):
        args["dirpath"] = str(paths["out"] / "checkpoints")
    if "output_dir" in args:
        args["output_dir"] = str(paths["out"] / name)
    if isinstance(args.get("class_names_file"), str) and (REPO / args["class_names_file"]).is_file():
        args["class_names_file"] = str(REPO / args["class_names_file"])  # a file of the checkout (tests run elsewhere)
    return node


def stage_of(config_path: Path) -> str:
    """``predict`` for generation and attribute extraction recipes (they set return_predictions), else ``fit``."""
    return "predict" if "return_predictions" in load_recipe(config_path) else "fit"


def run_recipe(config_path: Path, paths: dict[str, Path], *extra: str):
    """Run a recipe through `lbgen` with tiny stand-ins, as the CLI a user runs."""
    from lbgen.cli import cli_main

    config = shrink(load_recipe(config_path), paths)
    config.setdefault("trainer", {}).update(accelerator="cpu", devices=1, strategy="auto", precision="32-true",
                                            default_root_dir=str(paths["out"]))
    tiny = paths["out"] / config_path.name
    tiny.write_text(yaml.safe_dump(config))
    return cli_main([stage_of(config_path), "-c", str(tiny), *extra])


@pytest.fixture(scope="session")
def recipe_paths(fmnist_fixture, tiny_generator, sd_generators, photo_folder, tmp_path_factory) -> dict[str, Path]:
    """Inputs the recipes read (data, a generator folder, a generated dataset, an attribute bank, an oracle), all
    tiny; made once per test session."""
    out = tmp_path_factory.mktemp("synthetic_fixture")
    from safetensors.torch import save_file

    from lbgen.components import TimmBackbone, load_generator
    from lbgen.components.lora import add_lora, save_lora

    unet = load_generator(str(tiny_generator)).unet
    add_lora(unet, 2, None, ["to_q", "to_v"], init=False)
    save_lora(out / "lora", unet)
    save_file(TimmBackbone("test_resnet").state_dict(), out / "backbone.safetensors")
    paths = {"fmnist": fmnist_fixture, "generator": tiny_generator, "out": out, "lora": out / "lora",
             "backbone": out / "backbone.safetensors"}
    run_recipe(REPO / "configs/generate/fashion_txt2img.yaml", paths)
    paths["synthetic"] = out / "GenerationSystem"
    run_recipe(REPO / "configs/bob/attributes.yaml", paths)  # the BOB recipes read this bank
    paths["bank"] = out / "attributes.json"
    # an oracle for the scoring recipe: a tiny classifier checkpoint written by the CLI (loadable hparams)
    run_recipe(REPO / "configs/classifier/fashion_5shot.yaml", paths, "--trainer.max_steps=1", "--test_after_fit=no",
               f"--trainer.default_root_dir={out / 'oracle'}")
    (paths["oracle"],) = (out / "oracle").glob("version_*/checkpoints/last.ckpt")
    # real scale (the SD recipes): SD-shaped generators, a LoRA that fits them, photos, their BOB attribute bank
    sd_unet = load_generator(str(sd_generators["1.5"])).unet
    add_lora(sd_unet, 2, None, ["to_q", "to_v"], init=False)
    save_lora(out / "sd_lora", sd_unet)
    paths.update(sd15=sd_generators["1.5"], sd21=sd_generators["2.1"], sd_lora=out / "sd_lora",
                 photos=photo_folder, blip=save_tiny_blip(out / "blip"))
    (out / "sd").mkdir()
    run_recipe(REPO / "configs/bob/sd21_attributes.yaml", {**paths, "out": out / "sd"})
    paths["sd_bank"] = out / "sd" / "attributes.json"
    return paths
