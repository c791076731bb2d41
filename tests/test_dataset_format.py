"""The synthetic-dataset format: shards written and read through webdataset, byte for byte reproducible, readable by
``wds.WebDataset``; partial shards, images loaded and exported from shards, and the errors that name a bad one."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from lbgen.storage.dataset_format import (
    SHARD_DIR,
    complete_shards,
    export_image_folder,
    index_path,
    load_images,
    png_bytes,
    read_index,
    read_shard,
    remove_partial_shards,
    shard_name,
    write_manifest,
    write_run,
    write_shard,
)

NAMES = ["T-shirt/top", ".."]  # neither may become a raw path


def samples(n: int = 3, size: int = 4) -> list[tuple[bytes, dict]]:
    out = []
    for i in range(n):
        image = torch.arange(3 * size * size, dtype=torch.int64).reshape(3, size, size).add(40 * i).remainder(256)
        record = {"prompt": f"a photo of a {i}", "id": f"c{i % 2:04d}-i{i:06d}", "class_index": i % 2,
                  "class_name": NAMES[i % 2], "seed": 100 + i, "method": "txt2img", "index": i}
        out.append((png_bytes(image.to(torch.uint8)), record))
    return out


def test_write_then_read_gives_the_ids_bytes_and_records(tmp_path):
    shard = tmp_path / shard_name("abcd1234-r000", 0)
    written = samples()
    write_shard(shard, written)
    read = list(read_shard(shard))
    assert [s["__key__"] for s in read] == [r["id"] for _, r in written]
    assert [s["png"] for s in read] == [png for png, _ in written]
    assert [json.loads(s["json"]) for s in read] == [r for _, r in written]
    assert read_index(shard) == [{**r, "shard": shard.name} for _, r in written]
    assert shard.name == "shard-abcd1234-r000-00000.tar" and index_path(shard).is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_same_samples_give_the_same_bytes_in_a_fixed_member_order(tmp_path):
    write_shard(tmp_path / "a.tar", samples())
    reordered = [(png, dict(reversed(list(r.items())))) for png, r in samples()]  # key order must not matter
    write_shard(tmp_path / "b.tar", reordered)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    ids = [r["id"] for _, r in samples()]
    assert [m.name for m in members] == [f"{i}.{ext}" for i in ids for ext in ("json", "png")]
    assert {(m.mtime, m.mode, m.uname, m.gname, m.uid, m.gid) for m in members} == {(0, 0o644, "", "", 0, 0)}


def test_webdataset_reads_a_written_shard(tmp_path):
    written = samples()
    write_shard(tmp_path / "s.tar", written)
    read = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == [r["id"] for _, r in written]
    assert [(s["png"], json.loads(s["json"])) for s in read] == written


def test_an_id_with_dots_keeps_its_whole_name(tmp_path):
    png, record = samples(1)[0]
    write_shard(tmp_path / "s.tar", [(png, {**record, "id": "v1.2-c0000"})])
    assert [(s["__key__"], s["png"]) for s in read_shard(tmp_path / "s.tar")] == [("v1.2-c0000", png)]


def test_partial_shards_are_removed_and_not_complete(tmp_path):
    shards = tmp_path / SHARD_DIR
    shards.mkdir()
    write_shard(shards / shard_name("t-r000", 0), samples(2))
    write_shard(shards / shard_name("t-r000", 1), samples(2))
    index_path(shards / shard_name("t-r000", 1)).unlink()  # killed between the two renames
    (shards / "shard-x-00000.tar.tmp").write_bytes(b"half a tar")
    assert complete_shards(tmp_path) == [shards / shard_name("t-r000", 0)]
    remove_partial_shards(tmp_path)
    assert sorted(p.name for p in shards.iterdir()) == ["shard-t-r000-00000.jsonl", shard_name("t-r000", 0)]


def dataset(folder: Path, written: list[tuple[bytes, dict]]) -> list[dict]:
    (folder / SHARD_DIR).mkdir(parents=True)
    write_shard(folder / SHARD_DIR / shard_name("t-r000", 0), written[:2])
    write_shard(folder / SHARD_DIR / shard_name("t-r000", 1), written[2:])
    write_run(folder, {"requests": {"class_names": NAMES}})
    records = sorted((r for s in complete_shards(folder) for r in read_index(s)), key=lambda r: r["id"])
    write_manifest(folder, records)
    return records


def test_images_are_loaded_and_exported_from_the_shards(tmp_path):
    written = samples(4)
    records = dataset(tmp_path / "syn", written)
    images = load_images(tmp_path / "syn", records, 4, threads=2)
    assert images.shape == (4, 3, 4, 4) and torch.equal(images, load_images(tmp_path / "syn", records, 4, threads=1))
    by_id = {r["id"]: png for png, r in written}
    assert [png_bytes(image) for image in images] == [by_id[r["id"]] for r in records]
    out = export_image_folder(tmp_path / "syn", tmp_path / "plain")
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == sorted(
        f"{r['class_index']:04d}_{'T-shirt_top' if r['class_index'] == 0 else 'class'}/{r['id']}.png" for r in records)
    assert all((out / line["file_name"]).read_bytes() == by_id[line["id"]] for line in lines)


def test_a_missing_or_undecodable_image_names_its_shard_and_id(tmp_path):
    written = samples(4)
    records = dataset(tmp_path / "syn", written)
    with pytest.raises(ValueError, match=r"shard-t-r000-00001.tar has no image c0000-i000009.png although"):
        load_images(tmp_path / "syn", [*records, {**records[-1], "id": "c0000-i000009"}], 4)
    broken = [(b"not a png" if i == 1 else png, r) for i, (png, r) in enumerate(written)]
    records = dataset(tmp_path / "bad", broken)
    with pytest.raises(ValueError, match=r"c0001-i000001.png in .*shard-t-r000-00000.tar cannot be decoded"):
        load_images(tmp_path / "bad", records, 4, threads=2)
