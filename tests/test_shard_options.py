"""Generation's shard options: requests interleaved across classes, shards cut by megabytes, WebP / JPEG images,
a storage size; each recorded in run.json, a resume with others refused, a resume byte for byte the same."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lbgen.callbacks.dataset_writer import SyntheticDatasetWriter
from lbgen.components import PretrainedGenerator
from lbgen.datamodules import GenerationRequestsDataModule, SyntheticDataModule
from lbgen.models import GenerationSystem
from lbgen.storage.dataset_format import (
    MANIFEST_FILE,
    RUN_FILE,
    SHARD_DIR,
    complete_shards,
    decode_image,
    image_member,
    index_path,
    load_images,
    read_index,
    read_manifest,
    read_shard,
    storage_record,
)

from .test_generation import _source, generate

LIMIT_MB = 0.008  # 8000 bytes: three samples of the tiny generator (16 px PNG + record: 2560 tar bytes) a shard


def images(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Every stored image of a dataset folder: id -> (member extension, bytes)."""
    return {sample["__key__"]: image_member(sample) for shard in complete_shards(folder) for sample in
            read_shard(shard)}


def member_bytes(shard: Path) -> int:
    """What a shard's members take: headers and padded data, without the tar's closing padding."""
    with tarfile.open(shard) as tar:
        return sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers())


def test_interleaved_order_keeps_every_request_and_is_recorded(fmnist_fixture):
    def requests(**kwargs):
        return GenerationRequestsDataModule(source_data=_source(fmnist_fixture), images_per_class=3, method="genie",
                                            base_seed=7, **kwargs)

    interleaved, by_class = requests(), requests(request_order="class")
    mixed, grouped = interleaved.requests(), by_class.requests()
    assert [r["class_index"] for r in mixed[:10]] == list(range(10)) and [r["index"] for r in mixed[:10]] == [0] * 10
    assert [r["class_index"] for r in grouped[:3]] == [0, 0, 0]
    # the same requests (seeds, ids, sources, prompts), only in another order
    assert sorted(mixed, key=lambda r: r["id"]) == sorted(grouped, key=lambda r: r["id"])
    assert interleaved.describe()["request_order"] == "interleaved"
    assert "request_order" not in by_class.describe()  # class-major: the description of sets written before
    chunked = GenerationRequestsDataModule(class_names=[f"class {c}" for c in range(10)], images_per_class=3,
                                           batch_size=4)
    chunked.setup("predict")
    chunks = [batch["records"] for batch in chunked.predict_dataloader()]
    assert len(chunks) == 8 and all(len({r["class_index"] for r in chunk}) == len(chunk) for chunk in chunks)
    with pytest.raises(ValueError, match=r"request_order must be one of \['interleaved', 'class'\], got 'random'"):
        requests(request_order="random")


def test_storage_options_are_checked(tiny_generator, tmp_path):
    assert storage_record() == {}  # the default adds nothing: older run.json files stay the same
    assert storage_record("webp") == {"image_format": "webp", "image_quality": 90}
    assert storage_record("jpeg", 75, 256) == {"image_format": "jpeg", "image_quality": 75, "save_size": 256}
    for kwargs, message in (({"image_format": "gif"}, "image_format must be one of"),
                            ({"image_quality": 80}, "PNG is exact"),
                            ({"image_format": "webp", "image_quality": 0}, "from 1 to 100"),
                            ({"save_size": 0}, "save_size must be a positive"),
                            ({"shard_max_mb": -1}, "shard_max_mb must be a positive")):
        with pytest.raises(ValueError, match=message):
            GenerationSystem(PretrainedGenerator(str(tiny_generator)), output_dir=str(tmp_path), **kwargs)
    with pytest.raises(ValueError, match="shard_max_mb must be a positive"):
        SyntheticDatasetWriter(tmp_path, 8, {}, shard_max_mb=0)


