"""A user's own images in ``ImageFolder`` layout: one sub-folder per class.

Folders may be ids (ImageNet's WordNet ids ``n01440764``) named by a class map (``class_names_file``,
``configs/lbgen/imagenet_class_map.txt``), so prompts, tables and a synthetic set's ``run.json`` use the human names.
``imagefolder_from_labels`` lays a flat folder of images plus a labels file (ImageNet's validation set) out as an
ImageFolder (``lbgen imagefolder-from-labels``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lbgen.datamodules.base import ImageClassificationDataModule
from lbgen.datamodules.class_names import check_same_classes, names_for_folders, read_class_file
from lbgen.datamodules.order import world
from lbgen.datamodules.transforms import Fit, fit_to_size
from lbgen.storage.files import atomic_write_json, read_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHECK_RECORD_VERSION = 1
LinkMode = Literal["hard", "symlink", "copy"]


class BadImageError(ValueError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


def read_image(path: Path) -> Image.Image:
    """Decode an image fully as RGB, raising ``BadImageError`` naming the file on any failure."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not later in a worker
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadImageError(f"Cannot read image {path} ({type(err).__name__}: {err}): the file is truncated or not an "
                            "image. Replace or delete it, or set `skip_bad_images: true` on the DataModule to drop "
                            "unreadable images with a warning.") from err


def scan_class_folders(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class folders (sorted sub-folder names, torchvision's ``ImageFolder`` order), image paths and labels.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folder, or a class folder without images.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist (expected one sub-folder per class).")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>.")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if not files:
            empty.append(str(root / name))
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f"Class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}. "
                         "Add images or remove the folder.")
    return classes, paths, np.asarray(labels, dtype=np.int64)


class FileImageSource:
    """Images read from files on demand, brought to an ``image_size`` square by ``fit`` (shorter side resized and
    centre-cropped, or letterboxed), or as stored (``image_size`` None: ``stored()``, what the DataModule's transforms
    read).

    With ``skip_bad_images`` (and no check at set-up), an unreadable file is replaced by the next readable image of
    the same class among ``substitutes`` (the positions its dataset reads: a k-shot split never gains an image), with
    a warning naming it and counting the files skipped so far in this process.
    """

    def __init__(self, root: Path, paths: list[Path], image_size: int | None, labels: np.ndarray | None = None,
                 skip_bad_images: bool = False, substitutes: np.ndarray | None = None, fit: Fit = "crop") -> None:
        self.root, self.paths, self.image_size, self.fit = root, paths, image_size, fit
        self.labels, self.skip_bad_images = labels, skip_bad_images
        self.substitutes = np.arange(len(paths)) if substitutes is None else np.sort(np.asarray(substitutes))
        self.resize = fit_to_size(image_size, fit) if image_size is not None else []
        self.skipped: set[int] = set()

    def _like(self, image_size: int | None, substitutes: np.ndarray | None) -> FileImageSource:
        return FileImageSource(self.root, self.paths, image_size, self.labels, self.skip_bad_images, substitutes,
                               self.fit)

    def within(self, positions: np.ndarray) -> FileImageSource:
        """The same images, substituting a bad file only among ``positions``."""
        return self._like(self.image_size, positions)

    def stored(self) -> FileImageSource:
        """The same images as stored (``[3, H, W]``): the DataModule's transforms bring them to ``image_size``."""
        return self._like(None, self.substitutes)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, position: int) -> torch.Tensor:
        image = TF.pil_to_tensor(self._read(position))
        for op in self.resize:
            image = op(image)
        return image

    def _read(self, position: int) -> Image.Image:
        try:
            return read_image(self.paths[position])
        except BadImageError as err:
            if not self.skip_bad_images or self.labels is None:
                raise
            self.skipped.add(position)
            first_error = err
        same = self.substitutes[self.labels[self.substitutes] == self.labels[position]]
        start = int(np.searchsorted(same, position, side="right"))
        for candidate in np.roll(same, -start):  # the next ones after it, cyclically: the same choice every time
            if int(candidate) in self.skipped:
                continue
            try:
                image = read_image(self.paths[int(candidate)])
            except BadImageError:
                self.skipped.add(int(candidate))
                continue
            warnings.warn(f"Skipped unreadable image {self.paths[position]} ({first_error.__cause__}); read "
                          f"{self.paths[int(candidate)]} of the same class in its place ({len(self.skipped)} "
                          "skipped in this process; `check_images: true` drops them at set-up instead).",
                          stacklevel=2)
            return image
        raise BadImageError(f"No readable image left in class folder {self.paths[position].parent} (the last tried: "
                            f"{self.paths[position]}): add readable images or remove the folder.") from first_error

    def sample_id(self, position: int) -> str:
        return self.paths[position].relative_to(self.root).as_posix()


