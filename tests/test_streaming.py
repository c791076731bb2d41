"""Streaming synthetic data: every image once per epoch over processes and workers, flat memory, the in-memory
mode's features (union, view, max_per_class, long tail, mixing), resume, damaged shards."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from lbgen.datamodules import FASHION_MNIST_CLASSES, FashionMNISTDataModule, MixedDataModule, SyntheticDataModule
from lbgen.datamodules.streaming import (
    StreamingDataset,
    StreamingLoader,
    batches_before,
    epoch_sequence,
    worker_counts,
)
from lbgen.storage.dataset_format import SHARD_DIR, complete_shards, write_images_as_dataset

NAMES = FASHION_MNIST_CLASSES  # the real fixture's classes: the sets mix with it


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_set(folder: Path, per_class: int = 7, shard_size: int = 9, classes: int = 10) -> Path:
    """A dataset folder whose pixel value encodes the image (class * 20 + index), shards of uneven fill."""
    images = [(c, png(c * 20 + i)) for c in range(classes) for i in range(per_class)]
    write_images_as_dataset(folder, NAMES[:classes], images, shard_size)
    return folder


def stream_of(data: SyntheticDataModule, **kwargs) -> StreamingDataset:
    data.setup("fit")
    return data.train_dataset if not kwargs else data.stream(train=True, **kwargs)


def read_all(dataset: StreamingDataset, processes: int, workers: int, batch_size: int) -> list[list[list[int]]]:
    """The ``index`` of every sample of one epoch, per process and batch (each process read as its own loader)."""
    out = []
    for rank in range(processes):
        dataset.layout = (processes, rank)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        batches = [b["index"].tolist() for b in loader]
        assert len(batches) == len(loader)  # Lightning's epoch length is the loader's
        out.append(batches)
    return out


def test_worker_counts_give_whole_batches_and_the_loaders_length():
    for total, batch, workers in ((31, 4, 2), (8, 4, 3), (3, 4, 2), (40, 5, 4), (0, 4, 2)):
        counts = worker_counts(total, batch, workers)
        assert sum(counts) == total and sum(-(-c // batch) for c in counts) == -(-total // batch)
    assert batches_before(5, [3, 2, 1]) == [2, 2, 1]
    assert batches_before(4, [3, 1, 0]) == [3, 1, 0] and batches_before(9, [3, 1, 0]) == [3, 1, 0]  # all done


@pytest.mark.parametrize("processes,workers", [(1, 1), (2, 2), (3, 2)])
def test_every_image_exactly_once_per_epoch_over_processes_and_workers(tmp_path, processes, workers):
    data = SyntheticDataModule(str(make_set(tmp_path / "set")), image_size=8, mode="stream", batch_size=4,
                               shuffle_buffer=16)
    dataset = stream_of(data)
    seen = read_all(dataset, processes, workers, 4)
    flat = [i for rank in seen for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == 70 - 70 % processes  # no repeat; the remainder dropped, and counted
    assert dataset.dropped_per_epoch(processes) == 70 % processes
    assert len({len(rank) for rank in seen}) == 1  # every process takes the same number of steps (DDP)


def test_order_is_seeded_by_epoch_and_differs_between_epochs(tmp_path):
    data = SyntheticDataModule(str(make_set(tmp_path / "set")), image_size=8, mode="stream", batch_size=5)
    dataset = stream_of(data)
    first = read_all(dataset, 2, 2, 5)
    assert read_all(dataset, 2, 2, 5) == first  # same seed and epoch: same batches
    dataset.epoch = 1
    second = read_all(dataset, 2, 2, 5)
    assert second != first and sorted(sum(sum(second, []), [])) != []
    index = data.index
    assert not np.array_equal(epoch_sequence(index, 0, 0, True), epoch_sequence(index, 0, 1, True))


def test_samples_decode_label_and_key_like_the_in_memory_mode(tmp_path):
    folder = make_set(tmp_path / "set", per_class=3)
    streamed = SyntheticDataModule(str(folder), image_size=8, mode="stream", augmentation="none", batch_size=4)
    memory = SyntheticDataModule(str(folder), image_size=8, mode="memory", augmentation="none", batch_size=4)
    memory.setup("fit")
    by_value = {int(memory.train_dataset[i]["image"][0, 0, 0] * 255): memory.train_dataset[i]["label"]
                for i in range(len(memory.train_dataset))}
    samples = list(stream_of(streamed))
    assert len(samples) == 30 and len({s["sample_key"] for s in samples}) == 30
    for s in samples:
        value = round(float(s["image"][0, 0, 0]) * 255)
        assert by_value[value] == s["label"] == value // 20 and s["source"] == 1
    assert streamed.train_class_counts == memory.train_class_counts == [3] * 10


def test_union_view_max_per_class_in_streaming_mode(tmp_path):
    a, b = make_set(tmp_path / "a", per_class=4), make_set(tmp_path / "b", per_class=2)
    union = SyntheticDataModule([str(a), str(b)], image_size=8, mode="stream")
    assert union.train_class_counts == [6] * 10 and len(union.index.shards) == len(complete_shards(a)) + 1 + len(
        complete_shards(b)) - 1
    capped = SyntheticDataModule([str(a), str(b)], image_size=8, mode="stream", max_per_class=3)
    assert capped.train_class_counts == [5] * 10  # 3 from a, 2 from b
    memory = SyntheticDataModule([str(a), str(b)], image_size=8, mode="memory", max_per_class=3)
    assert memory.train_class_counts == capped.train_class_counts
    (a / "views").mkdir()
    kept = [f"c{c:04d}-i{i:06d}" for c in range(10) for i in (0, 2)]
    (a / "views" / "some.json").write_text(json.dumps({"n_total": 40, "kept": kept}))
    view = SyntheticDataModule(str(a), image_size=8, mode="stream", view="some", augmentation="none")
    values = sorted(round(float(s["image"][0, 0, 0]) * 255) for s in stream_of(view))
    assert values == sorted(c * 20 + i for c in range(10) for i in (0, 2))


def test_auto_mode_streams_above_the_memory_limit(tmp_path, caplog):
    folder = make_set(tmp_path / "set", per_class=2)
    assert SyntheticDataModule(str(folder), image_size=8).mode == "memory"
    assert SyntheticDataModule(str(folder), image_size=8, memory_limit_gb=1e-6).mode == "stream"
    with pytest.raises(ValueError, match="keeps no records"):
        _ = SyntheticDataModule(str(folder), image_size=8, mode="stream").records


def test_mixed_streaming_keeps_every_real_and_synthetic_image_once(tmp_path, fmnist_fixture):
    folder = make_set(tmp_path / "set", per_class=4)
    real = FashionMNISTDataModule(root=str(fmnist_fixture), shots=3, image_size=8, batch_size=6)
    synthetic = SyntheticDataModule(str(folder), image_size=8, mode="stream", batch_size=6)
    mixed = MixedDataModule(real, synthetic)
    mixed.setup("fit")
    stream = mixed.train_dataset
    stream.synthetic.layout = (1, 0)
    samples = list(DataLoader(stream, batch_size=6, num_workers=2, collate_fn=lambda b: b))
    flat = [s for batch in samples for s in batch]
    sources = [s["source"] for s in flat]
    assert sources.count(1) == 40 and sources.count(0) == 30 and len(samples) == len(DataLoader(stream, 6))
    assert len({(s["source"], s["index"]) for s in flat}) == 70
    assert any(0 < sum(s["source"] for s in batch) < len(batch) for batch in samples)  # batches mix the two
    fraction = MixedDataModule(real, SyntheticDataModule(str(folder), image_size=8, mode="stream", batch_size=6),
                               synthetic_fraction=0.75, samples_per_epoch=48)
    fraction.setup("fit")
    drawn = [s["source"] for s in fraction.train_dataset]
    assert len(drawn) == 48 and drawn.count(1) == 36
    tail = MixedDataModule(FashionMNISTDataModule(root=str(fmnist_fixture), imbalance_factor=10, max_per_class=20,
                                                  image_size=8, batch_size=6),
                           SyntheticDataModule(str(folder), image_size=8, mode="stream"), synthetic_below=5)
    tail.setup("fit")
    labels = {s["label"] for s in tail.train_dataset if s["source"] == 1}
    assert labels and labels == {c for c, n in enumerate(tail.real.train_class_counts) if n < 5}


def test_a_truncated_shard_stops_with_its_path_and_the_last_good_sample(tmp_path):
    folder = make_set(tmp_path / "set", per_class=3, shard_size=30)
    (shard,) = sorted((folder / SHARD_DIR).glob("*.tar"))[:1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    data = SyntheticDataModule(str(folder), image_size=8, mode="stream", shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"truncated|damaged") as raised:
        list(stream_of(data))
    assert str(shard) in str(raised.value) and re.search(r"'c000\d-i00000\d'", str(raised.value))


def test_a_bad_image_is_skipped_only_when_asked(tmp_path):
    folder = tmp_path / "set"
    images = [(c, png(c) if (c, i) != (3, 1) else b"not an image") for c in range(2) for i in range(3)]
    images = [(c % 2, data) for c, data in images] + [(1, b"not a png")]
    write_images_as_dataset(folder, NAMES[:2], images, 4)
    with pytest.raises(ValueError, match="cannot be decoded"):
        list(stream_of(SyntheticDataModule(str(folder), image_size=8, mode="stream")))
    with pytest.warns(UserWarning, match=r"skipped 'c0001-i000003'.*1 skipped"):
        kept = list(stream_of(SyntheticDataModule(str(folder), image_size=8, mode="stream", skip_bad_samples=True)))
    # replaced by a good neighbour: the worker yields its planned count (DDP processes keep equal steps)
    assert len(kept) == 7 and len({s["index"] for s in kept}) == 6


class Recorder(L.Callback):
    """The sample indices of every training batch, and optionally a crash after a given step."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.crash_after = crash_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.crash_after is not None and trainer.global_step == self.crash_after:
            raise Crash  # after step crash_after's checkpoint, before the next step
        self.batches.append(batch["index"].tolist())


