"""Contextual Fashion-MNIST: every object composited onto a crop of a real photograph, with a recorded pose.

Fashion-MNIST has no background, so methods about context cannot show their point on it. Here each real object is
scaled, rotated and placed onto a random crop of a photograph bundled with scikit-image, and a training image of
class c sits on "its" background with probability ``bias`` (a spurious correlation, as in Waterbirds), while
validation and test images draw their background independently of the class.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from lbgen.datamodules.fashion_mnist import FashionMNISTDataModule, load_fashion_mnist
from lbgen.storage.files import atomic_write_json

# Photographs and textures shipped inside the scikit-image wheel, by their `skimage.data` function name. They are
# read from the wheel's folder directly, so no code path can start a pooch download. Synthetic or mostly empty
# images (logo, horse, chessboard, colorwheel, retina's black surround) are left out: they are not "context".
OFFLINE_BACKGROUNDS = {
    "astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png", "cell": "cell.png",
    "chelsea": "chelsea.png", "clock": "clock_motion.png", "coffee": "coffee.png", "coins": "coins.png",
    "grass": "grass.png", "gravel": "gravel.png", "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png", "moon": "moon.png", "page": "page.png", "rocket": "rocket.jpg",
    "text": "text.png",
}
BACKGROUND_PHRASES = {
    "astronaut": "astronaut portrait", "brick": "brick wall", "camera": "photographer on a lawn", "cell": "cell",
    "chelsea": "cat fur", "clock": "clock", "coffee": "coffee cup", "coins": "old coins", "grass": "green grass",
    "gravel": "gravel", "hubble_deep_field": "starry night sky", "immunohistochemistry": "stained tissue",
    "moon": "moon surface", "page": "printed page", "rocket": "rocket launch", "text": "handwritten text",
}
"""How a person would name each photograph in a caption (BOB's attribute words for the contextual benchmark)."""
DEFAULT_BACKGROUNDS = ["brick", "grass", "gravel", "moon", "coffee", "rocket", "hubble_deep_field", "camera", "coins",
                       "chelsea"]
DEFAULT_CONTEXT_SIDES = 1.0
"""A photograph is resized so that its short side is this many output images. 1 (the default): a crop shows the
whole scene (a coffee cup, a cat, a rocket), which a small generator trained on CPU can learn to draw; at 4 a crop is a
sixteenth of a scene, a texture, and the embedded generator drew textures without objects."""
ALPHA_GAIN = 10.0
"""Opacity = intensity x gain (clipped to 1): the object is bright on black; parts above 10% grey are opaque, so dark
garments stay visible objects instead of letting the photograph show through."""
CONTEXT_FILE = "context.json"
_STREAMS = {"pool": 0, "test": 1}  # the training pool and the test set draw from separate seeded streams
_CHUNK = 2048  # images rendered at once; each image's pixels do not depend on the chunk it falls in
Stream = Literal["pool", "test"]


@functools.lru_cache(maxsize=32)
def background_photo(name: str, short_side: int) -> torch.Tensor:
    """A bundled photograph as uint8 RGB ``[3, H, W]`` with ``min(H, W) == short_side`` (cached per process)."""
    if name not in OFFLINE_BACKGROUNDS:
        raise ValueError(f"Unknown background {name!r}; choose among the images bundled with scikit-image: "
                         f"{sorted(OFFLINE_BACKGROUNDS)}.")
    import skimage.data  # here, not at module level: only this DataModule needs scikit-image (a pyiqa dependency)

    path = Path(skimage.data.__file__).parent / OFFLINE_BACKGROUNDS[name]
    if not path.is_file():
        raise FileNotFoundError(f"Background {name!r} is missing from the scikit-image install ({path}); "
                                "reinstall scikit-image or choose another background.")
    with Image.open(path) as image:
        photo = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    h, w = photo.shape[1:]
    size = (short_side, max(short_side, round(w * short_side / h))) if h <= w else (
        max(short_side, round(h * short_side / w)), short_side)
    resized = F.interpolate(photo[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def describe_pose(scale: float, rotation: float, scale_range: tuple[float, float]) -> str:
    """A pose phrase from the composition: size (thirds of ``scale_range``) and tilt (beyond +-10 degrees)."""
    lo, hi = scale_range
    t = (scale - lo) / (hi - lo) if hi > lo else 0.5
    size = "small" if t < 1 / 3 else "large" if t > 2 / 3 else "medium-sized"
    tilt = "tilted left" if rotation > 10 else "tilted right" if rotation < -10 else "upright"
    return f"{size} and {tilt}"


def pose_vocabulary() -> list[str]:
    """Every phrase ``describe_pose`` can return."""
    return [f"{s} and {t}" for s in ("small", "medium-sized", "large")
            for t in ("upright", "tilted left", "tilted right")]


@dataclass(frozen=True)
class Poses:
    """Per-image composition parameters (arrays of equal length).

    Attributes:
        background: index into the background list.
        scale: side of the object's 28-pixel frame as a fraction of the image side.
        rotation: degrees, counter-clockwise on screen.
        center_x: object centre, pixels from the image's left edge.
        center_y: object centre, pixels from the image's top edge.
        crop_x: left edge of the background crop in the resized photograph.
        crop_y: top edge of the background crop in the resized photograph.
    """

    background: np.ndarray
    scale: np.ndarray
    rotation: np.ndarray
    center_x: np.ndarray
    center_y: np.ndarray
    crop_x: np.ndarray
    crop_y: np.ndarray

    def __len__(self) -> int:
        return len(self.background)

    def take(self, rows: np.ndarray) -> Poses:
        return Poses(**{k: v[rows] for k, v in self.__dict__.items()})


class Compositor:
    """Draws seeded poses and renders Fashion-MNIST objects onto photographs, vectorised with torch.

    Args:
        backgrounds: names of bundled photographs (see ``OFFLINE_BACKGROUNDS``); class c's own one is
            ``backgrounds[c % len(backgrounds)]``.
        image_size: side of the output images.
        scale_range: (min, max) object frame side as a fraction of the image side, within (0, 1].
        rotation_range: (min, max) rotation in degrees.
        seed: composition seed; image i of a stream draws from a generator seeded by ``(seed, stream, i)``.
        context_sides: a photograph's short side in output image sides (>= 1): 1 shows the whole scene (a square
            photograph gives the same view each time), 4 a sixteenth of it (many different textures per photograph).
    """

    def __init__(self, backgrounds: list[str], image_size: int, scale_range: tuple[float, float],
                 rotation_range: tuple[float, float], seed: int,
                 context_sides: float = DEFAULT_CONTEXT_SIDES) -> None:
        if not backgrounds:
            raise ValueError(f"backgrounds is empty; name at least one of {sorted(OFFLINE_BACKGROUNDS)}.")
        unknown = [b for b in backgrounds if b not in OFFLINE_BACKGROUNDS]
        if unknown:
            raise ValueError(f"Unknown or not offline background(s) {unknown}; choose among the images bundled "
                             f"with scikit-image: {sorted(OFFLINE_BACKGROUNDS)}.")
        if len(set(backgrounds)) != len(backgrounds):
            raise ValueError(f"backgrounds {backgrounds} repeats a name; list each photograph once.")
        lo, hi = scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < min <= max <= 1 (fraction of the image side), "
                             f"got {scale_range}.")
        if rotation_range[0] > rotation_range[1]:
            raise ValueError(f"rotation_range must be (min, max) degrees with min <= max, got {rotation_range}.")
        if context_sides < 1:
            raise ValueError(f"context_sides must be >= 1 (a crop cannot be larger than the photograph), "
                             f"got {context_sides}.")
        self.backgrounds, self.image_size, self.context_sides = list(backgrounds), image_size, float(context_sides)
        self.scale_range, self.rotation_range, self.seed = tuple(scale_range), tuple(rotation_range), seed
        self.photos = [background_photo(b, round(context_sides * image_size)) for b in self.backgrounds]
        # All photographs as one flat buffer of RGBX pixels packed in int32: a crop is then one gather per pixel.
        self._packed = torch.cat([torch.cat([p, torch.zeros_like(p[:1])]).permute(1, 2, 0).reshape(-1, 4)
                                  for p in self.photos]).view(torch.int32).flatten()
        sizes = [p.shape[1] * p.shape[2] for p in self.photos]
        self._offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()], dtype=torch.int64)
        self._widths = torch.tensor([p.shape[2] for p in self.photos], dtype=torch.int64)

    def draw(self, stream: Stream, positions: np.ndarray, labels: np.ndarray, biased: np.ndarray,
             bias: float) -> Poses:
        """Seeded poses of the images at ``positions`` of a stream.

        ``biased`` marks the images that sit on their class's background with probability ``bias`` (else on one of
        the others, uniformly); the rest draw their background uniformly, independently of the class.
        """
        positions = np.asarray(positions, dtype=np.int64)
        u = np.stack([np.random.default_rng([self.seed, _STREAMS[stream], int(p)]).random(8) for p in positions]
                     ) if len(positions) else np.zeros((0, 8))
        n_bg, own = len(self.backgrounds), np.asarray(labels)[positions] % len(self.backgrounds)
        other = np.minimum((u[:, 1] * (n_bg - 1)).astype(np.int64), max(n_bg - 2, 0))
        other = other + (other >= own)  # uniform over the backgrounds except the class's own
        uniform = np.minimum((u[:, 1] * n_bg).astype(np.int64), n_bg - 1)
        background = np.where(np.asarray(biased, dtype=bool),
                              np.where((u[:, 0] < bias) | (n_bg == 1), own, other), uniform)
        s = self.image_size
        scale = self.scale_range[0] + u[:, 4] * (self.scale_range[1] - self.scale_range[0])
        half = scale * s / 2  # the unrotated object frame lies inside the image
        heights = np.array([p.shape[1] for p in self.photos])[background]
        widths = np.array([p.shape[2] for p in self.photos])[background]
        return Poses(background=background, scale=scale,
                     rotation=self.rotation_range[0] + u[:, 5] * (self.rotation_range[1] - self.rotation_range[0]),
                     center_x=half + u[:, 7] * (s - 2 * half), center_y=half + u[:, 6] * (s - 2 * half),
                     crop_x=np.floor(u[:, 3] * (widths - s + 1)).astype(np.int64),
                     crop_y=np.floor(u[:, 2] * (heights - s + 1)).astype(np.int64))

    def render(self, objects: torch.Tensor, poses: Poses) -> torch.Tensor:
        """Composite uint8 objects ``[N, 1, 28, 28]`` (bright on black) into uint8 RGB images ``[N, 3, S, S]``."""
        out = torch.empty(len(poses), 3, self.image_size, self.image_size, dtype=torch.uint8)
        for start in range(0, len(poses), _CHUNK):
            end = min(start + _CHUNK, len(poses))
            out[start:end] = self._render_chunk(objects[start:end], poses.take(np.arange(start, end)))
        return out

    def _render_chunk(self, objects: torch.Tensor, poses: Poses) -> torch.Tensor:
        s = self.image_size
        value = objects.float() / 255
        side = math.ceil(s * self.scale_range[1])
        if side < value.shape[-1]:  # shrink with antialiasing first: bilinear sampling alone would alias
            value = F.interpolate(value, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        alpha = (value * ALPHA_GAIN).clamp_(max=1.0)
        layers = torch.cat([alpha * value, alpha], dim=1)  # premultiplied grey and opacity
        # Output pixel p (normalised coordinates) samples the object at R(-rotation) (p - centre) / scale. The grid
        # is built element by element (no batched matmul), so an image's pixels do not depend on its chunk.
        coords = (torch.arange(s, dtype=torch.float32) * 2 + 1) / s - 1
        gx, gy = coords[None, None, :], coords[None, :, None]
        angle = torch.from_numpy(np.deg2rad(poses.rotation)).float()[:, None, None]
        scale = torch.from_numpy(poses.scale).float()[:, None, None]
        cx = torch.from_numpy(2 * poses.center_x / s - 1).float()[:, None, None]
        cy = torch.from_numpy(2 * poses.center_y / s - 1).float()[:, None, None]
        dx, dy = (gx - cx) / scale, (gy - cy) / scale
        cos, sin = torch.cos(angle), torch.sin(angle)
        grid = torch.stack([dx * cos - dy * sin, dx * sin + dy * cos], dim=-1)
        sampled = F.grid_sample(layers, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        b = torch.from_numpy(poses.background)
        steps = torch.arange(s)
        ys = (torch.from_numpy(poses.crop_y)[:, None] + steps)[:, :, None]
        xs = (torch.from_numpy(poses.crop_x)[:, None] + steps)[:, None, :]
        pixels = self._packed[self._offsets[b][:, None, None] + ys * self._widths[b][:, None, None] + xs]
        image = pixels.view(torch.uint8).view(len(poses), s, s, 4)[..., :3].permute(0, 3, 1, 2).float()
        image.mul_(1 - sampled[:, 1:]).add_(sampled[:, :1] * 255)
        return image.round_().clamp_(0, 255).to(torch.uint8)

    def records(self, poses: Poses, ids: list[str], labels: np.ndarray) -> list[dict[str, Any]]:
        """One JSON-ready dict per image: id, label, background name, whether it is the class's own, and pose."""
        own = np.asarray(labels) % len(self.backgrounds)
        return [{"id": ids[i], "label": int(labels[i]), "background": self.backgrounds[poses.background[i]],
                 "own_background": bool(poses.background[i] == own[i]), "scale": float(poses.scale[i]),
                 "rotation": float(poses.rotation[i]), "center_x": float(poses.center_x[i]),
                 "center_y": float(poses.center_y[i]), "crop_x": int(poses.crop_x[i]), "crop_y": int(poses.crop_y[i])}
                for i in range(len(poses))]

    def poses_from_records(self, records: list[dict[str, Any]]) -> Poses:
        """The poses written by ``records`` (to re-render or audit images)."""
        column = {k: [r[k] for r in records] for k in ("scale", "rotation", "center_x", "center_y")}
        return Poses(background=np.array([self.backgrounds.index(r["background"]) for r in records], dtype=np.int64),
                     **{k: np.array(v, dtype=np.float64) for k, v in column.items()},
                     crop_x=np.array([r["crop_x"] for r in records], dtype=np.int64),
                     crop_y=np.array([r["crop_y"] for r in records], dtype=np.int64))


class CompositeImageSource:
    """Composited images of one stream, addressed by position, rendered in bulk by ``compose`` and kept in memory.

    A pool position is drawn with the class bias when it is among ``training_positions`` and class-independently
    otherwise; ids are those of plain Fashion-MNIST (``train:123``), so split files carry over.
    """

    def __init__(self, compositor: Compositor, objects: torch.Tensor, labels: np.ndarray, stream: Stream,
                 id_prefix: str, bias: float) -> None:
        self.compositor, self.objects, self.labels = compositor, objects, labels
        self.stream, self.id_prefix, self.bias = stream, id_prefix, bias
        self.training_positions: np.ndarray | None = None if stream == "pool" else np.zeros(0, dtype=np.int64)
        self._row = np.full(len(labels), -1, dtype=np.int64)
        self._images = torch.zeros(0, 3, compositor.image_size, compositor.image_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def sample_id(self, position: int) -> str:
        return f"{self.id_prefix}:{position}"

    def bind_training_positions(self, positions: np.ndarray) -> None:
        """Say which positions are training images (biased); a change drops the images composed so far."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        if self.training_positions is None or not np.array_equal(positions, self.training_positions):
            self.training_positions = positions
            self._row[:] = -1
            self._images = self._images[:0]

    def poses(self, positions: np.ndarray) -> Poses:
        if self.training_positions is None:
            raise RuntimeError("The pool's training positions are unknown; call the DataModule's setup('fit') first.")
        biased = np.isin(positions, self.training_positions)
        return self.compositor.draw(self.stream, positions, self.labels, biased, self.bias)

    def compose(self, positions: np.ndarray) -> None:
        """Render the images at ``positions`` that are not in memory yet."""
        todo = np.unique(np.asarray(positions, dtype=np.int64))
        todo = todo[self._row[todo] < 0]
        if todo.size:
            self._row[todo] = len(self._images) + np.arange(todo.size)
            new = self.compositor.render(self.objects[torch.from_numpy(todo)], self.poses(todo))
            self._images = torch.cat([self._images, new]) if len(self._images) else new

    def load(self, position: int) -> torch.Tensor:
        row = self._row[position]
        if row < 0:  # not composed in bulk: render it alone (same pixels)
            return self.compositor.render(self.objects[position:position + 1], self.poses(np.array([position])))[0]
        return self._images[row]

    def records(self, positions: np.ndarray) -> list[dict[str, Any]]:
        positions = np.asarray(positions, dtype=np.int64)
        return self.compositor.records(self.poses(positions), [self.sample_id(int(p)) for p in positions],
                                       self.labels[positions])


class ContextualFashionMNISTDataModule(FashionMNISTDataModule):
    """Fashion-MNIST objects on crops of real photographs, with a seeded pose and a class-background correlation.

    Training images of class c sit on ``backgrounds[c % len(backgrounds)]`` with probability ``bias`` and on one of
    the other backgrounds (uniformly) otherwise; validation and test images draw their background uniformly,
    whatever ``bias``. Every image's background and pose is recorded (``attributes``, and ``context.json`` next to
    ``splits.json`` in a run). The same arguments give byte-identical images, whatever the batch size or workers.

    Args:
        root: folder with the four Fashion-MNIST idx ``.gz`` files (see ``FashionMNISTDataModule``).
        backgrounds: names of photographs bundled with scikit-image (``OFFLINE_BACKGROUNDS``); default 10 of them.
        bias: probability that a training image is on its class's background; ``1 / len(backgrounds)`` makes the
            background independent of the class, 0 never puts a class on its own background.
        scale_range: (min, max) side of the object's frame as a fraction of the image side.
        rotation_range: (min, max) rotation of the object in degrees.
        seed: composition seed (backgrounds, crops and poses); the split has its own ``split_seed``.
        image_size: side of the output images.
        context_sides: a photograph's short side in output image sides (>= 1): how much of the scene a crop shows
            (4: a sixteenth, many textures per photograph; 1: all of it, one view per square photograph).
        **kwargs: split, augmentation and loader options of ``ImageClassificationDataModule``.
    """

    def __init__(
        self,
        root: str | None = None,
        backgrounds: list[str] | None = None,
        bias: float = 0.9,
        scale_range: tuple[float, float] = (0.55, 0.9),
        rotation_range: tuple[float, float] = (-30.0, 30.0),
        seed: int = 0,
        image_size: int = 64,
        context_sides: float = DEFAULT_CONTEXT_SIDES,
        **kwargs,
    ) -> None:
        super().__init__(root=root, image_size=image_size, **kwargs)
        if not 0 <= bias <= 1:
            raise ValueError(f"bias must be a probability in [0, 1], got {bias}.")
        self.bias, self.seed = bias, seed
        self.compositor = Compositor(list(DEFAULT_BACKGROUNDS if backgrounds is None else backgrounds), image_size,
                                     scale_range, rotation_range, seed, context_sides)
        self.backgrounds = self.compositor.backgrounds

    @property
    def dataset_name(self) -> str:
        return "contextual-fashion-mnist"

    def load_pool(self) -> tuple[CompositeImageSource, np.ndarray]:
        # The pool is only composed once the split is known: the hold-out for validation comes from this same pool
        # and must not carry the class-background bias, so each position is drawn biased if and only if it is a
        # training image (``_composed_pool``). Composing after the split also renders only the images in use.
        objects, labels = load_fashion_mnist(str(self.root), "train", 28)
        return CompositeImageSource(self.compositor, objects, labels, "pool", "train", self.bias), labels

    def load_test(self) -> tuple[CompositeImageSource, np.ndarray]:
        source = self._test_source()
        source.compose(np.arange(len(source)))
        return source, source.labels

    def _test_source(self) -> CompositeImageSource:
        objects, labels = load_fashion_mnist(str(self.root), "test", 28)
        return CompositeImageSource(self.compositor, objects, labels, "test", "test", self.bias)

    def _composed_pool(self) -> CompositeImageSource:
        """The pool with its training positions bound and the training and validation images rendered."""
        source, split = self.pool[0], self.split
        source.bind_training_positions(split.train)
        source.compose(np.concatenate([split.train, split.val]))
        return source

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") or (stage == "predict" and self.predict_split != "test"):
            self._composed_pool()  # in the main process, before DataLoader workers start
        super().setup(stage)

    def attributes(self, split: Literal["train", "val", "test"]) -> list[dict[str, Any]]:
        """Background and pose of every image of a split, in the split's order."""
        if split == "test":
            source = self.test_dataset.images if self.test_dataset is not None else self._test_source()
            return source.records(np.arange(len(source)))
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}.")
        source = self.pool[0]
        source.bind_training_positions(self.split.train)
        return source.records(getattr(self.split, split))

    def attribute_phrases(self, split: Literal["train", "val", "test"]) -> list[dict[str, Any]]:
        """The true background and pose of every image of a split as caption words (an exact attribute bank)."""
        scale_range = self.compositor.scale_range
        return [{"id": r["id"], "class_index": r["label"], "background": BACKGROUND_PHRASES[r["background"]],
                 "pose": describe_pose(r["scale"], r["rotation"], scale_range)} for r in self.attributes(split)]

    def split_record(self) -> dict[str, Any]:
        c = self.compositor
        return {**super().split_record(), "context": {
            "backgrounds": c.backgrounds, "bias": self.bias, "seed": self.seed, "image_size": self.image_size,
            "scale_range": list(c.scale_range), "rotation_range": list(c.rotation_range),
            "context_sides": c.context_sides,
            "attributes": f"{CONTEXT_FILE}: background and pose of every train, val (and test) image"}}

    def save_split(self, directory: str | os.PathLike) -> Path:
        """Write ``splits.json`` and ``context.json`` (per-image backgrounds and poses) into ``directory``."""
        path = super().save_split(directory)
        splits = ("train", "val", "test") if self.test_dataset is not None else ("train", "val")
        atomic_write_json(path.with_name(CONTEXT_FILE), {s: self.attributes(s) for s in splits}, indent=None)
        return path

    def save_grid(self, path: str | os.PathLike, n_per_class: int = 8) -> Path:
        """A PNG of (unaugmented) training images, one row per class, for a person to look at."""
        if n_per_class <= 0:
            raise ValueError(f"n_per_class must be positive, got {n_per_class}.")
        source, labels, train = self._composed_pool(), self.pool[1], self.split.train
        s = self.image_size
        tiles = torch.zeros(self.num_classes * n_per_class, 3, s, s, dtype=torch.uint8)
        for c in range(self.num_classes):
            for j, position in enumerate(train[labels[train] == c][:n_per_class]):
                tiles[c * n_per_class + j] = source.load(int(position))
        grid = make_grid(tiles, nrow=n_per_class, padding=2)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        return path
