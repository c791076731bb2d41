"""Real images as shards (``lbgen shard-folder``): an ImageFolder's files stored byte for byte with their ids and
labels, read and exported back exactly; resumable, the same shards from any number of processes; bad input refused
with nothing overwritten."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lbgen import commands
from lbgen.storage import real_shards
from lbgen.storage.dataset_format import (
    MANIFEST_FILE,
    RUN_FILE,
    SHARD_DIR,
    complete_shards,
    export_image_folder,
    index_path,
    load_images,
    read_index,
    read_manifest,
    read_shard,
    write_manifest,
    write_run,
    write_shard,
)
from lbgen.storage.real_shards import file_ids, shard_image_folder

FORMATS = (("PNG", ".png"), ("JPEG", ".JPEG"), ("WEBP", ".webp"), ("GIF", ".gif"))


def image_folder(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """An ImageFolder of small seeded images in several formats, with a nested folder and names to clean."""
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate((per_class or {"cat": 7, "dog": 6, "crane (bird)": 3}).items()):
        for i in range(n):
            fmt, suffix = FORMATS[(i + c) % len(FORMATS)]
            path = root / name / ("nested" if i == 2 else "") / f"img {i}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (6 + i, 5 + c, 3), dtype=np.uint8)).save(path, format=fmt)
    if (root / "cat").is_dir():
        shutil.copy(root / "cat" / "img 0.png", root / "cat" / "img_0.png")  # cleans to the id of "img 0.png"
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def members(folder: Path) -> dict[str, tuple[str, bytes]]:
    """id -> (member extension, image bytes) over a set's shards."""
    out = {}
    for shard in complete_shards(folder):
        for sample in read_shard(shard):
            (ext,) = set(sample) - {"__key__", "__url__", "json"}
            out[sample["__key__"]] = (ext, sample[ext])
    return out


def test_file_ids_are_plain_unique_and_deterministic():
    paths = ["cat/img 0.png", "cat/img_0.png", "n01440764/n01440764_10026.JPEG", "..x/.hidden.jpg", "a/b.c.webp",
             "é/ü.png"]
    ids = file_ids(paths)
    assert ids == file_ids(paths) and len(set(ids)) == len(ids)
    assert ids[2] == "n01440764__n01440764_10026" and ids[4] == "a__b.c" and ids[5] == "____"
    assert ids[0].startswith("cat__img_0-") and ids[1].startswith("cat__img_0-")  # cleaned alike: hashed apart
    assert ids[3] == "_x__.hidden" and all(".." not in i and "/" not in i for i in ids)


def test_folder_to_shards_and_back_is_exact(tmp_path):
    source = image_folder(tmp_path / "train")
    done = shard_image_folder(source, tmp_path / "real", shard_size=4)
    assert done == {"images": 17, "shards": 5, "written": 5, "kept": 0}
    run, records = read_manifest(tmp_path / "real")
    assert (run["kind"], run["class_names"], run["num_images"]) == ("real", ["cat", "crane (bird)", "dog"], 17)
    assert run["source_dir"] == str(source.resolve()) and run["order"] == "interleaved"
    originals = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    # every file once, its label the class folder, its bytes untouched, the member named by its real format
    assert sorted(r["path"] for r in records) == sorted(originals)
    assert all(r["class_name"] == r["path"].split("/")[0] == run["class_names"][r["class_index"]] and
               r["source"] == "real" for r in records)
    stored = members(tmp_path / "real")
    by_format = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif"}
    assert all(stored[r["id"]] == (by_format[r["image_format"]], originals[r["path"]]) for r in records)
    assert {r["image_format"] for r in records} == set(by_format)
    # interleaved: each shard of 4 holds several classes (sorted paths would give one class a shard)
    shards = [read_index(s) for s in complete_shards(tmp_path / "real")]
    assert [len(s) for s in shards] == [4, 4, 4, 4, 1] and all(len({r["class_index"] for r in s}) >= 2
                                                                for s in shards[:4])
    # read back: decoded as any set, and exported to files that are the originals byte for byte
    pixels = load_images(tmp_path / "real", records, 8)
    first = next(i for i, r in enumerate(records) if r["image_format"] == "png")
    expected = Image.open(source / records[first]["path"]).convert("RGB").resize((8, 8), Image.BICUBIC)
    assert np.array_equal(pixels[first].permute(1, 2, 0).numpy(), np.asarray(expected))
    out = export_image_folder(tmp_path / "real", tmp_path / "exported")
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 17 and all((out / line["file_name"]).read_bytes() == originals[line["path"]] for line in lines)
    assert {Path(line["file_name"]).suffix for line in lines} == {".png", ".jpg", ".webp", ".gif"}


def test_shards_are_cut_by_megabytes_from_the_file_sizes(tmp_path):
    source = image_folder(tmp_path / "train")
    limit = 0.006  # 6000 bytes: a few of these small files a shard
    done = shard_image_folder(source, tmp_path / "real", shard_size=100, shard_max_mb=limit)
    shards = complete_shards(tmp_path / "real")
    assert done["shards"] == len(shards) > 2 and json.loads((tmp_path / "real" / RUN_FILE).read_text())[
        "shard_max_mb"] == limit
    for shard in shards:
        with tarfile.open(shard) as tar:
            assert sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers()) <= limit * 1e6