def _check_chunk(paths: list[Path]) -> list[tuple[int, str]]:
    """(offset, message) of every unreadable image among ``paths``."""
    bad = []
    for i, path in enumerate(paths):
        try:
            read_image(path)
        except BadImageError as err:
            bad.append((i, str(err)))
    return bad


def find_bad_images(paths: list[Path], workers: int | None = None, chunk: int = 256) -> list[tuple[int, str]]:
    """Decode every image once, ``workers`` threads at a time (PIL decodes without the GIL); (position, message)
    of each unreadable one."""
    workers = workers or min(32, os.cpu_count() or 1)
    starts = range(0, len(paths), chunk)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(_check_chunk, (paths[s:s + chunk] for s in starts))
        return [(start + i, message) for start, bad in zip(starts, found, strict=True) for i, message in bad]


def folder_fingerprint(root: Path, paths: list[Path]) -> str:
    """A digest of every image's relative path, size and modification time: a cached check of another state of the
    folder is not trusted."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def checked_bad_images(root: Path, paths: list[Path], workers: int | None = None,
                       cache_dir: str | Path | None = None) -> list[tuple[int, str]]:
    """``find_bad_images`` of a folder, read from / written to ``cache_dir`` (never into the data folder) when given,
    keyed by the folder's path and checked against its fingerprint."""
    record_path = fingerprint = None
    if cache_dir is not None:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        record_path = Path(cache_dir).expanduser() / f"image_check_{key}.json"
        fingerprint = folder_fingerprint(root, paths)
        if record_path.is_file():
            record = read_json(record_path, "delete it: the images are checked again.")
            if (isinstance(record, dict) and record.get("version") == CHECK_RECORD_VERSION
                    and record.get("fingerprint") == fingerprint):
                index = {p.relative_to(root).as_posix(): i for i, p in enumerate(paths)}
                return [(index[b["path"]], b["error"]) for b in record["bad"]]
    rank_zero_info(f"Checking that the {len(paths)} images under {root} decode (once; `check_images: false` skips it, "
                   "`check_cache_dir` remembers it for the next run).")
    bad = find_bad_images(paths, workers)
    if record_path is not None:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path, {
            "version": CHECK_RECORD_VERSION, "root": str(root.resolve()), "fingerprint": fingerprint,
            "images": len(paths), "bad": [{"path": paths[i].relative_to(root).as_posix(), "error": m}
                                          for i, m in bad]})
    return bad


