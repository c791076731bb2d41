"""Generator training systems: what trains in each mode, LoRA round trip, VAE stage, saved folders."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from lbgen.components import NewGenerator, PretrainedGenerator
from lbgen.components.diffusion import load_generator
from lbgen.components.prompts import fill_caption
from lbgen.datamodules import FashionMNISTDataModule
from lbgen.models import AutoencoderSystem, TextToImageSystem

from .conftest import TINY_NEW_GENERATOR


def _data(fmnist_fixture, **kwargs):
    return FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, batch_size=8, **kwargs)


def _fit_one_step(model, data, tmp_path, **kwargs):
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, **kwargs).fit(model, data)


@pytest.mark.parametrize(("mode", "text", "expected"), [
    ("lora", False, {"unet": "lora"}),
    ("lora", True, {"unet": "lora", "text_encoder": "lora"}),
    ("full", False, {"unet": "all"}),
    ("scratch", False, {"unet": "all", "text_encoder": "all"}),
])
def test_one_step_changes_exactly_the_trainable_parameters(mode, text, expected, tiny_generator, fmnist_fixture,
                                                           tmp_path):
    torch.manual_seed(0)
    model = TextToImageSystem(PretrainedGenerator(str(tiny_generator)), mode=mode, train_text_encoder=text,
                               lora_rank=4, lora_init=False, caption_dropout=0.0,
                               optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))  # Adam: any gradient moves a weight
    names = model.trainable_parameter_names()
    for part in ("unet", "text_encoder", "vae"):
        chosen = [n for n in names if n.startswith(part + ".")]
        if expected.get(part) == "lora":
            assert chosen and all("lora_" in n for n in chosen), part
        elif expected.get(part) == "all":
            assert len(chosen) == sum(1 for n, _ in getattr(model, part).named_parameters()), part
        else:
            assert not chosen, part
    # counted independently of requires_grad: the LoRA weights of a LoRA part, every weight of a fully trained one
    expected_count = sum(p.numel() for part, what in expected.items()
                         for n, p in getattr(model, part).named_parameters() if what == "all" or "lora_" in n)
    assert model.num_trainable == expected_count
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _fit_one_step(model, _data(fmnist_fixture, shots=2), tmp_path)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)  # every trainable parameter moved, nothing else did


def test_captions_from_templates_and_from_the_batch(tiny_generator):
    model = TextToImageSystem(PretrainedGenerator(str(tiny_generator)), mode="lora", lora_rank=2,
                               class_names=["T-shirt/top", "Bag"], superclass="garment",
                               prompt_template="a photo of a {class}, a {superclass}")
    assert model.captions_for({"image": None, "label": torch.tensor([1, 0])}) == [
        "a photo of a Bag, a garment", "a photo of a T-shirt/top, a garment"]
    assert model.captions_for({"label": torch.tensor([0]), "caption": ["own caption"]}) == ["own caption"]
    assert fill_caption("a photo of a {class}", "Coat") == "a photo of a Coat"


def test_training_step_back_propagates_the_training_loss(tiny_generator, monkeypatch):
    model = TextToImageSystem(PretrainedGenerator(str(tiny_generator)), mode="lora", lora_rank=2,
                               class_names=["T-shirt/top", "Bag"])
    training_loss, returned = model.training_loss, []
    monkeypatch.setattr(model, "training_loss", lambda *args: returned.append(training_loss(*args)) or returned[-1])
    loss = model.training_step({"image": torch.rand(2, 3, 16, 16), "label": torch.tensor([0, 1])}, 0)
    assert loss is returned[0][0] and set(returned[0][1]) == {"denoising"} and loss.requires_grad


@pytest.mark.slow
def test_lora_save_then_load_gives_identical_images(tiny_generator, fmnist_fixture, tmp_path):
    torch.manual_seed(0)
    model = TextToImageSystem(PretrainedGenerator(str(tiny_generator)), mode="lora", train_text_encoder=True,
                               lora_rank=4, lora_init=False, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    _fit_one_step(model, _data(fmnist_fixture, shots=2), tmp_path)
    model.save(tmp_path / "lora")

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(["a photo of a Bag"], num_inference_steps=3, guidance_scale=2.0, height=16, width=16,
                    output_type="np", generator=torch.Generator().manual_seed(3)).images

    trained = StableDiffusionPipeline(**{**model.pipeline.components})
    reference = sample(trained)
    loaded = load_generator(str(tiny_generator), lora=str(tmp_path / "lora"))
    np.testing.assert_allclose(sample(loaded), reference, atol=1e-5)
    base = sample(load_generator(str(tiny_generator)))
    assert np.abs(base - reference).max() > 1e-3  # the LoRA does change the images


@pytest.mark.slow
def test_vae_stage_then_scratch_generator_is_a_diffusers_folder(fmnist_fixture, tmp_path):
    torch.manual_seed(0)
    vae_system = AutoencoderSystem(image_size=16, block_out_channels=(16, 32), output_dir=str(tmp_path / "vae"))
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              default_root_dir=tmp_path).fit(vae_system, _data(fmnist_fixture))
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", local_files_only=True)
    # saved as estimated, and estimated: moved off the 1.0 it starts from
    assert vae.config.scaling_factor == pytest.approx(vae_system.scaling_factor) != 1.0
    generator = NewGenerator(vae=str(tmp_path / "vae"), **TINY_NEW_GENERATOR)
    model = TextToImageSystem(generator, mode="scratch", ema_decay=0.9, output_dir=str(tmp_path / "gen"))
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              default_root_dir=tmp_path).fit(model, _data(fmnist_fixture))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "gen", local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(vae_system.scaling_factor)
    # the saved UNet is the EMA one, not the raw weights
    raw = dict(model.unet.named_parameters())
    saved = dict(pipe.unet.named_parameters())
    assert any(not torch.allclose(raw[n].float(), saved[n]) for n in saved)


def test_vae_trained_total_is_the_weighted_sum_of_every_term(fmnist_fixture):
    """``training_loss``'s total (what ``training_step`` back-propagates) carries every term's gradient, weighted;
    each term reaches the encoder."""
    system = AutoencoderSystem(image_size=16, block_out_channels=(16, 32), mse_weight=0.5, l1_weight=1.5,
                                kl_weight=1e-3)
    total, terms, latents = system.training_loss(torch.rand(2, 3, 16, 16),
                                                 [torch.Generator().manual_seed(i) for i in range(2)])
    assert set(terms) == set(system.weights) == {"mse", "l1", "kl"} and latents.shape == (2, 4, 8, 8)
    trainable = list(system.vae.parameters())
    encoder = torch.cat([torch.full((p.numel(),), n.startswith("encoder.")) for n, p in system.vae.named_parameters()])

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, trainable, retain_graph=True, materialize_grads=True)
        return torch.cat([g.flatten() for g in grads])

    full, parts = gradient(total), {name: gradient(term) for name, term in terms.items()}
    for name, part in parts.items():
        assert part[encoder].abs().sum() > 0, f"{name} does not reach the encoder"
        assert not torch.allclose(full, full - system.weights[name] * part, rtol=1e-3, atol=1e-6), name
    torch.testing.assert_close(full, sum(system.weights[n] * g for n, g in parts.items()), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="All loss weights are 0"):
        AutoencoderSystem(mse_weight=0, l1_weight=0, kl_weight=0)


def test_bf16_mixed_keeps_frozen_parts_low_and_trainable_fp32(tiny_generator, fmnist_fixture, tmp_path):
    torch.manual_seed(0)
    model = TextToImageSystem(PretrainedGenerator(str(tiny_generator)), mode="lora", lora_rank=4, lora_init=False)
    _fit_one_step(model, _data(fmnist_fixture, shots=2), tmp_path, precision="bf16-mixed")
    for name, param in model.named_parameters():
        expected = torch.float32 if param.requires_grad else torch.bfloat16
        assert param.dtype == expected, name
    assert any(p.requires_grad for p in model.unet.parameters())
