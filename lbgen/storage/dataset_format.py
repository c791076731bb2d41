"""The sharded-dataset format: one run's folder, written by ``SyntheticDatasetWriter`` (generated images) or
``lbgen.storage.real_shards`` (an ``ImageFolder``'s files), read by the rest.

A dataset folder holds ``run.json`` (the run's settings), ``shards/shard-<tag>-<n>.tar`` (WebDataset shards: one
sample per image, members ``<id>.json`` and ``<id>.<ext>``: ``png`` unless the record's ``image_format`` says
otherwise, see ``IMAGE_FORMATS``), one ``.jsonl`` index beside each shard (its records, renamed into place after the
shard: a shard without one is partial), and ``manifest.jsonl`` (every record, sorted by id, written when the run
ends). Shards are standard WebDataset tars written with ``webdataset.TarWriter`` (fixed mtime, owner and mode,
members in sorted order: the same samples give the same bytes) and read back one sequential pass at a time
(``read_shard``), so ``wds.WebDataset`` pipelines read them too.

``run.json``'s ``kind`` says what the records are: absent (every set generated before real sets existed) or
``generated``: generation requests (``REQUIRED_KEYS``); ``real``: files of a real image folder
(``REAL_REQUIRED_KEYS``, the class names in ``run.json``'s ``class_names``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
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
"""What every record of a generated set has."""
REAL_REQUIRED_KEYS = ("id", "class_index", "class_name", "shard", "path", "source")
"""What every record of a real set (``run.json`` ``kind: real``) has."""
KINDS = ("generated", "real")
"""The values of ``run.json``'s ``kind`` (absent: ``generated``)."""
IMAGE_FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp", "bmp": "bmp", "gif": "gif", "tiff": "tiff"}
"""A record's ``image_format`` (absent: ``png``) and the extension of its image member."""
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tiff")
"""Member extensions read as a sample's image (``jpeg`` too: other WebDataset writers use it)."""
GENERATED_FORMATS = ("png", "webp", "jpeg")
"""What generation encodes images as: PNG (exact, the default), or WebP / JPEG at an ``image_quality``."""
DEFAULT_QUALITY = 90
"""WebP / JPEG quality when ``image_quality`` is not given."""

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


