"""L_q: a no-reference pyiqa metric as a differentiable loss, lower is better whatever the metric's direction."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lbgen.components.checkpoints import load_state_dict

QUALITY_CONFIG_FILE, QUALITY_WEIGHTS_FILE = "quality_config.json", "quality_model.safetensors"


def read_quality_folder(folder: str | Path) -> tuple[dict, Path]:
    """The config and weights file of a quality model saved by ``QualitySystem`` (validated)."""
    folder = Path(folder)
    config_file, weights = folder / QUALITY_CONFIG_FILE, folder / QUALITY_WEIGHTS_FILE
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a quality-model folder: it needs {QUALITY_CONFIG_FILE} and "
                                f"{QUALITY_WEIGHTS_FILE} (written by `lbgen fit -c configs/foundation/"
                                "fashion_quality.yaml`).")
    config = json.loads(config_file.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("metric"), str):
        raise ValueError(f"{config_file} has no 'metric' name; it was not written by lbgen's QualitySystem.")
    return config, weights


class QualityLoss(nn.Module):
    """Wrap a pyiqa no-reference metric (``topiq_nr``, ``musiq``, ``clipiqa+``, ...) as a loss.

    Args:
        metric: pyiqa metric name.
        input_size: resize images to this side first (metrics expect their training resolution); None: as is.
        metric_kwargs: extra ``pyiqa.create_metric`` arguments (e.g. ``pretrained: null`` for random weights).
        checkpoint: weights of the metric's network trained by lbgen: a ``QualitySystem`` folder (its metric,
            arguments and input size are read from it) or a ``.safetensors`` / torch state-dict file. They are read
            safely (never unpickled code) and replace pyiqa's own weights, which are then not downloaded.
        freeze: freeze the metric (the usual case: it judges, it is not trained).
    """

    def __init__(self, metric: str = "topiq_nr", input_size: int | None = None,
                 metric_kwargs: dict | None = None, checkpoint: str | None = None, freeze: bool = True) -> None:
        super().__init__()
        import pyiqa

        kwargs = dict(metric_kwargs or {})
        weights = None
        if checkpoint is not None:
            path = Path(checkpoint)
            if path.is_dir():
                config, weights = read_quality_folder(path)
                if config["metric"] != metric:
                    raise ValueError(f"{path} holds a {config['metric']!r} model but metric={metric!r}; set "
                                     f"metric: {config['metric']}.")
                kwargs = {**config.get("metric_kwargs", {}), **kwargs}
                input_size = input_size or config.get("input_size")
            elif not path.is_file():
                raise FileNotFoundError(f"Quality checkpoint {path} does not exist; train one with `lbgen fit -c "
                                        "configs/foundation/fashion_quality.yaml` or fix the path.")
            else:
                weights = path
            kwargs.setdefault("pretrained", None)  # our weights replace pyiqa's: nothing to download
        if metric not in pyiqa.list_models():
            raise ValueError(f"Unknown pyiqa metric {metric!r}; see pyiqa.list_models(metric_mode='NR').")
        self.metric = pyiqa.create_metric(metric, as_loss=True, device="cpu", **kwargs)
        if weights is not None:
            state = load_state_dict(weights)
            missing, unexpected = self.metric.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{weights} does not fit pyiqa's {metric!r} network (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); was it trained with other metric_kwargs?")
        self.metric_name, self.checkpoint, self.metric_kwargs = metric, checkpoint, kwargs
        self.lower_better = bool(self.metric.lower_better)
        self.input_size = input_size
        if freeze:
            self.metric.requires_grad_(False).eval()

    @property
    def net(self) -> nn.Module:
        """The metric's network (what ``QualitySystem`` trains and saves)."""
        return self.metric.net

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return images

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image quality ``[N]`` in the metric's own direction (higher is better unless ``lower_better``)."""
        return self.net(self.resize(images).clamp(0, 1)).float().reshape(len(images), -1).mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Loss for images in [0, 1]: the mean score if lower is better, else its negative."""
        score = self.metric(self.resize(images).clamp(0, 1)).float().mean()
        return score if self.lower_better else -score
