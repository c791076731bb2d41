"""Real images as shards: an ``ImageFolder`` (e.g. ImageNet's train folder) in the sharded-dataset format.

``lbgen shard-folder IMAGE_DIR OUT_DIR`` writes every image file of ``IMAGE_DIR/<class>/...`` into
``OUT_DIR/shards/shard-real-<n>.tar`` as it is (no re-encoding: the member is ``<id>.<ext>`` with the extension of
the file's actual format), with a record per image (``id``, ``class_index``, ``class_name``, ``path`` relative to
``IMAGE_DIR``, ``image_format``, ``source: real``), an index per shard, ``run.json`` (``kind: real``) and the
manifest: ``read_manifest``, ``load_images``, ``export_image_folder`` and the streaming reader read it as they read
a generated set.

The plan is a function of the folder's sorted file list only: classes are the sorted sub-folders, each class's
files sorted by path, and the classes interleaved evenly (file ``j`` of a class of ``n`` files at ``(j + 0.5) /
n`` of the sequence), so that every shard holds every class in proportion, as shard-level shuffling needs; the
sequence is cut into shards of ``shard_size`` files (or fewer, under ``shard_max_mb``). Shard names are fixed
(``shard-real-00000.tar``, ...), so a killed run resumes by writing only the shards without an index, and
``processes`` workers write disjoint shards (shard ``k`` by worker ``k mod processes``): any number of processes,
in any number of runs, gives the same files.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lbgen.storage.dataset_format import (
    RUN_FILE,
    SHARD_DIR,
    index_path,
    read_index,
    remove_partial_shards,
    sample_tar_bytes,
    shard_byte_limit,
    shard_name,
    write_manifest,
    write_run,
    write_shard,
)
from lbgen.storage.files import read_json

REAL_TAG = "real"
"""The tag of a real set's shard names: ``shard-real-<n>.tar``."""
PIL_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
               "TIFF": "tiff"}
"""The file formats PIL detects that a real set stores (``MPO``: a camera's multi-picture JPEG), as a record's
``image_format``."""
SUFFIX_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif",
                  ".tif": "tiff", ".tiff": "tiff"}