def write_images_as_dataset(folder: Path, class_names: list[str], images: Iterable[tuple[int, bytes]],
                            shard_size: int, method: str = "txt2img", base_seed: int = 0) -> int:
    """Write encoded images ``(class_index, png bytes)`` as a finished dataset folder in this format, without a
    generator: benchmarks and tests of the readers at any size (each image's record is a txt2img request's).

    Returns the number of images written. Images are numbered per class in the order given.
    """
    (folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_run(folder, {"requests": {"class_names": list(class_names), "base_seed": base_seed, "method": method}})
    counts: dict[int, int] = {}
    shard: list[tuple[bytes, dict[str, Any]]] = []
    records: list[dict[str, Any]] = []
    tag = new_shard_tag(0)

    def flush() -> None:
        name = shard_name(tag, len({r["shard"] for r in records}))
        write_shard(folder / SHARD_DIR / name, shard)
        records.extend({**r, "shard": name} for _, r in shard)
        shard.clear()

    for c, data in images:
        i = counts[c] = counts.get(c, -1) + 1
        shard.append((data, {"id": request_id(c, i), "class_index": c, "class_name": class_names[c], "index": i,
                             "seed": request_seed(base_seed, c, i), "prompt": class_names[c], "method": method}))
        if len(shard) == shard_size:
            flush()
    if shard:
        flush()
    write_manifest(folder, sorted(records, key=lambda r: r["id"]))
    return len(records)


# --- shards -----------------------------------------------------------------------------------------------------------
def png_bytes(image_chw: torch.Tensor) -> bytes:
    """Encode a uint8 ``[3, H, W]`` tensor as PNG (deterministic bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def storage_record(image_format: str = "png", image_quality: int | None = None,
                   save_size: int | None = None) -> dict[str, Any]:
    """How generated images are stored, checked, as recorded in ``run.json`` and every record.

    Only what differs from the default (PNG at the generated size) is recorded, so the run descriptions of sets
    written before these options existed stay the same (and resumable).

    Args:
        image_format: ``png`` (exact), ``webp`` or ``jpeg`` (lossy, at ``image_quality``).
        image_quality: 1 to 100 for WebP / JPEG (default ``DEFAULT_QUALITY``); PNG takes none.
        save_size: store images resized to this side (bicubic, antialiased); None: as generated.
    """
    if image_format not in GENERATED_FORMATS:
        raise ValueError(f"image_format must be one of {list(GENERATED_FORMATS)}, got {image_format!r}.")
    record: dict[str, Any] = {}
    if image_format == "png":
        if image_quality is not None:
            raise ValueError(f"image_quality {image_quality} is for the lossy formats: PNG is exact; leave "
                             "image_quality unset, or set image_format: webp or jpeg.")
    else:
        quality = DEFAULT_QUALITY if image_quality is None else image_quality
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"image_quality must be an integer from 1 to 100, got {image_quality!r} (e.g. 90).")
        record.update(image_format=image_format, image_quality=quality)
    if save_size is not None:
        if isinstance(save_size, bool) or not isinstance(save_size, int) or save_size <= 0:
            raise ValueError(f"save_size must be a positive number of pixels (e.g. 256), got {save_size!r}; leave it "
                             "unset to store images as generated.")
        record["save_size"] = save_size
    return record


def resize_image(image_chw: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 ``[3, H, W]`` tensor resized to ``[3, size, size]`` with PIL's bicubic filter (antialiased: its
    support widens with the reduction); unchanged when already that size."""
    if tuple(image_chw.shape[1:]) == (size, size):
        return image_chw
    image = Image.fromarray(image_chw.permute(1, 2, 0).numpy()).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def encode_image(image_chw: torch.Tensor, image_format: str = "png", quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode a uint8 ``[3, H, W]`` tensor as ``png``, ``webp`` or ``jpeg`` (deterministic bytes for each)."""
    if image_format == "png":
        return png_bytes(image_chw)
    if image_format not in GENERATED_FORMATS:
        raise ValueError(f"image_format must be one of {list(GENERATED_FORMATS)}, got {image_format!r}.")
    buffer = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buffer, format=image_format.upper(), quality=quality)
    return buffer.getvalue()


def member_extension(record: dict[str, Any]) -> str:
    """The extension of a record's image member: from its ``image_format`` (absent: ``png``)."""
    image_format = record.get("image_format", "png")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"Record {record.get('id')!r} has image_format {image_format!r}; lbgen stores "
                         f"{sorted(IMAGE_FORMATS)}: regenerate the dataset.")
    return IMAGE_FORMATS[image_format]


def image_member(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    """A raw sample's image member ``(extension, bytes)``, whichever format it has; None if it has none."""
    return next(((ext, sample[ext]) for ext in IMAGE_MEMBERS if ext in sample), None)


def decode_image(data: bytes, shard: Path, image_id: str, image_size: int | None, member: str = "png"
                 ) -> torch.Tensor:
    """One shard image (PNG, JPEG, WebP, ...: PIL reads the format from the bytes) as a uint8 ``[3, S, S]``
    tensor, bicubic-resized when stored at another size; ``image_size`` None: ``[3, H, W]`` as stored (the random
    resized crop of ``train_resolution: source`` reads it). ``member`` (its extension) names it in errors."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except OSError as err:
        raise ValueError(f"{image_id}.{member} in {shard} cannot be decoded ({err}); regenerate the dataset.") from err
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


decode_png = decode_image
"""The former name of ``decode_image`` (it decodes every format)."""


def shard_byte_limit(shard_max_mb: float | None) -> int | None:
    """``shard_max_mb`` (1 MB = 10^6 bytes) as a byte count, checked; None: no size limit."""
    if shard_max_mb is None:
        return None
    if isinstance(shard_max_mb, bool) or not isinstance(shard_max_mb, (int, float)) or not shard_max_mb > 0:
        raise ValueError(f"shard_max_mb must be a positive number of megabytes (e.g. 500), got {shard_max_mb!r}; "
                         "leave it unset to cut shards by image count only.")
    return int(shard_max_mb * 1_000_000)


def _tar_entry_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512  # a header block, then the data padded to whole blocks


def sample_tar_bytes(image_bytes: int, record: dict[str, Any]) -> int:
    """The bytes one sample (an image of ``image_bytes`` bytes and its record) adds to a shard written by
    ``write_shard``: both members, headers and padding (ids over 100 characters need a further header, not
    counted)."""
    return _tar_entry_bytes(image_bytes) + _tar_entry_bytes(len(json.dumps(record, sort_keys=True).encode()))


def write_shard(path: Path, samples: Iterable[tuple[bytes, dict[str, Any]]]) -> None:
    """Write ``(image bytes, record)`` samples as the shard ``path``, then its index: crash-safe, byte for byte
    reproducible.

    The tar goes to ``<path>.tmp``, is synced and renamed into place, then the index (the records, each with
    ``shard``) is written atomically: a shard is complete once its index exists. Members are ``<id>.json`` (the
    record, keys sorted) and ``<id>.<ext>`` (``member_extension``: ``png`` unless the record's ``image_format``
    says otherwise), with mtime 0, no owner and mode 644. ``samples`` is read once (a generator keeps one image in
    memory at a time).
    """
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    records = []
    with open(tmp, "wb") as f:
        with TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False) as tar:
            for data, record in samples:
                tar.write({"__key__": record["id"], member_extension(record): data,
                           "json": json.dumps(record, sort_keys=True).encode()})
                records.append(record)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    index = "".join(json.dumps({**r, "shard": path.name}, sort_keys=True) + "\n" for r in records)
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


def run_kind(run: dict[str, Any]) -> str:
    """What a run's records are: ``generated`` or ``real`` (``run.json``'s ``kind``; absent: ``generated``)."""
    kind = run.get("kind", "generated")
    if kind not in KINDS:
        raise ValueError(f"run.json has kind {kind!r}; lbgen writes {list(KINDS)}: the folder is not an lbgen "
                         "dataset, or a newer lbgen wrote it.")
    return kind


def run_class_names(run: dict[str, Any]) -> Any:
    """A run's class names as recorded (None if not): ``class_names`` of a real set, ``requests.class_names`` of a
    generated one (``read_run`` checks their form)."""
    if run_kind(run) == "real":
        return run.get("class_names")
    requests = run.get("requests")
    return requests.get("class_names") if isinstance(requests, dict) else None


def check_record(record: Any, where: str, run: dict[str, Any], shards: Path, existing: set[str]) -> None:
    """Refuse a record of the wrong shape, with unsafe file names, or from a run other than ``run.json``'s.

    ``run``'s kind decides the required keys: a generated set's records are requests (``REQUIRED_KEYS``, seeds
    derived from the base seed), a real set's are files (``REAL_REQUIRED_KEYS``, ``source: real``).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record; regenerate the dataset.")
    real = run_kind(run) == "real"
    writer = "`lbgen shard-folder`" if real else "`lbgen predict`"
    required = set(REAL_REQUIRED_KEYS if real else REQUIRED_KEYS)
    if not required <= set(record):
        fix = "shard the folder again" if real else "regenerate the dataset"
        raise ValueError(f"{where} (id {record.get('id')!r}) lacks {sorted(required - set(record))}; the manifest "
                         f"was not written by {writer} (as {RUN_FILE} says): {fix}.")
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
                         f"and shards/) together, or rerun the same {writer} command to finish the run.")
    member_extension(record)  # an unknown image_format
    requests = run.get("requests") if not real and isinstance(run.get("requests"), dict) else {}
    names = run_class_names(run)
    differences = [key for key, value in run.items() if key != "requests" and key in record and record[key] != value]
    if real:
        path = record["path"]
        if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or ".." in path.split("/"):
            raise ValueError(f"{where}: path {path!r} is not a relative path inside the source folder; the manifest "
                             "is damaged or not lbgen's: run `lbgen shard-folder` again.")
        if record["source"] != "real":
            differences.append(f"source {record['source']!r} (a real set's records say 'real')")
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


