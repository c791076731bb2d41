"""The synthetic-dataset format: one generation run's folder, written by ``SyntheticDatasetWriter``, read by the rest.

A dataset folder holds ``run.json`` (the run's settings), ``shards/shard-<tag>-<n>.tar`` (WebDataset shards: one
sample per image, members ``<id>.json`` and ``<id>.png``), one ``.jsonl`` index beside each shard (its records,
renamed into place after the shard: a shard without one is partial), and ``manifest.jsonl`` (every record, sorted
by id, written when the run ends). Shards are standard WebDataset tars written with ``webdataset.TarWriter``
(fixed mtime, owner and mode, members in sorted order: the same samples give the same bytes) and read back one
sequential pass at a time (``read_shard``), so ``wds.WebDataset`` pipelines read them too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.writer import TarWriter

from lbgen.storage.files import atomic_write, atomic_write_json, read_json

RUN_FILE, MANIFEST_FILE, SHARD_DIR = "run.json", "manifest.jsonl", "shards"
SHARD_SUFFIX, INDEX_SUFFIX, PARTIAL_SUFFIX = ".tar", ".jsonl", ".tmp"
INTERNAL_KEYS = ("source_position",)
"""Request fields the generator needs but a record does not keep."""
REQUIRED_KEYS = ("id", "class_index", "shard", "seed", "prompt", "method")
"""What every manifest record has."""

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""What a record's ``id`` and ``shard`` must look like: they become file names, so no separators, no ``..``."""
_MEMBER = re.compile(r"(.+)\.([^./]+)")
"""A shard member ``<id>.<ext>``, split at the last dot (webdataset's default splits at the first: an id may hold
dots)."""


# --- shard naming, indexes, run.json and the manifest ----------------------------------------------------------------
def new_shard_tag(rank: int) -> str:
    """A fresh tag for one process's shards: random (a rerun never reuses a name) plus the global rank."""
    return f"{uuid.uuid4().hex[:8]}-r{rank:03d}"


def shard_name(tag: str, number: int) -> str:
    """The file name of a process's ``number``-th shard: ``shard-<tag>-<number:05d>.tar``."""
    return f"shard-{tag}-{number:05d}{SHARD_SUFFIX}"


def index_path(shard: Path) -> Path:
    """The index (``.jsonl``) beside a shard."""
    return shard.with_suffix(INDEX_SUFFIX)


def complete_shards(folder: Path) -> list[Path]:
    """Shards whose index file exists: the index is renamed into place last, so these are whole."""
    return sorted(p for p in (folder / SHARD_DIR).glob(f"*{SHARD_SUFFIX}") if index_path(p).is_file())


def read_index(shard: Path) -> list[dict[str, Any]]:
    """The records of a complete shard, from its index."""
    return [json.loads(line) for line in index_path(shard).read_text().splitlines() if line]


def remove_partial_shards(folder: Path) -> None:
    """Delete what a crashed run left half-written: temporary files, and shards without an index."""
    shards = folder / SHARD_DIR
    for partial in shards.glob(f"*{PARTIAL_SUFFIX}"):
        partial.unlink()
    for orphan in shards.glob(f"*{SHARD_SUFFIX}"):
        if not index_path(orphan).is_file():
            orphan.unlink()  # crashed between the two renames: redo it


def write_run(folder: Path, run: dict[str, Any]) -> None:
    """Write ``run.json``, the run's settings (a resume must match them)."""
    atomic_write_json(folder / RUN_FILE, run, indent=1)


def write_manifest(folder: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``manifest.jsonl``: one JSON record per line, keys sorted, in the given order."""
    atomic_write(folder / MANIFEST_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


# --- shards -----------------------------------------------------------------------------------------------------------
def png_bytes(image_chw: torch.Tensor) -> bytes:
    """Encode a uint8 ``[3, H, W]`` tensor as PNG (deterministic bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, shard: Path, image_id: str, image_size: int) -> torch.Tensor:
    """One shard image as a uint8 ``[3, S, S]`` tensor (bicubic resize when generated at another size)."""
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except OSError as err:
        raise ValueError(f"{image_id}.png in {shard} cannot be decoded ({err}); regenerate the dataset.") from err
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def write_shard(path: Path, samples: Sequence[tuple[bytes, dict[str, Any]]]) -> None:
    """Write ``(png, record)`` samples as the shard ``path``, then its index: crash-safe, byte for byte reproducible.

    The tar goes to ``<path>.tmp``, is synced and renamed into place, then the index (the records, each with
    ``shard``) is written atomically: a shard is complete once its index exists. Members are ``<id>.json`` (the
    record, keys sorted) and ``<id>.png``, with mtime 0, no owner and mode 644.
    """
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "wb") as f:
        with TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False) as tar:
            for png, record in samples:
                tar.write({"__key__": record["id"], "png": png,
                           "json": json.dumps(record, sort_keys=True).encode()})
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    index = "".join(json.dumps({**r, "shard": path.name}, sort_keys=True) + "\n" for _, r in samples)
    atomic_write(index_path(path), index.encode())