"""A file's format as its suffix suggests: used only to estimate record sizes when planning shards."""
MOVABLE_KEYS = ("source_dir",)
"""Settings a resume may change: the folder may move, its files (``files_sha256``) may not."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class FolderFile:
    """One image file of the folder, as planned.

    Attributes:
        path: relative to the image folder, POSIX separators.
        class_index: its class (the sorted sub-folder's index).
        size: its bytes when scanned.
        id: its record id (a plain file name, unique in the set).
    """

    path: str
    class_index: int
    size: int
    id: str


def file_ids(paths: list[str]) -> list[str]:
    """File-safe, unique ids for relative paths: the path without its extension, ``/`` as ``__``, other characters
    outside ``[A-Za-z0-9_.-]`` and runs of dots as ``_``; paths that clean alike get ``-<8 hex of the path's
    sha256>`` each (so an id depends on the file list only)."""
    cleaned = []
    for path in paths:
        stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
        name = re.sub(r"\.{2,}", "_", _UNSAFE.sub("_", stem.replace("/", "__")))
        cleaned.append(name if re.match(r"[A-Za-z0-9_]", name) else f"_{name}")
    counts: dict[str, int] = {}
    for name in cleaned:
        counts[name] = counts.get(name, 0) + 1
    ids = [f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}" if counts[name] > 1 else name
           for name, path in zip(cleaned, paths, strict=True)]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise ValueError(f"File names give the same record id {twice} even with a hash suffix; rename those files.")
    return ids


def scan_image_folder(image_dir: Path) -> tuple[list[str], list[FolderFile]]:
    """The class names and the files of an ``ImageFolder`` in shard order (see the module docstring).

    Raises:
        FileNotFoundError: ``image_dir`` does not exist.
        ValueError: it is not an ``ImageFolder`` (no class sub-folders, or one without images).
    """
    # imported here: the shard-writing workers need none of lbgen.datamodules
    from lbgen.datamodules.image_folder import scan_class_folders

    class_names, paths, labels = scan_class_folders(image_dir)
    relative = [p.relative_to(image_dir).as_posix() for p in paths]
    ids = file_ids(relative)
    per_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels.tolist()):
        per_class.setdefault(label, []).append(position)
    keyed = []
    for label, positions in per_class.items():
        n = len(positions)
        keyed += [((2 * j + 1) / (2 * n), label, position) for j, position in enumerate(positions)]
    order = [position for _, _, position in sorted(keyed)]
    files = [FolderFile(relative[i], int(labels[i]), paths[i].stat().st_size, ids[i]) for i in order]
    return class_names, files


def _record(file: FolderFile, class_names: list[str], image_format: str) -> dict[str, Any]:
    return {"id": file.id, "class_index": file.class_index, "class_name": class_names[file.class_index],
            "path": file.path, "image_format": image_format, "source": "real"}


def plan_shards(files: list[FolderFile], class_names: list[str], shard_size: int,
                max_bytes: int | None = None) -> list[list[FolderFile]]:
    """Cut the files, in order, into shards of ``shard_size`` files, each closed early before it would pass
    ``max_bytes`` (estimated from the scanned sizes: a shard's bytes depend on the file list only)."""
    shards: list[list[FolderFile]] = [[]]
    size = 0
    for file in files:
        record = _record(file, class_names, SUFFIX_FORMATS.get(Path(file.path).suffix.lower(), "jpeg"))
        added = sample_tar_bytes(file.size, record)
        if shards[-1] and (len(shards[-1]) >= shard_size or (max_bytes is not None and size + added > max_bytes)):
            shards.append([])
            size = 0
        shards[-1].append(file)
        size += added
    return shards if shards[-1] else []


def describe_folder(image_dir: Path, class_names: list[str], files: list[FolderFile], shard_size: int,
                    shard_max_mb: float | None) -> dict[str, Any]:
    """``run.json`` of a real set: what it was made from (the file list's digest pins every path, class and size)
    and how it is cut."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.class_index}\t{file.path}\t{file.size}\n".encode())
    run = {"kind": "real", "source_dir": str(image_dir.resolve()), "class_names": class_names,
           "num_images": len(files), "files_sha256": digest.hexdigest(), "order": "interleaved",
           "shard_size": shard_size}
    if shard_max_mb is not None:
        run["shard_max_mb"] = shard_max_mb
    return run


def _samples(image_dir: Path, files: list[FolderFile], class_names: list[str]) -> Iterator[tuple[bytes, dict]]:
    for file in files:
        data = (image_dir / file.path).read_bytes()
        if len(data) != file.size:
            raise ValueError(f"{image_dir / file.path} changed since the folder was scanned ({file.size} bytes, now "
                             f"{len(data)}): leave the folder unchanged while it is sharded, then rerun.")
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only: the bytes are stored as they are
                detected = image.format
        except Exception as err:  # PIL raises many types for a non-image
            raise ValueError(f"{image_dir / file.path} is not a readable image ({type(err).__name__}: {err}): "
                             "replace or delete it, then rerun the same command (finished shards are kept).") from err
        if detected not in PIL_FORMATS:
            raise ValueError(f"{image_dir / file.path} is a {detected} image; real shards store "
                             f"{sorted(set(PIL_FORMATS.values()))}: convert it, then rerun the same command.")
        yield data, _record(file, class_names, PIL_FORMATS[detected])


def write_real_shards(image_dir: Path, out_dir: Path, class_names: list[str],
                      shards: list[tuple[str, list[FolderFile]]], parent: int | None = None) -> int:
    """Write the given shards (name, files) of a real set, each crash-safe (``write_shard``); returns how many.

    One worker's part of ``shard_image_folder``: a file at a time is in memory. With ``parent`` (the process id of
    the run), it stops before the next shard once that process is gone: a killed run leaves no worker that could
    race a rerun writing the same shard names.
    """
    for number, (name, files) in enumerate(shards):
        if parent is not None and os.getppid() != parent:
            return number
        write_shard(out_dir / SHARD_DIR / name, _samples(image_dir, files, class_names))
    return len(shards)


def _check_output(out_dir: Path, run: dict[str, Any]) -> None:
    """Refuse an output folder that holds something other than this real set (a generated set, another folder's
    shards, files that are not lbgen's): nothing is written into it."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; give a new or empty folder (or this set's folder, to "
                                 "resume) as OUT_DIR.")
    if not (out_dir / RUN_FILE).is_file():
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} is not empty and holds no {RUN_FILE}: it is not an lbgen dataset; "
                                  "nothing was written. Give a new or empty folder as OUT_DIR.")
        return
    previous = read_json(out_dir / RUN_FILE, "give a new OUT_DIR (this one is damaged).")
    if not isinstance(previous, dict) or previous.get("kind") != "real":
        raise FileExistsError(f"{out_dir} holds a generated dataset ({RUN_FILE} has no kind: real); nothing was "
                              "written. Give a new folder as OUT_DIR.")
    changed = sorted(k for k in set(previous) | set(run) if k not in MOVABLE_KEYS and previous.get(k) != run.get(k))
    if changed:
        raise FileExistsError(f"{out_dir} holds a real set made with other settings or from other files (differs "
                              f"in {changed}; it was made from {previous.get('source_dir')}); nothing was written. "
                              "Give a new OUT_DIR, or the original folder and options to resume.")


