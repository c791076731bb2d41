"""Lean checkpoints of the LoRA fine-tunes (only what trains, resume exact, wrong checkpoints refused) and the
fixed-seed sample grids at validation."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from lbgen.callbacks import RNGStateCallback
from lbgen.components import NewGenerator, PretrainedGenerator
from lbgen.datamodules import FashionMNISTDataModule
from lbgen.models import TextToImageSystem
from lbgen.models.lean_checkpoint import LEAN_KEY
from lbgen.models.sample_grid import grid_rows, grid_seeds

from .conftest import TINY_NEW_GENERATOR


def t2i(generator, **kwargs) -> TextToImageSystem:
    torch.manual_seed(0)
    defaults = dict(mode="lora", lora_rank=4, lora_init=False, caption_dropout=0.0,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    return TextToImageSystem(generator, **{**defaults, **kwargs})


def data(fmnist_fixture, **kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, batch_size=4, samples_per_epoch=8,
                                  **kwargs)


def fit(model, datamodule, root, epochs: int, ckpt_path=None, **kwargs) -> L.Trainer:
    """As the CLI trains: RNG states in the checkpoints, a checkpoint (and last.ckpt) after every epoch."""
    torch.manual_seed(0)
    callbacks = [RNGStateCallback(), ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                        **{"logger": False, "limit_val_batches": 0, "callbacks": callbacks, **kwargs})
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lean_checkpoint(model) -> dict:
    """What Lightning writes for ``model``: its state dict passed through its ``on_save_checkpoint``."""
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    return checkpoint


# --- what a checkpoint holds, and its size ---------------------------------------------------------------------------
def test_lora_checkpoint_holds_only_what_trains_and_resumes_exactly(tiny_generator, fmnist_fixture, tmp_path):
    straight = t2i(PretrainedGenerator(str(tiny_generator)), train_text_encoder=True)
    fit(straight, data(fmnist_fixture), tmp_path / "straight", epochs=2)
    first = t2i(PretrainedGenerator(str(tiny_generator)), train_text_encoder=True)
    fit(first, data(fmnist_fixture), tmp_path / "crashed", epochs=1)
    ckpt = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    trainable = lora_weights(first)
    assert set(saved["state_dict"]) == set(trainable)  # the LoRA of UNet and text encoder, nothing frozen
    assert saved[LEAN_KEY]["frozen_prefixes"] == ["unet.", "vae.", "text_encoder."]
    assert saved[LEAN_KEY]["num_dropped"] > 0 and saved[LEAN_KEY]["base_generator"] == str(tiny_generator)
    # size: the weights and AdamW's two moments, plus a small constant (loops, RNG states, marker, zip entries)
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    full_bytes = sum(t.numel() * t.element_size() for t in first.state_dict().values())
    size = ckpt.stat().st_size
    assert size < 4 * trainable_bytes + 200_000 and size < full_bytes / 5, (size, trainable_bytes, full_bytes)
    # load_from_checkpoint: the generator from its source, the LoRA from the checkpoint, no missing-key warnings
    loaded = TextToImageSystem.load_from_checkpoint(ckpt, generator=PretrainedGenerator(str(tiny_generator)),
                                                    weights_only=True)
    for name, weight in lora_weights(loaded).items():
        torch.testing.assert_close(weight, trainable[name], rtol=0, atol=0, msg=name)

    resumed = t2i(PretrainedGenerator(str(tiny_generator)), train_text_encoder=True)
    fit(resumed, data(fmnist_fixture), tmp_path / "crashed", epochs=2, ckpt_path=ckpt)
    expected, got = lora_weights(straight), lora_weights(resumed)
    assert any(not torch.equal(trainable[n], got[n]) for n in got)  # it trained after the resume
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_full_mode_keeps_full_checkpoints():
    model = t2i(NewGenerator(**TINY_NEW_GENERATOR), mode="full")
    checkpoint = lean_checkpoint(model)
    assert not model.lean_checkpoints and LEAN_KEY not in checkpoint
    assert set(checkpoint["state_dict"]) == set(model.state_dict())


# --- what loading refuses ------------------------------------------------------------------------------------------
def test_loading_refuses_missing_trainable_or_unexpected_keys():
    model = t2i(NewGenerator(**TINY_NEW_GENERATOR))
    checkpoint = lean_checkpoint(model)
    lora_key = next(iter(checkpoint["state_dict"]))
    # the lean checkpoint itself loads, by Lightning's hook and by a plain load_state_dict, and nothing is reported
    fresh = t2i(NewGenerator(**TINY_NEW_GENERATOR), lora_init="gaussian")
    fresh.on_load_checkpoint(checkpoint)
    keys = fresh.load_state_dict(checkpoint["state_dict"])
    assert not keys.missing_keys and not keys.unexpected_keys
    torch.testing.assert_close(dict(fresh.named_parameters())[lora_key], checkpoint["state_dict"][lora_key])

    lacking = {**checkpoint, "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k != lora_key}}
    with pytest.raises(ValueError, match=r"lacks 1 trainable weight"):
        fresh.on_load_checkpoint(lacking)
    with pytest.raises(ValueError, match=r"lacks 1 trainable weight"):
        fresh.load_state_dict(lacking["state_dict"])
    extra = {**checkpoint, "state_dict": {**checkpoint["state_dict"], "unet.not_a_weight": torch.zeros(1)}}
    with pytest.raises(ValueError, match=r"does not have.*unet.not_a_weight"):
        fresh.on_load_checkpoint(extra)
    # another rank: the keys are the same, the shapes are not (torch refuses, strict or not)
    with pytest.raises(RuntimeError, match="size mismatch"):
        t2i(NewGenerator(**TINY_NEW_GENERATOR), lora_rank=2).load_state_dict(checkpoint["state_dict"])
    # the text encoder's LoRA trained too: its keys are missing here
    with pytest.raises(ValueError, match="lacks"):
        t2i(NewGenerator(**TINY_NEW_GENERATOR), train_text_encoder=True).on_load_checkpoint(checkpoint)
    # a full-mode system is told the checkpoint is a lean one
    with pytest.raises(ValueError, match="lean"):
        t2i(NewGenerator(**TINY_NEW_GENERATOR), mode="full").on_load_checkpoint(checkpoint)


def test_loading_refuses_another_base_generator_and_accepts_a_moved_one(tiny_generator, tmp_path):
    checkpoint = lean_checkpoint(t2i(NewGenerator(**TINY_NEW_GENERATOR)))
    other = t2i(NewGenerator(**{**TINY_NEW_GENERATOR, "seed": 1}))  # the same architecture, other weights
    with pytest.raises(ValueError, match="other frozen weights under"):
        other.on_load_checkpoint(checkpoint)
    bigger = t2i(NewGenerator(**{**TINY_NEW_GENERATOR, "text_layers": 2}))  # another architecture
    with pytest.raises(ValueError, match="other frozen weights under 'text_encoder.'"):
        bigger.on_load_checkpoint(checkpoint)
    # the same folder copied elsewhere: the same weights under another id, resumed with a warning
    saved = lean_checkpoint(t2i(PretrainedGenerator(str(tiny_generator))))
    moved = tmp_path / "moved"
    shutil.copytree(tiny_generator, moved)
    with pytest.warns(UserWarning, match="frozen weights are the same"):
        t2i(PretrainedGenerator(str(moved))).on_load_checkpoint(saved)
    # the same weights loaded in another dtype are the same base
    t2i(PretrainedGenerator(str(tiny_generator), torch_dtype="bfloat16")).on_load_checkpoint(saved)


# --- sample grids ----------------------------------------------------------------------------------------------------
def test_grid_rows_and_seeds_are_fixed():
    assert grid_rows(10, 3) == [0, 4, 9] and grid_rows(2, 5) == [0, 1] and grid_rows(10, 1) == [0]
    assert grid_seeds(0, 3) == grid_seeds(0, 3) != grid_seeds(1, 3) and len(set(grid_seeds(0, 3))) == 3
    with pytest.raises(ValueError, match="sample_grid_classes"):
        t2i(NewGenerator(**TINY_NEW_GENERATOR), sample_grid_classes=-1)


@pytest.mark.slow
def test_validation_grids_are_saved_logged_and_leave_training_alone(tiny_generator, fmnist_fixture, tmp_path):
    """Grids at every validation (PNG in the run directory, image in TensorBoard) drawn from their own generators:
    the run with grids trains the very weights of the run without."""
    kwargs = dict(limit_val_batches=1, check_val_every_n_epoch=1)
    plain = t2i(PretrainedGenerator(str(tiny_generator)))
    fit(plain, data(fmnist_fixture, val_per_class=1), tmp_path / "plain", epochs=2, **kwargs)
    gridded = t2i(PretrainedGenerator(str(tiny_generator)), sample_grid_classes=3, sample_grid_seeds=2,
                  sample_grid_steps=2)
    logger = TensorBoardLogger(tmp_path / "tb", name="")
    fit(gridded, data(fmnist_fixture, val_per_class=1), tmp_path / "grid", epochs=2, logger=logger, **kwargs)
    for name, weight in lora_weights(plain).items():
        torch.testing.assert_close(lora_weights(gridded)[name], weight, rtol=0, atol=0, msg=name)
    run = tmp_path / "tb" / "version_0"
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [p.name for p in grids] == ["step_2.png", "step_4.png"]
    first, second = (Image.open(p) for p in grids)
    assert first.size == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2)  # 2 seeds x 3 classes of 16 px, 2 px padding
    assert first.tobytes() != second.tobytes()  # the LoRA trained in between: the same noise, other images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Images("val/samples")] == [2, 4]
    # the same weights and seeds give the same grid again
    again = t2i(PretrainedGenerator(str(tiny_generator)), sample_grid_classes=3, sample_grid_seeds=2,
                sample_grid_steps=2)
    csv = CSVLogger(tmp_path / "csv", name="")
    trainer = L.Trainer(accelerator="cpu", logger=csv, enable_progress_bar=False, limit_val_batches=1,
                        enable_model_summary=False)
    again.load_state_dict(lean_checkpoint(gridded)["state_dict"])
    trainer.validate(again, datamodule=data(fmnist_fixture, val_per_class=1))
    (repeat,) = (tmp_path / "csv" / "version_0" / "samples").glob("step_0.png")
    assert Image.open(repeat).tobytes() == second.tobytes()
    # drawing a grid leaves the global random stream where it was (its generators are its own)
    state = torch.get_rng_state()
    again.on_validation_epoch_end()
    assert torch.equal(torch.get_rng_state(), state)
    assert Image.open(repeat).tobytes() == second.tobytes()
