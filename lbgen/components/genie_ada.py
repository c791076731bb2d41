"""GeNIe-Ada: a noise ratio r per source image, where its img2img result switches from the source class to the
target class (the hardest negative that already shows the target)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def crossing_index(target_prob: torch.Tensor, source_prob: torch.Tensor) -> torch.Tensor:
    """Per image, the first position of a sweep (increasing r) where the target class is more probable than the
    source class; the last position when the image never crosses. Inputs ``[num_strengths, B]``."""
    crossed = target_prob > source_prob
    first = crossed.float().argmax(0)  # argmax returns the first maximum: the first True
    return torch.where(crossed.any(0), first, torch.full_like(first, crossed.shape[0] - 1))


def adaptive_strength(generate: Callable[[float], torch.Tensor], judge: Callable[[torch.Tensor], torch.Tensor],
                      strengths: Sequence[float], source_classes: torch.Tensor, target_classes: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate at every r of the sweep, and keep per image the result at its crossing r.

    Args:
        generate: images in [0, 1] ``[B, 3, H, W]`` for a strength (the same seeds for every r).
        judge: class probabilities ``[B, num_classes]`` of images.
        strengths: the sweep, increasing.
        source_classes: class of each source image ``[B]``.
        target_classes: prompted class of each image ``[B]``.

    Returns:
        the chosen images ``[B, 3, H, W]``, the chosen strength per image ``[B]`` and the target-class probability
        along the sweep ``[num_strengths, B]``.
    """
    strengths = [float(r) for r in strengths]
    if not strengths or strengths != sorted(strengths) or not all(0 < r <= 1 for r in strengths):
        raise ValueError(f"The GeNIe-Ada sweep must be increasing strengths in (0, 1], got {strengths}.")
    images, target_prob, source_prob = [], [], []
    rows = torch.arange(len(target_classes))
    for r in strengths:
        batch = generate(r)
        probs = judge(batch).float()
        images.append(batch)
        target_prob.append(probs[rows, target_classes.to(probs.device)].cpu())
        source_prob.append(probs[rows, source_classes.to(probs.device)].cpu())
    target, source = torch.stack(target_prob), torch.stack(source_prob)
    choice = crossing_index(target, source)
    stacked = torch.stack(images)  # [S, B, 3, H, W]
    chosen = stacked[choice.to(stacked.device), rows.to(stacked.device)]
    return chosen, torch.tensor(strengths, dtype=torch.float64)[choice], target