def shard_image_folder(image_dir: str | Path, out_dir: str | Path, shard_size: int = 1000,
                       shard_max_mb: float | None = None, processes: int = 1) -> dict[str, int]:
    """Write an ``ImageFolder`` as a real set in the sharded-dataset format; rerunning resumes a killed run.

    Args:
        image_dir: ``<class>/<image files>`` (sub-folders of a class are searched too).
        out_dir: a new or empty folder, or this set's folder to resume (shards with an index are kept).
        shard_size: files per shard, at most.
        shard_max_mb: also close a shard before its files would pass this many MB (10^6 bytes).
        processes: worker processes, each writing every ``processes``-th shard.

    Returns:
        ``images``, ``shards`` (in the set), ``written`` (by this run) and ``kept`` (complete before it).

    Raises:
        FileNotFoundError / ValueError: ``image_dir`` is not an ``ImageFolder`` or holds a file that is not an image.
        FileExistsError: ``out_dir`` holds something else (nothing is written then).
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    for name, value in (("shard_size", shard_size), ("processes", processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    max_bytes = shard_byte_limit(shard_max_mb)
    class_names, files = scan_image_folder(image_dir)
    run = describe_folder(image_dir, class_names, files, shard_size, shard_max_mb)
    _check_output(out_dir, run)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if not (out_dir / RUN_FILE).is_file():
        write_run(out_dir, run)
    remove_partial_shards(out_dir)  # before any worker starts: what a killed run left half-written
    plan = [(shard_name(REAL_TAG, k), shard) for k, shard in enumerate(plan_shards(files, class_names, shard_size,
                                                                                     max_bytes))]
    todo = [(k, name, shard) for k, (name, shard) in enumerate(plan)
            if not index_path(out_dir / SHARD_DIR / name).is_file()]
    parts = [[(name, shard) for k, name, shard in todo if k % processes == p] for p in range(processes)]
    parts = [part for part in parts if part]
    if len(parts) <= 1:
        written = sum(write_real_shards(image_dir, out_dir, class_names, part) for part in parts)
    else:
        # spawned, not forked: the parent may hold torch's threads, which a fork does not survive
        with ProcessPoolExecutor(len(parts), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(write_real_shards, image_dir, out_dir, class_names, part, os.getpid())
                    for part in parts]
            try:
                written = sum(job.result() for job in jobs)
            except ValueError as err:  # a worker's message about a file, raised here to read as lbgen's own
                raise ValueError(str(err)) from err
    records = sorted((r for name, _ in plan for r in read_index(out_dir / SHARD_DIR / name)),
                     key=lambda r: r["id"])
    expected = {file.id for file in files}
    if len(records) != len(files) or {r["id"] for r in records} != expected:
        raise RuntimeError(f"The shards of {out_dir} hold {len(records)} records, the plan {len(files)} files: "
                           "a shard was replaced by another run's; remove the folder and shard again.")
    write_manifest(out_dir, records)
    return {"images": len(files), "shards": len(plan), "written": written, "kept": len(plan) - len(todo)}
