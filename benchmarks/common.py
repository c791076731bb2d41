"""Helpers shared by the benchmark scripts: a generator that exists anywhere, child processes, result tables.

Nothing here measures anything; the scripts import it (``benchmarks/`` is on ``sys.path`` when one of them runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The embedded generator's architecture (configs/foundation/fashion_generator.yaml) with random weights: the same
# compute per image as the trained one, so speed numbers carry over; the images are noise.
SMALL_GENERATOR = {"image_size": 32, "vae_channels": (32, 64, 64), "latent_channels": 4, "unet_channels": (64, 128),
                   "layers_per_block": 1, "cross_attention_dim": 64, "attention_head_dim": 8, "text_layers": 2,
                   "text_heads": 4, "max_prompt_length": 16, "scheduler": "ddim"}


# Random and cheap at a photo-like output size: for input-pipeline measurements, where only the PNGs matter.
LARGE_IMAGE_GENERATOR = {"vae_channels": (8, 8, 8, 8), "unet_channels": (16, 32), "cross_attention_dim": 16,
                         "attention_head_dim": 4, "text_layers": 1, "text_heads": 2}


def ensure_generator(generator: str | None, out: Path, name: str = "random_generator", **sizes: Any) -> str:
    """The generator folder to benchmark: ``generator`` if given, else a small random one saved under ``out``.

    Args:
        generator: a diffusers pipeline folder, or None.
        out: where the random generator is written (reused when already there).
        name: its folder name inside ``out``.
        **sizes: ``build_generator`` arguments that replace ``SMALL_GENERATOR``'s.
    """
    if generator:
        if not (Path(generator).expanduser() / "model_index.json").is_file():
            raise SystemExit(f"--generator {generator} is not a diffusers pipeline folder (no model_index.json); "
                             "leave it out to benchmark a small random generator.")
        return str(Path(generator).expanduser())
    folder = Path(out) / name
    if not (folder / "model_index.json").is_file():
        from lbgen.components.diffusion import build_generator

        build_generator(**{**SMALL_GENERATOR, **sizes}, seed=0).save_pretrained(folder)
    return str(folder)


def child_env(threads: int = 1) -> dict[str, str]:
    """Environment of a benchmark child: offline, ``threads`` intra-op threads, the checkout importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_json(argv: list[str], threads: int = 1, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process and return the JSON object its last stdout line holds."""
    result = subprocess.run([sys.executable, *argv], env=child_env(threads), capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    return last_json_line(result.stdout)


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of ``text`` that is a JSON object (children print logs before their result)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise ValueError(f"no JSON result line in the output:\n{text[-2000:]}")


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN when the denominator is not positive (a measurement that did not run)."""
    return numerator / denominator if denominator > 0 else float("nan")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats get 2 decimals, numbers are right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.2f}"
        return str(value)

    numeric = [all(isinstance(r[i], int | float) for r in rows) if rows else False for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