def test_interleaved_shards_cut_by_megabytes_resume_byte_for_byte(tiny_generator, fmnist_fixture, tmp_path):
    reference = tmp_path / "reference"
    _, records = generate(tiny_generator, fmnist_fixture, reference, images_per_class=3,
                          model_kwargs={"shard_max_mb": LIMIT_MB})
    run = json.loads((reference / RUN_FILE).read_text())
    assert run["shard_max_mb"] == LIMIT_MB and run["requests"]["request_order"] == "interleaved"
    assert "shard_max_mb" not in records[0]  # a property of the folder, not of an image
    shards = complete_shards(reference)
    sizes = [len(read_index(s)) for s in shards]
    assert sizes == [3] * 10  # the megabytes close shards before shard_size (8) does
    assert all(member_bytes(s) <= LIMIT_MB * 1e6 for s in shards)
    # written in request order (index-major): every shard holds as many classes as images
    assert all(len({r["class_index"] for r in read_index(s)}) == len(read_index(s)) >= 2 for s in shards)
    # as if killed: one shard lost its index (an orphan), one is gone, a temporary file is left, no manifest yet
    target = tmp_path / "killed"
    shutil.copytree(reference, target)
    lost = complete_shards(target)
    first = read_index(lost[1])[0]
    assert (first["index"] * 10 + first["class_index"]) % 4 == 3  # it begins inside a generation batch of 4
    index_path(lost[1]).unlink()
    lost[-1].unlink(), index_path(lost[-1]).unlink()
    (target / SHARD_DIR / "shard-crashed-00000.tar.tmp").write_bytes(b"half a tar")
    (target / MANIFEST_FILE).unlink()
    generate(tiny_generator, fmnist_fixture, target, images_per_class=3, model_kwargs={"shard_max_mb": LIMIT_MB})
    assert images(target) == images(reference)
    assert [r["id"] for r in read_manifest(target)[1]] == [r["id"] for r in records]
    assert not list((target / SHARD_DIR).glob("*.tmp"))
    with pytest.raises(ValueError, match=r"differs in \['shard_max_mb'\]"):
        generate(tiny_generator, fmnist_fixture, target, images_per_class=3, model_kwargs={"shard_max_mb": 1})


def test_class_major_sets_written_before_still_read_and_resume(tiny_generator, fmnist_fixture, tmp_path):
    old = tmp_path / "old"
    _, records = generate(tiny_generator, fmnist_fixture, old, images_per_class=2, request_order="class")
    assert "request_order" not in json.loads((old / RUN_FILE).read_text())["requests"]  # as before the option
    assert {r["class_index"] for r in read_index(complete_shards(old)[0])} == {0, 1, 2, 3}  # class-major shards
    before = images(old)
    with pytest.raises(ValueError, match=r"In requests: \['request_order'\]. The set was written in class-major "
                                         r"order: resume it with request_order: class."):
        generate(tiny_generator, fmnist_fixture, old, images_per_class=2)  # the new default order
    index_path(complete_shards(old)[-1]).unlink()
    generate(tiny_generator, fmnist_fixture, old, images_per_class=2, request_order="class")
    assert images(old) == before and len(SyntheticDataModule(str(old), image_size=16).records) == 20


def test_webp_and_jpeg_sets_record_their_format_and_read_back(tiny_generator, fmnist_fixture, tmp_path):
    generate(tiny_generator, fmnist_fixture, tmp_path / "png", images_per_class=1)
    _, webp = generate(tiny_generator, fmnist_fixture, tmp_path / "webp", images_per_class=1,
                       model_kwargs={"image_format": "webp"})
    _, jpeg = generate(tiny_generator, fmnist_fixture, tmp_path / "jpeg", images_per_class=1,
                       model_kwargs={"image_format": "jpeg", "image_quality": 95, "save_size": 8})
    exact = images(tmp_path / "png")
    for folder, records, ext, quality, side in ((tmp_path / "webp", webp, "webp", 90, 16),
                                                (tmp_path / "jpeg", jpeg, "jpg", 95, 8)):
        run = json.loads((folder / RUN_FILE).read_text())
        assert (run["image_format"], run["image_quality"]) == (records[0]["image_format"], quality)
        assert run.get("save_size") == (8 if side == 8 else None) == records[0].get("save_size")
        stored = images(folder)
        assert set(stored) == set(exact) and {e for e, _ in stored.values()} == {ext}
        assert {Image.open(io.BytesIO(data)).size for _, data in stored.values()} == {(side, side)}
        # both readers decode the member, whichever format: the in-memory one ...
        module = SyntheticDataModule(str(folder), image_size=16, mode="memory")
        pool = module.pool[0].images
        ids = [r["id"] for r in module.records]
        assert torch.equal(pool, load_images(folder, records, 16, threads=1))
        assert torch.equal(pool[0], decode_image(stored[ids[0]][1], folder, ids[0], 16, ext))
        # ... and the streaming one, the same pixels (in shard order)
        streamed = [s["image"] for s in SyntheticDataModule(str(folder), image_size=16, mode="stream").stream(
            train=False)]
        assert sorted(torch.round(x * 255).to(torch.uint8).sum().item() for x in streamed) == sorted(
            image.sum().item() for image in pool.int())
        if side == 16:  # lossy, yet the generated image: far closer to the PNG than images of other seeds are
            png = [np.asarray(Image.open(io.BytesIO(exact[i][1])).convert("RGB"), dtype=float) for i in ids]
            own = np.mean([np.abs(pool[k].permute(1, 2, 0).numpy() - png[k]).mean() for k in range(10)])
            other = np.mean([np.abs(pool[k].permute(1, 2, 0).numpy() - png[(k + 1) % 10]).mean() for k in range(10)])
            assert own < other / 2
    with pytest.raises(ValueError, match=r"differs in \['image_format', 'image_quality'\]"):
        generate(tiny_generator, fmnist_fixture, tmp_path / "webp", images_per_class=1)