def bad_images_on_rank_zero(root: Path, paths: list[Path], workers: int | None = None,
                            cache_dir: str | Path | None = None) -> list[tuple[int, str]]:
    """``checked_bad_images`` computed by global rank 0 only and sent to every other process, so a million images
    are decoded once, not once per process. Every process must call it (a collective under a process group)."""
    processes, rank = world()
    if processes == 1:
        return checked_bad_images(root, paths, workers, cache_dir)
    result: list = [None]
    if rank == 0:
        try:
            result = [("ok", checked_bad_images(root, paths, workers, cache_dir))]
        except Exception as err:  # sent on, so that no process waits for a result that never comes
            result = [("error", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise RuntimeError(f"Checking the images under {root} failed on rank 0: {value}")
    return value


class ImageFolderDataModule(ImageClassificationDataModule):
    """Your own labelled images: ``train_dir/<class>/*.png`` (and optionally ``test_dir/<class>/...``).

    Args:
        train_dir: the training pool; its sub-folders are the classes, in sorted order (torchvision's ImageFolder).
        test_dir: the test set with the same class folders (needed for ``lbgen test``), e.g. ImageNet's validation
            set laid out by ``lbgen imagefolder-from-labels``.
        class_names_file: a class map from folder to human name: JSON ``{folder: name}``, ``folder<TAB>name`` lines
            or ``folder name`` lines (ImageNet's ``LOC_synset_mapping.txt``; ``configs/lbgen/imagenet_class_map.txt``).
            The class names become the map's names (in prompts, tables, ``run.json``), the folders stay the keys; the
            map must name every folder, no other, and no name twice. Default: the folder names are the names.
        first_name_only: keep a mapped name's part before its first comma (``tench, Tinca tinca`` -> ``tench``).
        check_images: decode every image once at set-up (on global rank 0, ``check_workers`` threads; the other
            processes receive the result), so a bad file fails before the first step with its name. False: a bad
            file fails when first read, with its name.
        skip_bad_images: drop unreadable images with a warning counting them (``check_images``), or, without the
            check, read the next readable image of the same class in a bad one's place, with a warning naming it.
        check_workers: threads decoding images for the check (default: the CPU count, at most 32).
        check_cache_dir: a folder (not the data folder: lbgen never writes there) remembering each image folder's
            check, trusted while no file's path, size or modification time changed.
        **kwargs: split, augmentation, resolution (``train_resolution``, ``fit``, ``crop_scale``, ``crop_pct``) and
            loader options of ``ImageClassificationDataModule``.
    """

    reads_stored_images: ClassVar[bool] = True
    """Files: the training crop can read each image as stored (``train_resolution: source``)."""

    def __init__(self, train_dir: str, test_dir: str | None = None, check_images: bool = True,
                 skip_bad_images: bool = False, class_names_file: str | None = None, first_name_only: bool = False,
                 check_workers: int | None = None, check_cache_dir: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if check_workers is not None and check_workers < 1:
            raise ValueError(f"check_workers must be at least 1 (threads decoding images), got {check_workers}.")
        self.train_dir = Path(train_dir)
        self.test_dir = Path(test_dir) if test_dir else None
        self.check_images, self.skip_bad_images = check_images, skip_bad_images
        self.check_workers, self.check_cache_dir = check_workers, check_cache_dir
        self.class_names_file = class_names_file
        self._folders, self._train_paths, self._train_labels = scan_class_folders(self.train_dir)
        self._classes = list(self._folders)
        if class_names_file is not None:
            mapping = read_class_file(class_names_file, first_name_only=first_name_only, need_map=True)
            self._classes = names_for_folders(mapping, self._folders,
                                              f"class_names_file {class_names_file} for train_dir {self.train_dir}")

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def class_folders(self) -> list[str]:
        """The class sub-folder names, index = label (the class map's keys; the class names without a map)."""
        return list(self._folders)

    @property
    def dataset_name(self) -> str:
        return f"image-folder:{self.train_dir}"

    def _source(self, root: Path, paths: list[Path], labels: np.ndarray) -> tuple[FileImageSource, np.ndarray]:
        if self.check_images:
            bad = bad_images_on_rank_zero(root, paths, self.check_workers, self.check_cache_dir)
            if bad and not self.skip_bad_images:
                raise BadImageError(bad[0][1] + (f" ({len(bad)} unreadable images in {root} in all.)"
                                                 if len(bad) > 1 else ""))
            if bad:
                warnings.warn(f"Skipped {len(bad)} unreadable image(s) under {root}, e.g. {paths[bad[0][0]]}.",
                              stacklevel=2)
                keep = np.setdiff1d(np.arange(len(paths)), [i for i, _ in bad])
                paths, labels = [paths[i] for i in keep], labels[keep]
            left = np.bincount(labels, minlength=len(self._folders))
            empty = [str(root / name) for name, n in zip(self._folders, left, strict=True) if n == 0]
            if empty:  # every image of a class was unreadable: training without the class would be silently wrong
                raise ValueError(f"No readable image left in class folder(s) {', '.join(empty)} after skipping "
                                 "unreadable files; add readable images or remove the folder.")
        return FileImageSource(root, paths, self.image_size, labels, self.skip_bad_images, fit=self.fit), labels

    def load_pool(self) -> tuple[FileImageSource, np.ndarray]:
        return self._source(self.train_dir, self._train_paths, self._train_labels)

    def load_test(self) -> tuple[FileImageSource, np.ndarray]:
        if self.test_dir is None:
            raise ValueError("No test set: pass `--data.init_args.test_dir FOLDER` (same class sub-folders as "
                             f"{self.train_dir}).")
        folders, paths, labels = scan_class_folders(self.test_dir)
        check_same_classes(self._folders, folders, f"train_dir {self.train_dir}", f"test_dir {self.test_dir}",
                           "they must match: the test folder needs exactly the training class folders (a class map "
                           "applies to both; lay ImageNet's validation set out with `lbgen imagefolder-from-labels`).")
        return self._source(self.test_dir, paths, labels)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.skip_bad_images and not self.check_images:
            # a bad file is replaced within its own dataset's positions: a split never gains an image from outside
            for dataset in (self.train_dataset, self.val_dataset, self.test_dataset, self.predict_dataset):
                if dataset is not None and isinstance(dataset.images, FileImageSource):
                    dataset.images = dataset.images.within(dataset.positions)


# --- a flat folder + a labels file -> ImageFolder layout ------------------------------------------------------------
def read_labels_file(path: Path) -> list[tuple[str, str, int]]:
    """(file name or stem, label, line number) of every line of a labels file.

    Formats: ImageNet's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, header optional: the label is the
    PredictionString's first word, the synset), any ``file,label`` CSV, or whitespace-separated ``file label`` lines.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Labels file {path} does not exist; give LOC_val_solution.csv (ImageId,"
                                "PredictionString) or a text file of 'file label' lines.")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    rows = []
    if any("," in line for line in lines[:2]):
        for number, row in enumerate(csv.reader(lines), 1):
            if not row or not "".join(row).strip():
                continue
            if number == 1 and [c.strip() for c in row[:2]] == ["ImageId", "PredictionString"]:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].split():
                raise ValueError(f"{path}:{number}: expected 'file,label' (LOC_val_solution.csv: 'ImageId,"
                                 f"PredictionString'), got {','.join(row)!r}.")
            rows.append((row[0].strip(), row[1].split()[0], number))
    else:
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2:
                raise ValueError(f"{path}:{number}: expected 'file label', got {line!r}.")
            rows.append((parts[0], parts[1], number))
    if not rows:
        raise ValueError(f"Labels file {path} has no labels.")
    return rows


def _safe_name(name: str, what: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{where}: {what} {name!r} is not a plain file or folder name; labels name a file of the "
                         "flat folder and a class folder, without paths.")
    return name


def _place(source: Path, target: Path, mode: LinkMode) -> str:
    """Put ``source`` at ``target`` as a hard link, symlink or copy; returns what was made (a hard link falls back to
    a copy across file systems). A copy goes through a hidden temporary name: a killed run leaves no half image."""
    if mode == "hard":
        try:
            os.link(source, target)
            return "linked"
        except OSError:  # another file system, or one without hard links
            mode = "copy"
    if mode == "symlink":
        target.symlink_to(source.resolve())
        return "symlinked"
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.replace(target)
    return "copied"


def imagefolder_from_labels(flat_dir: str | Path, labels_file: str | Path, out_dir: str | Path,
                            mode: LinkMode = "hard") -> dict[str, int]:
    """Lay out a flat folder of images (ImageNet's 50,000 validation JPEGs) as ``out_dir/<label>/<file>``.

    Every label is checked before anything is made: a label for a file that is not in ``flat_dir`` (by name, or by
    stem as LOC_val_solution.csv's ImageIds) is refused, naming it. Resumable: files already in place are skipped.
    Nothing is written into ``flat_dir``.

    Args:
        flat_dir: the folder of images.
        labels_file: ``read_labels_file``'s formats.
        out_dir: the ImageFolder to make (``test_dir`` of ``ImageFolderDataModule``).
        mode: ``hard`` links (no space; a copy where linking fails), ``symlink`` or ``copy``.

    Returns:
        Counts: ``linked``, ``symlinked``, ``copied``, ``already there``, ``unlabelled`` (files of ``flat_dir`` no label
        names, left out), ``classes``.
    """
    if mode not in ("hard", "symlink", "copy"):
        raise ValueError(f"mode must be 'hard', 'symlink' or 'copy', got {mode!r}.")
    flat, labels_path, out = Path(flat_dir), Path(labels_file), Path(out_dir)
    if not flat.is_dir():
        raise FileNotFoundError(f"Flat image folder {flat} does not exist.")
    if out.resolve() == flat.resolve() or flat.resolve() in out.resolve().parents:
        raise ValueError(f"out_dir {out} is inside flat_dir {flat}: lbgen does not write into the data folder; "
                         "choose another out_dir.")
    files = {p.name: p for p in flat.iterdir() if p.is_file() and not p.name.startswith(".")}
    by_stem: dict[str, list[Path]] = {}
    for path in files.values():
        by_stem.setdefault(path.stem, []).append(path)
    plan: dict[str, tuple[Path, str]] = {}
    missing, ambiguous, conflicting = [], [], []
    for name, label, number in read_labels_file(labels_path):
        where = f"{labels_path}:{number}"
        _safe_name(name, "file", where)
        _safe_name(label, "label", where)
        source = files.get(name)
        if source is None:
            stems = by_stem.get(name, [])
            if len(stems) > 1:
                ambiguous.append(f"{name} ({', '.join(p.name for p in stems)})")
                continue
            source = stems[0] if stems else None
        if source is None:
            missing.append(f"{name} (line {number})")
            continue
        if source.name in plan and plan[source.name][1] != label:
            conflicting.append(f"{source.name} ({plan[source.name][1]} and {label})")
        plan[source.name] = (source, label)
    if missing:
        raise ValueError(f"{labels_path} labels {len(missing)} file(s) not in {flat}: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}. Point FLAT_DIR at the folder holding these images "
                         "(or use the labels file of this folder).")
    if ambiguous or conflicting:
        raise ValueError(f"{labels_path}: " + "; ".join(
            ([f"ids matching several files: {', '.join(ambiguous[:10])}"] if ambiguous else [])
            + ([f"files labelled twice with different labels: {', '.join(conflicting[:10])}"] if conflicting else []))
            + ". Give each file one label, by its full file name.")
    counts = {"linked": 0, "symlinked": 0, "copied": 0, "already there": 0}
    for name, (source, label) in sorted(plan.items()):
        target = out / label / name
        if os.path.lexists(target):  # lexists: a symlink made by an earlier run counts even if its source moved
            counts["already there"] += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        counts[_place(source, target, mode)] += 1
    counts["unlabelled"] = len(files) - len(plan)
    counts["classes"] = len({label for _, label in plan.values()})
    return counts
