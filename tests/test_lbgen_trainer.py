"""lbGen fine-tuning with tiny real models: gradients through sampling, every term reaches the LoRA, alternation,
only LoRA and discriminator train, the saved LoRA loads in diffusers, resume continues exactly."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lbgen.components.clip import ClipScorer
from lbgen.components.diffusion import PretrainedGenerator, load_generator
from lbgen.components.lora import LORA_FILE, TRAINING_RECORD
from lbgen.components.sampling import SAMPLERS, make_sampler, sample_latents
from lbgen.datamodules.class_names import BalancedLabels, ClassNamesDataModule, read_class_names
from lbgen.losses import QualityLoss
from lbgen.models.lbgen_finetune import LbGenSystem
from lbgen.models.lean_checkpoint import LEAN_KEY

from .test_alignment_components import TINY_CLIP

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


def make_trainer(generator_folder, weights=(1.0, 1.0, 0.1), **kwargs) -> LbGenSystem:
    torch.manual_seed(0)
    en, inst, q = weights
    clip = ClipScorer(model_config=TINY_CLIP, pretrained=None) if en or inst else None
    quality = QualityLoss("cnniqa", metric_kwargs={"pretrained": None}) if q else None
    defaults = dict(lora_rank=4, lora_init=False, num_inference_steps=4, grad_steps=2, guidance_scale=2.0,
                    discriminator_hidden=16, class_names=CLASSES)
    return LbGenSystem(PretrainedGenerator(str(generator_folder)), clip=clip, quality=quality, en_weight=en,
                        in_weight=inst, q_weight=q, **{**defaults, **kwargs})


def lora_parameters(system: LbGenSystem) -> dict[str, torch.Tensor]:
    return {n: p for n, p in system.unet.named_parameters() if p.requires_grad}


def loss_gradients(system: LbGenSystem) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LoRA gradients of ``training_loss``'s total (what the generator step back-propagates) and of each of its
    named terms, from one graph of one fixed batch (same noise every call)."""
    labels = torch.tensor([0, 3])
    images = system.generate(labels, seed=7)
    features = system.clip.encode_images(images).float() if system.clip is not None else None
    total, terms = system.training_loss(images, labels, features)
    lora = list(lora_parameters(system).values())

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, lora, retain_graph=True, materialize_grads=True)
        return torch.cat([g.flatten() for g in grads])

    return gradient(total), {name: gradient(term) for name, term in terms.items()}


def test_every_weighted_term_changes_the_lora_gradient_of_the_trained_total(tiny_generator):
    """The total ``training_step`` back-propagates is the weighted sum of every non-zero term, each of which moves
    the LoRA gradient. Mutation checked: with ``training_loss`` returning ``self.weights["en"] * terms["en"]`` (the
    official code's bug: only L_en back-propagated) this test fails at the ``assert_close`` of the total."""
    system = make_trainer(tiny_generator, weights=(0.7, 1.3, 0.2))  # not 1: a dropped weight fails too
    total, terms = loss_gradients(system)
    assert set(terms) == {"en", "in", "q"} and set(system.weights) == set(terms)
    for name, gradient in terms.items():
        assert gradient.abs().sum() > 0, f"L_{name} does not reach the LoRA"
        contribution = system.weights[name] * gradient  # not negligible: leaving L_{name} out changes what trains
        assert not torch.allclose(total, total - contribution, rtol=1e-3, atol=1e-6), f"L_{name} is negligible"
    weighted = sum(system.weights[name] * gradient for name, gradient in terms.items())
    torch.testing.assert_close(total, weighted, rtol=1e-3, atol=1e-6,
                               msg="the total is not the weighted sum of its terms")


def test_gradients_flow_only_through_the_last_k_steps(tiny_generator):
    pipe = load_generator(str(tiny_generator))
    unet = pipe.unet
    calls = []
    unet.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 16, 16)
    out = sample_latents(unet, make_sampler("ddim", pipe.scheduler.config), latents, hidden, hidden * 0, 2.0,
                         num_steps=5, grad_steps=2)
    assert calls == [False, False, False, True, True] and out.requires_grad
    with pytest.raises(ValueError, match="grad_steps"):
        sample_latents(unet, make_sampler("ddim", pipe.scheduler.config), latents, hidden, None, 1.0, 3, 4)
    with pytest.raises(ValueError, match="sampler"):
        make_sampler("plms", pipe.scheduler.config)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_generator):
    weights = (0.0, 1.0, 0.1)
    plain, _ = loss_gradients(make_trainer(tiny_generator, weights))
    checkpointed, _ = loss_gradients(make_trainer(tiny_generator, weights, gradient_checkpointing=True))
    torch.testing.assert_close(plain, checkpointed, rtol=1e-4, atol=1e-7)