def _split_member(name: str) -> tuple[str | None, str | None]:
    match = _MEMBER.fullmatch(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def read_shard(shard: str | Path) -> Iterator[dict[str, Any]]:
    """Stream a shard's samples in order, in one sequential pass, as webdataset samples.

    Each is ``{"__key__": id, "__url__": shard, "png": bytes, "json": bytes}`` (the members it has), what
    ``wds.WebDataset`` yields before decoding; usable as a stage of a webdataset pipeline over shard paths.
    """
    with open(shard, "rb") as stream:
        members = ({**member, "__url__": str(shard)} for member in tar_file_iterator(stream))
        yield from group_by_keys(members, keys=_split_member)


def _no_image(shard: Path, member: str) -> ValueError:
    return ValueError(f"{shard} has no image {member} although the manifest lists it there: the manifest is from "
                      "another run or the shard was replaced; regenerate the dataset.")


# --- records and the manifest -----------------------------------------------------------------------------------------
def request_seed(base_seed: int, class_index: int, index: int) -> int:
    """A 31-bit seed that depends on (base seed, class, index) only."""
    return int(np.random.SeedSequence([base_seed, class_index, index]).generate_state(1)[0] >> 1)


def request_id(class_index: int, index: int) -> str:
    """File-safe id of a request (class names are never used in paths: "T-shirt/top" is a real one)."""
    return f"c{class_index:04d}-i{index:06d}"


def _check_record(record: Any, where: str, run: dict[str, Any], shards: Path, existing: set[str]) -> None:
    """Refuse a record of the wrong shape, with unsafe file names, or from a run other than ``run.json``'s."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record; regenerate the dataset.")
    required = set(REQUIRED_KEYS)
    if not required <= set(record):
        raise ValueError(f"{where} (id {record.get('id')!r}) lacks {sorted(required - set(record))}; the manifest "
                         "was not written by lbgen's generation stage: regenerate the dataset.")
    for key in ("id", "shard"):
        value = record[key]
        if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or ".." in value:
            raise ValueError(f"{where}: {key} {value!r} is not a plain file name (it is used as one inside the "
                             "dataset folder); the manifest is damaged or not lbgen's: regenerate the dataset.")
    c = record["class_index"]
    if not isinstance(c, int) or isinstance(c, bool) or c < 0:
        raise ValueError(f"{where}: class_index {c!r} is not a non-negative integer; regenerate the dataset.")
    if record["shard"] not in existing:
        raise ValueError(f"{where}: its shard {shards / record['shard']} is missing: the manifest is from another "
                         "run, or the shards were not copied. Keep the whole dataset folder (run.json, manifest.jsonl "
                         "and shards/) together, or rerun the same `lbgen predict` command to finish the run.")
    requests = run.get("requests") if isinstance(run.get("requests"), dict) else {}
    names = requests.get("class_names")
    differences = [key for key, value in run.items() if key != "requests" and key in record and record[key] != value]
    if isinstance(names, list):
        if c >= len(names):
            differences.append(f"class_index {c} (run.json has {len(names)} classes)")
        elif "class_name" in record and record["class_name"] != names[c]:
            differences.append(f"class_name {record['class_name']!r} (run.json: {names[c]!r})")
    differences += [key for key in ("method", "strength") if key in requests and record.get(key) != requests[key]]
    derivable = "base_seed" in requests and isinstance(record.get("index"), int) and c < len(names or [])
    if derivable and record["seed"] != request_seed(requests["base_seed"], c, record["index"]):
        differences.append("seed (not derived from run.json's base_seed)")
    if differences:
        raise ValueError(f"{where} (id {record['id']!r}) does not belong to the run described in "
                         f"{shards.parent / RUN_FILE}: it differs in {differences}. The manifest is from another run; "
                         "keep each dataset folder's run.json, manifest.jsonl and shards/ together, or regenerate.")


def read_manifest(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run description and the per-image records of a generated dataset, validated.

    Raises:
        FileNotFoundError: ``folder`` is not a finished generation run.
        ValueError: a file is damaged, a record is malformed or unsafe, or the manifest belongs to another run.
    """
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file() or not (folder / RUN_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a finished lbgen generation run (no {MANIFEST_FILE} / "
                                f"{RUN_FILE}); run or resume `lbgen predict` into it first.")
    run = read_json(folder / RUN_FILE, "the run description is damaged; regenerate the dataset, or resume the "
                                       "`lbgen predict` run that writes it.")
    if not isinstance(run, dict):
        raise ValueError(f"{folder / RUN_FILE} holds a {type(run).__name__}, not a run description; regenerate.")
    requests = run.get("requests")
    names = requests.get("class_names") if isinstance(requests, dict) else None
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{folder / RUN_FILE}: requests.class_names must be a list of non-empty names, got "
                             f"{names!r}; regenerate the dataset.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{folder / RUN_FILE} names classes {duplicates} more than once; every class needs a "
                             "distinct name: regenerate with distinct class_names.")
    records, seen = [], set()
    existing = {p.name for p in (folder / SHARD_DIR).glob(f"*{SHARD_SUFFIX}") if p.is_file()}
    for number, line in enumerate((folder / MANIFEST_FILE).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{folder / MANIFEST_FILE}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err}): the manifest is damaged; rerun the same "
                             "`lbgen predict` command to rewrite it from the shards.") from None
        _check_record(record, where, run, folder / SHARD_DIR, existing)
        if record["id"] in seen:
            raise ValueError(f"{where}: image {record['id']!r} appears twice; the manifest is damaged: rerun the "
                             "same `lbgen predict` command to rewrite it from the shards.")
        seen.add(record["id"])
        records.append(record)
    return run, records


