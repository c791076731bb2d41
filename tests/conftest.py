"""Test harness: no network, no writes to the user's caches, tiny seeded data in the real file formats."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

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