class Crash(Exception):
    """A process killed between two steps."""


def _fit(folder: Path, root: Path, recorder: Recorder, ckpt_path: str | None = None) -> None:
    from lbgen.components import TimmBackbone
    from lbgen.models import ClassifierSystem

    L.seed_everything(0)
    data = SyntheticDataModule(str(folder), image_size=8, mode="stream", batch_size=4, shuffle_buffer=8,
                               num_workers=2)
    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True,
                                                     save_top_k=-1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[recorder, checkpoint], default_root_dir=root, enable_model_summary=False)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_neither_loses_nor_repeats_a_sample(tmp_path):
    folder = make_set(tmp_path / "set", per_class=3)  # 30 images: 8 batches of 4 per epoch, 2 epochs
    whole = Recorder()
    _fit(folder, tmp_path / "whole", whole)
    killed = Recorder(crash_after=11)  # in the second epoch, after its third batch
    with pytest.raises(Crash):
        _fit(folder, tmp_path / "killed", killed)
    resumed = Recorder()
    _fit(folder, tmp_path / "killed", resumed, ckpt_path=str(tmp_path / "killed" / "ckpt" / "last.ckpt"))
    assert len(whole.batches) == 16 and killed.batches == whole.batches[:11]
    assert resumed.batches == whole.batches[11:]
    per_epoch = [sorted(sum(whole.batches[e * 8:(e + 1) * 8], [])) for e in (0, 1)]
    assert per_epoch[0] == per_epoch[1] == list(range(30))