def read_run(folder: str | Path) -> dict[str, Any]:
    """The run description (``run.json``) of a finished dataset folder, validated (class names distinct).

    Raises:
        FileNotFoundError: ``folder`` is not a finished generation run.
        ValueError: ``run.json`` is damaged.
    """
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file() or not (folder / RUN_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a finished lbgen dataset (no {MANIFEST_FILE} / {RUN_FILE}); run or "
                                "resume the command that writes it first (`lbgen predict` for a generated set, "
                                "`lbgen shard-folder` for a real one).")
    run = read_json(folder / RUN_FILE, "the run description is damaged; regenerate the dataset, or resume the "
                                       "`lbgen predict` run that writes it.")
    if not isinstance(run, dict):
        raise ValueError(f"{folder / RUN_FILE} holds a {type(run).__name__}, not a run description; regenerate.")
    try:
        names = run_class_names(run)
    except ValueError as err:
        raise ValueError(f"{folder / RUN_FILE}: {err}") from None
    if run.get("kind") == "real" and names is None:
        raise ValueError(f"{folder / RUN_FILE} describes a real set without class_names; run `lbgen shard-folder` "
                         "again into a new folder.")
    if names is not None:
        key = "class_names" if run.get("kind") == "real" else "requests.class_names"
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{folder / RUN_FILE}: {key} must be a list of non-empty names, got "
                             f"{names!r}; regenerate the dataset.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{folder / RUN_FILE} names classes {duplicates} more than once; every class needs a "
                             "distinct name: regenerate with distinct class_names.")
    return run


