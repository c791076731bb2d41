"""Checkpoint size of the SD 1.5 fine-tunes, full vs lean, computed from the real module shapes (no weights).

    .venv/bin/python benchmarks/checkpoint_size.py [--json]

SD 1.5's UNet, VAE and text encoder come from ``configs/scale/`` and are built on the meta device (no memory, no
download); LoRA is added with lbgen's own ``add_lora`` (the targets the systems use). The lbGen judges are built as
lbgen builds them: CLIP ViT-L/14 (open_clip, meta device), ``topiq_nr`` (pyiqa's CFANet, ResNet-50, random weights)
and the discriminator on 768-d CLIP features. Sizes:
- full: every state-dict tensor in fp32 (``precision: 32-true``) or the frozen ones in bf16 (``bf16-mixed``: frozen
  parts are cast), plus AdamW's two fp32 moments per trainable parameter;
- lean: the trainable parameters and the kept buffers in fp32, plus the same moments (what ``LeanCheckpointMixin``
  writes). Loops, RNG states, hyper-parameters and the marker add a few kB to both.
The last stdout line is the table as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

CONFIGS = REPO / "configs" / "scale"
GB = 1e9


def sd15_parts() -> dict[str, torch.nn.Module]:
    """SD 1.5's UNet, VAE and text encoder on the meta device (architecture only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {name: json.loads((CONFIGS / f"sd15_{name}.json").read_text()) for name in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(config["unet"]),
                "vae": AutoencoderKL.from_config(config["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))}


def lbgen_judges() -> dict[str, torch.nn.Module]:
    """lbGen's frozen judges (CLIP ViT-L/14, topiq_nr) and its trained discriminator, at real size."""
    import open_clip
    from pyiqa.archs.topiq_arch import CFANet

    from lbgen.losses.alignment import DatasetAlignmentLoss

    with torch.device("meta"):
        clip = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
    quality = CFANet(semantic_model_name="resnet50", use_ref=False, backbone_pretrain=False, pretrained=False)
    return {"clip": clip, "quality": quality, "dataset_alignment": DatasetAlignmentLoss(768, 256)}


def tensor_bytes(tensors, dtype_bytes: int) -> int:
    return sum(t.numel() * dtype_bytes for t in tensors)


def sizes(parts: dict[str, torch.nn.Module], trained: set[str]) -> dict[str, float]:
    """Parameter counts and checkpoint sizes (GB) of a system made of ``parts``; ``trained``: parts trained whole."""
    trainable, frozen, kept_buffers = [], [], []
    for name, module in parts.items():
        for value in module.state_dict(keep_vars=True).values():
            is_trainable = name in trained or (isinstance(value, torch.nn.Parameter) and value.requires_grad)
            if is_trainable:
                trainable.append(value)
            elif name in trained:
                kept_buffers.append(value)
            else:
                frozen.append(value)
    moments = 2 * tensor_bytes(trainable, 4)  # AdamW: exp_avg and exp_avg_sq, fp32
    kept = tensor_bytes(trainable, 4) + tensor_bytes(kept_buffers, 4)
    return {"trainable_params_M": sum(t.numel() for t in trainable) / 1e6,
            "total_params_M": sum(t.numel() for t in trainable + frozen + kept_buffers) / 1e6,
            "full_fp32_GB": (kept + tensor_bytes(frozen, 4) + moments) / GB,
            "full_bf16_frozen_GB": (kept + tensor_bytes(frozen, 2) + moments) / GB,
            "lean_GB": (kept + moments) / GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="also print the table as one JSON line")
    args = parser.parse_args()
    from lbgen.components.lora import TEXT_TARGETS, UNET_TARGETS, add_lora

    rows = {}
    for label, rank, text, judges in (("DataDream / BOB: LoRA r16 UNet + text encoder", 16, True, False),
                                      ("LoRA r16 UNet only", 16, False, False),
                                      ("lbGen: LoRA r128 UNet + CLIP L/14 + topiq_nr", 128, False, True)):
        parts = sd15_parts()
        add_lora(parts["unet"], rank, None, UNET_TARGETS)
        parts["text_encoder"].requires_grad_(False)
        parts["vae"].requires_grad_(False)
        if text:
            add_lora(parts["text_encoder"], rank, None, TEXT_TARGETS)
        trained = set()
        if judges:
            extra = lbgen_judges()
            extra["clip"].requires_grad_(False)
            extra["quality"].requires_grad_(False)
            parts.update(extra)
            trained = {"dataset_alignment"}
        rows[label] = sizes(parts, trained)
    header = (f"{'SD 1.5 fine-tune':48} {'trainable M':>11} {'total M':>8} {'full fp32':>10} {'full bf16':>10} "
              f"{'lean':>8}")
    print(header)
    print("-" * len(header))
    for label, row in rows.items():
        print(f"{label:48} {row['trainable_params_M']:11.2f} {row['total_params_M']:8.1f} "
              f"{row['full_fp32_GB']:9.3f}G {row['full_bf16_frozen_GB']:9.3f}G {row['lean_GB'] * 1e3:7.1f}M")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