@pytest.mark.parametrize("skip", [1, 3, 4])
def test_a_resumed_epoch_gives_the_batches_left_in_order(tmp_path, fmnist_fixture, skip):
    folder = make_set(tmp_path / "set", per_class=3)
    dataset = stream_of(SyntheticDataModule(str(folder), image_size=8, mode="stream", batch_size=4))
    real = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, image_size=8, batch_size=4)
    mixed = MixedDataModule(real, SyntheticDataModule(str(folder), image_size=8, mode="stream", batch_size=4))
    mixed.setup("fit")
    for stream in (dataset, mixed.train_dataset):
        def batches(skip_batches: int, stream=stream) -> list[list[tuple[int, int]]]:
            loader = StreamingLoader(stream, lambda n: (2, skip_batches), batch_size=4, num_workers=3)
            return [list(zip(b["source"].tolist(), b["index"].tolist(), strict=True)) for b in loader]

        whole = batches(0)
        assert batches(skip) == whole[skip:]


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import lightning as L
from lbgen.components import TimmBackbone
from lbgen.datamodules import SyntheticDataModule
from lbgen.models import ClassifierSystem


class Seen(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["index"].tolist())

    def on_train_end(self, trainer, pl_module):
        out = Path(sys.argv[2]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.seen))


L.seed_everything(0)
data = SyntheticDataModule(sys.argv[1], image_size=8, mode="stream", batch_size=4, num_workers=2)
model = ClassifierSystem(TimmBackbone("test_efficientnet_gn"), num_classes=10)
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, callbacks=[Seen()])
trainer.fit(model, datamodule=data)
"""


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ddp_processes_with_two_workers_read_every_image_once(tmp_path):
    import os
    import subprocess
    import sys

    folder = make_set(tmp_path / "set", per_class=3, shard_size=7)  # 30 images in uneven shards
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(folder), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 15 images each: 4 batches of 4, the same steps on both
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert sorted(seen) == list(range(30))  # every image once over 2 processes x 2 workers


def test_real_shards_read_like_generated_ones_with_source_real(tmp_path):
    from lbgen.storage.real_shards import shard_image_folder

    for c, name in enumerate(NAMES[:3]):
        (tmp_path / "folder" / name.replace("/", "_")).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 60 * c + i, np.uint8)).save(tmp_path / "folder" / name.replace(
                "/", "_") / f"{i}.png")
    shard_image_folder(tmp_path / "folder", tmp_path / "real", shard_size=5)
    for mode in ("memory", "stream"):
        real = SyntheticDataModule(str(tmp_path / "real"), image_size=8, mode=mode, augmentation="none")
        real.setup("fit")
        samples = [real.train_dataset[i] for i in range(12)] if mode == "memory" else list(real.train_dataset)
        assert {s["source"] for s in samples} == {0} and len(samples) == 12
        assert sorted(round(float(s["image"][0, 0, 0]) * 255) for s in samples) == sorted(
            60 * c + i for c in range(3) for i in range(4))
    generated = tmp_path / "generated"  # generated for the real set's classes (its folder names, sorted)
    write_images_as_dataset(generated, real.class_names, [(c, png(c)) for c in range(3) for _ in range(2)], 4)
    both = SyntheticDataModule([str(tmp_path / "real"), str(generated)], image_size=8, mode="stream")
    assert sorted(s["source"] for s in stream_of(both)) == [0] * 12 + [1] * 6
    with pytest.raises(ValueError, match="mix real and generated"):
        SyntheticDataModule([str(tmp_path / "real"), str(generated)], image_size=8, mode="memory")


def test_a_classifier_trains_and_tests_on_real_plus_streamed_synthetic(tmp_path, fmnist_fixture):
    from lbgen.components import TimmBackbone
    from lbgen.models import ClassifierSystem

    folder = make_set(tmp_path / "set", per_class=3)
    real = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, image_size=8, batch_size=4, val_per_class=1)
    mixed = MixedDataModule(real, SyntheticDataModule(str(folder), image_size=8, mode="stream"),
                            synthetic_fraction=0.5, samples_per_epoch=24)
    model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=mixed)
    assert trainer.global_step == 12  # 24 samples, batch 4, 2 epochs
    trainer.test(model, datamodule=mixed)
    assert trainer.num_test_batches == [4]  # the real test set (60 images, batches of 16) stays the test


@pytest.mark.slow
def test_streaming_and_in_memory_modes_train_to_the_same_accuracy(tmp_path, fmnist_fixture):
    """The two modes read the same images in different orders (by design: shards vs a global permutation), so the
    weights differ; the accuracy must not (tolerance: 10 points on the 60 test images, a fifth of the gain)."""
    from lbgen.components import TimmBackbone
    from lbgen.datamodules.fashion_mnist import load_fashion_mnist
    from lbgen.models import ClassifierSystem

    images, labels = load_fashion_mnist(str(fmnist_fixture), "train", 16)
    encoded = []
    for image, label in zip(images, labels, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).convert("RGB").save(buffer, format="PNG")
        encoded.append((int(label), buffer.getvalue()))
    write_images_as_dataset(tmp_path / "set", list(FASHION_MNIST_CLASSES), encoded, 37)  # 300 images, uneven shards
    accuracy = {}
    for mode in ("memory", "stream"):
        L.seed_everything(0)
        real = FashionMNISTDataModule(root=str(fmnist_fixture), shots=1, image_size=16, batch_size=20)
        mixed = MixedDataModule(real, SyntheticDataModule(str(tmp_path / "set"), image_size=16, mode=mode),
                                synthetic_fraction=1.0, samples_per_epoch=300)
        model = ClassifierSystem(TimmBackbone("test_resnet"), num_classes=10)
        trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, default_root_dir=tmp_path / mode)
        trainer.fit(model, datamodule=mixed)
        accuracy[mode] = trainer.test(model, datamodule=mixed, verbose=False)[0]["test/acc"]
    assert min(accuracy.values()) > 0.5, accuracy  # both learned (chance: 0.1)
    assert abs(accuracy["memory"] - accuracy["stream"]) <= 0.10 + 1e-6, accuracy  # one test image of ten: float slack


def test_an_error_in_a_loader_worker_is_still_one_message(tmp_path):
    from lbgen.cli import user_error_message

    folder = make_set(tmp_path / "set", per_class=3, shard_size=30)
    (shard,) = sorted((folder / SHARD_DIR).glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    data = SyntheticDataModule(str(folder), image_size=8, mode="stream", num_workers=1, batch_size=4)
    data.setup("fit")
    with pytest.raises(ValueError) as raised:
        list(data.train_dataloader())
    message = user_error_message(raised.value)
    assert message is not None and str(shard) in message and "truncated" in message
    assert "Original Traceback" not in message and message.endswith("regenerate the dataset.")
