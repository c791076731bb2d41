"""Seeded, graded image distortions (blur, noise, JPEG, pixelation) that teach a quality model what "worse" means.

Level 0 is the clean image; levels 1..``num_levels`` are increasingly strong. Each kind's strength grows with
``level / num_levels`` up to a fixed maximum, so a model trained with 4 levels and one tested with 8 see the same
range of damage.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2.functional import gaussian_blur

DistortionKind = Literal["blur", "noise", "jpeg", "pixelate"]
DISTORTIONS: tuple[str, ...] = ("blur", "noise", "jpeg", "pixelate")

MAX_BLUR_SIGMA = 2.0
"""Gaussian blur sigma (pixels) at the strongest level."""
MAX_NOISE_STD = 0.2
"""Standard deviation of the additive Gaussian noise (images in [0, 1]) at the strongest level."""
JPEG_QUALITY = (50, 5)
"""JPEG quality at level 1 and at the strongest level (geometric in between)."""
MAX_PIXELATE_FACTOR = 4.0
"""Down-sampling factor of the pixelation at the strongest level."""


def distortion_strength(kind: str, level: int, num_levels: int) -> float:
    """The parameter of ``kind`` at ``level``: blur sigma, noise std, JPEG quality or pixelation factor."""
    if kind not in DISTORTIONS:
        raise ValueError(f"Unknown distortion {kind!r}; choose from {DISTORTIONS}.")
    if not 1 <= level <= num_levels:
        raise ValueError(f"level must be in 1..{num_levels} (0 is the clean image), got {level}.")
    t = level / num_levels
    if kind == "blur":
        return MAX_BLUR_SIGMA * t
    if kind == "noise":
        return MAX_NOISE_STD * t
    if kind == "jpeg":
        first, last = JPEG_QUALITY
        u = (level - 1) / (num_levels - 1) if num_levels > 1 else 1.0
        return float(round(first * (last / first) ** u))
    return 1.0 + (MAX_PIXELATE_FACTOR - 1.0) * t


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel of +-3 sigma (reflect padding), in the images' dtype even under autocast (the
    damage is data: a mixed-precision step must see the same pixels as an fp32 one)."""
    size = 2 * int(np.ceil(3 * sigma)) + 1
    with torch.autocast(images.device.type, enabled=False):
        return gaussian_blur(images, [size, size], [sigma, sigma])


def add_noise(images: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive white Gaussian noise, independent per pixel and channel, clipped to [0, 1].

    The noise is drawn on the CPU from ``generator``, so a seed gives the same images on any device.
    """
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    return (images + std * noise).clamp(0, 1)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode each image as a JPEG of this quality (PIL, 4:2:0 chroma sub-sampling)."""
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG",
                                                                                 quality=int(quality))
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("L" if image.shape[-1] == 1 else "RGB"))
        out.append(decoded.reshape(image.shape))
    result = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return result.to(images.device, images.dtype) / 255


def pixelate(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Average down to ``side / factor`` pixels, then enlarge back with nearest neighbours (blocky)."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, round(h / factor)), max(1, round(w / factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


def distort(images: torch.Tensor, kind: str, level: int, num_levels: int = 4,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One kind of distortion at one level for a batch ``[N, C, H, W]`` in [0, 1]; level 0 returns the input."""
    if level == 0:
        return images
    strength = distortion_strength(kind, level, num_levels)
    if kind == "blur":
        return blur(images, strength)
    if kind == "noise":
        return add_noise(images, strength, generator)
    if kind == "jpeg":
        return jpeg(images, int(strength))
    return pixelate(images, strength)


def distort_each(images: torch.Tensor, kind_ids: torch.Tensor, levels: torch.Tensor,
                 kinds: tuple[str, ...] | list[str] = DISTORTIONS, num_levels: int = 4,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Distort image ``i`` with ``kinds[kind_ids[i]]`` at ``levels[i]`` (grouped, so a batch costs few calls).

    Groups are processed in a fixed order, so the result depends only on the inputs and the generator's seed.
    """
    out = images.clone()
    pairs = torch.stack([kind_ids.cpu(), levels.cpu()], 1)
    for kind_id, level in torch.unique(pairs, dim=0).tolist():
        if level == 0:
            continue
        chosen = ((pairs[:, 0] == kind_id) & (pairs[:, 1] == level)).nonzero().squeeze(1).to(images.device)
        out[chosen] = distort(images[chosen], kinds[kind_id], level, num_levels, generator)
    return out