# --- reading images ---------------------------------------------------------------------------------------------------
def load_images(folder: str | Path, records: list[dict[str, Any]], image_size: int,
                threads: int | None = None) -> torch.Tensor:
    """Decode every record's PNG once from the shards into a uint8 tensor ``[N, 3, S, S]``.

    Each shard is read in one sequential pass (``read_shard``: a lookup by member name would search the member list
    once per image, quadratic in the shard size); its PNGs are decoded by ``threads`` threads (default: torch's
    intra-op thread count; PIL decodes without the GIL), one shard at a time so that memory stays bounded.
    """
    folder = Path(folder)
    threads = max(1, threads or torch.get_num_threads())
    wanted: dict[str, dict[str, int]] = {}
    for i, record in enumerate(records):
        wanted.setdefault(record["shard"], {})[record["id"]] = i
    out = torch.empty(len(records), 3, image_size, image_size, dtype=torch.uint8)

    def decode_into(i: int, data: bytes, path: Path) -> None:
        out[i] = decode_png(data, path, records[i]["id"], image_size)

    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
        for shard, positions in wanted.items():
            path, found, pending = folder / SHARD_DIR / shard, set(), []
            for sample in read_shard(path):
                i = positions.get(sample["__key__"])
                if i is None or "png" not in sample:
                    continue
                if pool is None:
                    decode_into(i, sample["png"], path)
                else:
                    pending.append(pool.submit(decode_into, i, sample["png"], path))
                found.add(sample["__key__"])
            for job in pending:
                job.result()  # the first undecodable image, in shard order, is the one reported
            missing = sorted(f"{image_id}.png" for image_id in positions.keys() - found)
            if missing:
                raise _no_image(path, missing[0])
    return out


MAX_NAME_CHARS = 64


def safe_folder_name(class_index: int, name: str) -> str:
    """A path-safe, unique folder name for a class: its index plus the name with anything unusual replaced.

    Only ASCII letters, digits, ``-`` and ``_`` survive (``/``, ``..``, leading dots, non-ASCII and control characters
    become ``_``), and the name is cut to ``MAX_NAME_CHARS``; the index keeps names that clean alike apart.
    """
    if not isinstance(class_index, int) or class_index < 0:
        raise ValueError(f"class_index must be a non-negative integer, got {class_index!r}.")
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in str(name))
    return f"{class_index:04d}_{cleaned[:MAX_NAME_CHARS].strip('_-') or 'class'}"


def export_image_folder(folder: str | Path, out: str | Path) -> Path:
    """Copy a generated dataset into plain files: ``out/<index>_<class>/<id>.png`` + ``out/metadata.jsonl``.

    ``metadata.jsonl`` has one line per image: ``file_name`` (relative to ``out``) and the manifest record.
    Class names never become raw paths ("T-shirt/top" becomes ``0000_T-shirt_top``, ".." ``0001_class``), and
    record ids are checked to be plain file names when the manifest is read.
    """
    folder, out = Path(folder), Path(out)
    run, records = read_manifest(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; nothing was written: choose a new folder "
                              "for the export.")
    by_shard: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_shard.setdefault(record["shard"], {})[record["id"]] = record
    lines = []
    for shard, wanted in by_shard.items():
        path, found = folder / SHARD_DIR / shard, set()
        for sample in read_shard(path):
            record = wanted.get(sample["__key__"])
            if record is None or "png" not in sample:
                continue
            relative = Path(safe_folder_name(record["class_index"], record.get("class_name", ""))) / (
                record["id"] + ".png")
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (out / relative).write_bytes(sample["png"])
            lines.append(json.dumps({"file_name": relative.as_posix(), **record}, sort_keys=True))
            found.add(record["id"])
        missing = [image_id for image_id in wanted if image_id not in found]  # the first in manifest order
        if missing:
            raise _no_image(path, f"{missing[0]}.png")
    (out / "metadata.jsonl").write_text("\n".join(sorted(lines)) + "\n")
    return out