def test_a_partial_run_resumes_to_the_same_shards(tmp_path, monkeypatch):
    source = image_folder(tmp_path / "train")
    shard_image_folder(source, tmp_path / "whole", shard_size=3)
    written, original = [], real_shards.write_shard

    def killed_at_the_third(path, samples):
        written.append(path.name)
        if len(written) == 3:  # dies after writing part of the tar: a temporary file is left behind
            path.with_name(path.name + ".tmp").write_bytes(b"half a tar")
            raise OSError("killed (simulated)")
        original(path, samples)

    monkeypatch.setattr(real_shards, "write_shard", killed_at_the_third)
    with pytest.raises(OSError, match="simulated"):
        shard_image_folder(source, tmp_path / "resumed", shard_size=3)
    monkeypatch.setattr(real_shards, "write_shard", original)
    assert len(complete_shards(tmp_path / "resumed")) == 2 and not (tmp_path / "resumed" / MANIFEST_FILE).exists()
    index_path(complete_shards(tmp_path / "resumed")[1]).unlink()  # and one killed between the tar and its index
    kept = complete_shards(tmp_path / "resumed")[0]
    stamp = kept.stat().st_mtime_ns
    done = shard_image_folder(source, tmp_path / "resumed", shard_size=3)
    assert done == {"images": 17, "shards": 6, "written": 5, "kept": 1}
    assert kept.stat().st_mtime_ns == stamp  # a complete shard is not written again
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "whole")  # run.json, shards, indexes, manifest
    assert shard_image_folder(source, tmp_path / "resumed", shard_size=3)["written"] == 0


def test_two_processes_make_the_shards_of_one(tmp_path):
    source = image_folder(tmp_path / "train")
    shard_image_folder(source, tmp_path / "one", shard_size=3)
    done = shard_image_folder(source, tmp_path / "two", shard_size=3, processes=2)
    assert done["written"] == 6
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


def test_the_verb_shards_a_folder_and_reports_bad_input(tmp_path, capsys):
    source = image_folder(tmp_path / "train", {"a": 2, "b": 2})
    commands.main(["shard-folder", str(source), str(tmp_path / "real"), "--shard-size", "3"])
    assert "4 images in 2 shards" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "real")[1]) == 4
    with pytest.raises(SystemExit) as stopped:
        commands.main(["shard-folder", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert stopped.value.code == 1 and f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_a_folder_that_is_not_an_image_folder_is_refused(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "loose.png")
    with pytest.raises(ValueError, match="has no class sub-folders"):
        shard_image_folder(flat, tmp_path / "out")
    broken = image_folder(tmp_path / "broken", {"a": 2, "b": 1})
    (broken / "b" / "fake.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"fake.jpg is not a readable image"):
        shard_image_folder(broken, tmp_path / "out2")
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        shard_image_folder(broken, tmp_path / "out3", shard_size=0)


def test_an_output_folder_of_another_run_is_refused_and_kept(tmp_path):
    source = image_folder(tmp_path / "train", {"a": 2, "b": 2})
    # a generated set
    generated = tmp_path / "generated"
    (generated / SHARD_DIR).mkdir(parents=True)
    write_run(generated, {"requests": {"class_names": ["a", "b"]}})
    write_shard(generated / SHARD_DIR / "shard-t-r000-00000.tar", [(b"png bytes", {"id": "c0000-i000000"})])
    write_manifest(generated, [])
    # a real set of other files, and a folder that is not a dataset
    other = image_folder(tmp_path / "other", {"a": 3, "b": 2})
    shard_image_folder(other, tmp_path / "real", shard_size=2)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    for out, message in ((generated, "holds a generated dataset"), (tmp_path / "real", "differs in"),
                         (stranger, "holds no run.json")):
        before = files_of(out)
        with pytest.raises(FileExistsError, match=message):
            shard_image_folder(source, out, shard_size=2)
        assert files_of(out) == before  # nothing overwritten, nothing added
    with pytest.raises(FileExistsError, match=r"differs in \['shard_size'\]"):
        shard_image_folder(other, tmp_path / "real", shard_size=3)  # same files, other cut: refused too


def test_manifest_schema_follows_the_kind_without_loosening_generated_sets(tmp_path):
    source = image_folder(tmp_path / "train", {"a": 2, "b": 2})
    shard_image_folder(source, tmp_path / "real", shard_size=2)
    manifest = tmp_path / "real" / MANIFEST_FILE
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]

    def rewrite(records: list[dict]) -> None:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))

    rewrite([{k: v for k, v in lines[0].items() if k != "path"}, *lines[1:]])
    with pytest.raises(ValueError, match=r"lacks \['path'\].*lbgen shard-folder"):
        read_manifest(tmp_path / "real")
    rewrite([{**lines[0], "path": "../../etc/passwd"}, *lines[1:]])
    with pytest.raises(ValueError, match="not a relative path inside the source folder"):
        read_manifest(tmp_path / "real")
    rewrite([{**lines[0], "class_name": "b" if lines[0]["class_name"] == "a" else "a"}, *lines[1:]])
    with pytest.raises(ValueError, match="does not belong to the run"):
        read_manifest(tmp_path / "real")
    rewrite(lines)
    run = json.loads((tmp_path / "real" / RUN_FILE).read_text())
    # the same real records under a generated set's run.json still lack what generated records need
    (tmp_path / "real" / RUN_FILE).write_text(json.dumps({"requests": {"class_names": run["class_names"]}}))
    with pytest.raises(ValueError, match=r"lacks \['method', 'prompt', 'seed'\]"):
        read_manifest(tmp_path / "real")
    (tmp_path / "real" / RUN_FILE).write_text(json.dumps({**run, "kind": "painted"}))
    with pytest.raises(ValueError, match="kind 'painted'"):
        read_manifest(tmp_path / "real")