def read_manifest(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run description and the per-image records of a generated dataset, validated.

    Raises:
        FileNotFoundError: ``folder`` is not a finished generation run.
        ValueError: a file is damaged, a record is malformed or unsafe, or the manifest belongs to another run.
    """
    folder = Path(folder)
    run = read_run(folder)
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
        check_record(record, where, run, folder / SHARD_DIR, existing)
        if record["id"] in seen:
            raise ValueError(f"{where}: image {record['id']!r} appears twice; the manifest is damaged: rerun the "
                             "same `lbgen predict` command to rewrite it from the shards.")
        seen.add(record["id"])
        records.append(record)
    return run, records


# --- reading images ---------------------------------------------------------------------------------------------------
def load_images(folder: str | Path, records: list[dict[str, Any]], image_size: int,
                threads: int | None = None) -> torch.Tensor:
    """Decode every record's image (PNG, WebP, JPEG, ...: whichever member it has) once from the shards into a
    uint8 tensor ``[N, 3, S, S]``.

    Each shard is read in one sequential pass (``read_shard``: a lookup by member name would search the member list
    once per image, quadratic in the shard size); its images are decoded by ``threads`` threads (default: torch's
    intra-op thread count; PIL decodes without the GIL), one shard at a time so that memory stays bounded.
    """
    folder = Path(folder)
    threads = max(1, threads or torch.get_num_threads())
    wanted: dict[str, dict[str, int]] = {}
    for i, record in enumerate(records):
        wanted.setdefault(record["shard"], {})[record["id"]] = i
    out = torch.empty(len(records), 3, image_size, image_size, dtype=torch.uint8)

    def decode_into(i: int, member: tuple[str, bytes], path: Path) -> None:
        out[i] = decode_image(member[1], path, records[i]["id"], image_size, member[0])

    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
        for shard, positions in wanted.items():
            path, found, pending = folder / SHARD_DIR / shard, set(), []
            for sample in read_shard(path):
                i, member = positions.get(sample["__key__"]), image_member(sample)
                if i is None or member is None:
                    continue
                if pool is None:
                    decode_into(i, member, path)
                else:
                    pending.append(pool.submit(decode_into, i, member, path))
                found.add(sample["__key__"])
            for job in pending:
                job.result()  # the first undecodable image, in shard order, is the one reported
            missing = sorted(f"{records[i]['id']}.{member_extension(records[i])}"
                             for image_id, i in positions.items() if image_id not in found)
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
    """Copy a dataset (generated or real) into plain files: ``out/<index>_<class>/<id>.<ext>`` +
    ``out/metadata.jsonl``.

    Each image's bytes are copied as stored, with its member's extension (``png``, ``webp``, ``jpg``, ...; a real
    set's files come out byte for byte as they were, their original relative ``path`` in the record).
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
            record, member = wanted.get(sample["__key__"]), image_member(sample)
            if record is None or member is None:
                continue
            relative = Path(safe_folder_name(record["class_index"], record.get("class_name", ""))) / (
                f"{record['id']}.{member[0]}")
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (out / relative).write_bytes(member[1])
            lines.append(json.dumps({"file_name": relative.as_posix(), **record}, sort_keys=True))
            found.add(record["id"])
        missing = [image_id for image_id in wanted if image_id not in found]  # the first in manifest order
        if missing:
            raise _no_image(path, f"{missing[0]}.{member_extension(wanted[missing[0]])}")
    (out / "metadata.jsonl").write_text("\n".join(sorted(lines)) + "\n")
    return out
