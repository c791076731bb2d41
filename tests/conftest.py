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
    elif name == "MixedDataModule" and "samples_per_epoch" in args:
        args["samples_per_epoch"] = 16
    elif name == "GenerationRequestsDataModule":
        args.update(images_per_class=2, batch_size=4, num_workers=0)
        if args.get("attribute_bank"):
            args["attribute_bank"] = str(paths["bank"])
    elif name == "TimmBackbone":
        args["model_name"] = "test_resnet"
        if args.get("checkpoint_path"):
            args["checkpoint_path"] = str(paths["backbone"])
    elif name == "PretrainedGenerator":
        args["model"] = str(paths["generator"])
        if args.get("lora"):
            args["lora"] = str(paths["lora"])
    elif name == "NewGenerator":
        args.update(TINY_NEW_GENERATOR, vae=str(paths["generator"] / "vae"))
    elif name == "ClipScorer":
        from .test_alignment_components import TINY_CLIP

        args.update(model_name="tiny", pretrained=None, model_config=TINY_CLIP)
    elif name == "QualityLoss":
        args.update(checkpoint=None, metric_kwargs={"pretrained": None})
    elif name == "AttributeCaptionedDataModule" and args.get("attribute_bank"):
        args["attribute_bank"] = str(paths["bank"])
    elif name == "AttributeExtractionSystem":
        args["output"] = str(paths["out"] / "attributes.json")
    elif name == "FewShotSystem":
        # fast_dev_run reads one batch (16 test images): 2-way episodes with one query
        args.update(output=str(paths["out"] / "fewshot.json"), n_way=2, k_shots=[1], n_query=1, episodes=3,
                    synthetic_per_class=[0, 1])
    elif name == "ClassNamesDataModule":
        args.update(batch_size=2, samples_per_epoch=4, val_per_class=1)
    elif name == "LbGenSystem":
        args.update(lora_rank=2, num_inference_steps=2, grad_steps=1, discriminator_hidden=8)
    elif name == "AutoencoderSystem":
        args.update(image_size=16, block_out_channels=[16, 32])
    elif name == "ScoringSystem" and args.get("oracle_checkpoint"):
        args["oracle_checkpoint"] = str(paths["oracle"])
    elif name == "ModelCheckpoint" and args.get("dirpath"):
        args["dirpath"] = str(paths["out"] / "checkpoints")
    if "output_dir" in args:
        args["output_dir"] = str(paths["out"] / name)
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
def recipe_paths(fmnist_fixture, tiny_generator, tmp_path_factory) -> dict[str, Path]:
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
    return paths