def test_zero_weight_terms_and_their_models_are_not_built(tiny_generator):
    system = make_trainer(tiny_generator, weights=(1.0, 0.0, 0.0))
    assert set(system.weights) == {"en"} and system.quality is None and system.instance_alignment is None
    system = make_trainer(tiny_generator, weights=(0.0, 0.0, 0.5))
    assert system.clip is None and system.dataset_alignment is None
    with pytest.raises(ValueError, match="CLIP"):
        LbGenSystem(PretrainedGenerator(str(tiny_generator)), clip=None, quality=None, en_weight=1, in_weight=0,
                     q_weight=0, lora_rank=2, class_names=CLASSES)
    with pytest.raises(ValueError, match="grad_steps"):
        make_trainer(tiny_generator, grad_steps=5, num_inference_steps=4)


def fit(system: LbGenSystem, tmp_path, batches: int, max_steps: int = -1, ckpt_path=None, **trainer_kwargs):
    data = ClassNamesDataModule(class_names=CLASSES, batch_size=2, samples_per_epoch=2 * batches, val_per_class=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=max_steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        **{"enable_checkpointing": False, **trainer_kwargs})
    trainer.fit(system, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_alternates_discriminator_and_generator_and_trains_only_lora_and_discriminator(tiny_generator, tmp_path,
                                                                                      monkeypatch):
    """Also: every generator step back-propagates exactly ``training_loss``'s total (the tensor itself). Mutation
    checked: with ``training_step`` back-propagating ``terms["en"]`` instead, the ``backpropagated`` check fails."""
    system = make_trainer(tiny_generator, discriminator_warmup_steps=1, output_dir=str(tmp_path / "lora"))
    before = {n: p.detach().clone() for n, p in system.named_parameters()}
    seen, totals, backpropagated = [], [], []
    training_loss, manual_backward = system.training_loss, system.manual_backward

    def recorded_training_loss(*args: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = training_loss(*args)
        totals.append(total)
        return total, terms

    def recorded_backward(loss: torch.Tensor, *args, **kwargs) -> None:
        backpropagated.append(loss)
        manual_backward(loss, *args, **kwargs)

    monkeypatch.setattr(system, "training_loss", recorded_training_loss)
    monkeypatch.setattr(system, "manual_backward", recorded_backward)

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})

    trainer = fit(system, tmp_path, batches=3, callbacks=[Spy()])
    assert trainer.global_step == 1 + 2 * 2  # warm-up: discriminator only; then discriminator + generator
    # backward calls: discriminator (warm-up), then discriminator + generator twice; each generator call gets the
    # total its step's training_loss returned, nothing else
    assert len(totals) == 2 and len(backpropagated) == 5
    assert all(b is t for b, t in zip(backpropagated[2::2], totals, strict=True)), "not training_loss's total"
    lora_names = [n for n in seen[0] if n.startswith("unet.")]
    disc_names = [n for n in seen[0] if n.startswith("dataset_alignment.")]
    assert lora_names and disc_names
    assert all(torch.equal(seen[0][n], before[n]) for n in lora_names)  # warm-up step left the LoRA alone
    for previous, current in zip(seen, seen[1:], strict=False):
        assert any(not torch.equal(previous[n], current[n]) for n in lora_names)
        assert any(not torch.equal(previous[n], current[n]) for n in disc_names)
    after = dict(system.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(("lora_" in n and n.startswith("unet.")) or n.startswith("dataset_alignment.")
                           for n in changed)
    # the LoRA opens in diffusers through lbgen's generator source, and changes the images
    assert (tmp_path / "lora" / LORA_FILE).is_file()
    record = json.loads((tmp_path / "lora" / TRAINING_RECORD).read_text())
    assert record["sampler"] == "ddim" and record["num_inference_steps"] == 4
    assert record["base_generator"] == str(tiny_generator)
    base = load_generator(str(tiny_generator))
    tuned = PretrainedGenerator(str(tiny_generator), lora=str(tmp_path / "lora"))()
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    a = base(["Coat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = tuned(["Coat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.allclose(a, b)


def test_resume_from_a_checkpoint_reaches_the_same_lora(tiny_generator, tmp_path):
    straight = make_trainer(tiny_generator, discriminator_warmup_steps=1)
    fit(straight, tmp_path / "a", batches=4)
    first = make_trainer(tiny_generator, discriminator_warmup_steps=1)
    # a checkpoint written during training, mid-epoch (after 2 of 4 batches = 3 optimizer steps), then a "crash"
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="mid", every_n_train_steps=3, save_top_k=-1)
    fit(first, tmp_path / "b", batches=4, max_steps=3, callbacks=[every], enable_checkpointing=True)
    ckpt = tmp_path / "ckpt" / "mid.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    saved = checkpoint["state_dict"]
    assert saved and all("lora_" in k or k.startswith("dataset_alignment.") or k == "steps_done" for k in saved)
    # lean: the LoRA, the discriminator (with en_center its running feature means too) and the step; no frozen
    # generator, CLIP or quality weight
    frozen = ("unet.", "vae.", "text_encoder.", "clip.", "quality.")
    lora = {n for n, p in first.unet.named_parameters(prefix="unet") if p.requires_grad}
    discriminator = {n for n in first.state_dict() if n.startswith("dataset_alignment.")}
    # its running feature means exist only with en_center (then checkpointed: tests/test_transfer_study.py)
    assert ({"dataset_alignment.image_mean", "dataset_alignment.text_mean"} <= discriminator) == bool(
        first.dataset_alignment.center)
    assert set(saved) == lora | discriminator | {"steps_done"}
    assert checkpoint[LEAN_KEY]["frozen_prefixes"] == list(frozen)
    assert set(checkpoint[LEAN_KEY]["fingerprints"]) == set(frozen)
    resumed = make_trainer(tiny_generator, discriminator_warmup_steps=1)
    fit(resumed, tmp_path / "b", batches=4, ckpt_path=ckpt)
    assert int(resumed.steps_done) == int(straight.steps_done) == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_name_trains(name, tiny_generator):
    """Each of lbgen's sampler names builds lbGen's training-time sampler, and its images carry a LoRA gradient."""
    system = make_trainer(tiny_generator, weights=(0.0, 1.0, 0.0), sampler=name, num_inference_steps=3, grad_steps=1)
    assert type(system.sampler) is SAMPLERS[name].scheduler and system.sampler_name == name
    images = system.generate(torch.tensor([0, 3]), seed=[1, 2])
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    grads = torch.autograd.grad(images.mean(), list(lora_parameters(system).values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_unknown_sampler_is_refused_before_loading(tiny_generator):
    # the name is checked first: a generator that does not exist is never reached
    with pytest.raises(ValueError, match=r"sampler must be one of .*'ddim'.*got 'plms'"):
        LbGenSystem(PretrainedGenerator(str(tiny_generator / "missing")), sampler="plms")


def test_validation_grid_of_the_training_sampler(tiny_generator, tmp_path):
    system = make_trainer(tiny_generator, weights=(0.0, 1.0, 0.0), sample_grid_classes=2, sample_grid_seeds=3)
    data = ClassNamesDataModule(class_names=CLASSES, batch_size=2, samples_per_epoch=2, val_per_class=1)
    L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
              num_sanity_val_steps=0).fit(system, datamodule=data)
    (grid,) = (tmp_path / "samples").glob("step_*.png")
    assert grid.name == "step_1.png"
    from PIL import Image

    assert Image.open(grid).size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2)


def test_class_names_data_are_balanced_seeded_and_checked(tmp_path):
    labels = [int(BalancedLabels(5, 20, seed=3)[i]["label"]) for i in range(20)]
    assert sorted(labels[:5]) == list(range(5)) and sorted(labels[5:10]) == list(range(5))
    assert labels == [int(BalancedLabels(5, 20, seed=3)[i]["label"]) for i in range(20)]
    assert labels != [int(BalancedLabels(5, 20, seed=4)[i]["label"]) for i in range(20)]
    names = tmp_path / "classes.txt"
    names.write_text("tench\ngoldfish\n\ngreat white shark\n")
    assert read_class_names(None, str(names)) == ["tench", "goldfish", "great white shark"]
    with pytest.raises(ValueError, match="Duplicate"):
        read_class_names(["a", "b", "a"], None)
    with pytest.raises(ValueError, match="exactly one"):
        read_class_names(["a", "b"], str(names))
    with pytest.raises(FileNotFoundError):
        read_class_names(None, str(tmp_path / "missing.txt"))
