"""Samplers by name, classifier-free guidance on part of the trajectory, and their generation options: lbgen's loop
gives the diffusers pipeline's bytes for every sampler, UNet calls are counted for real, the options are recorded."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)

from lbgen.components import PretrainedGenerator
from lbgen.components.diffusion import load_generator
from lbgen.components.sampling import (
    SAMPLERS,
    GuidanceIntervalCallback,
    check_guidance_interval,
    guided_steps,
    make_sampler,
    sample_latents,
    unet_calls_per_image,
)
from lbgen.models import GenerationSystem
from lbgen.models.generation import sample_txt2img
from lbgen.storage.dataset_format import RUN_FILE

from .test_generation import generate, pngs

PROMPTS = ["a photo of a Sneaker", "a photo of a Bag", "a photo of a Coat"]
CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
           "euler_ancestral": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
           "unipc": UniPCMultistepScheduler}


def seeded(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def with_sampler(tiny_generator, name: str):
    pipe = load_generator(str(tiny_generator))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_sampler(name, pipe.scheduler.config)
    return pipe


def count_unet_images(pipe) -> list[int]:
    """The batch size of every UNet forward call from now on (a hook on the real module)."""
    calls: list[int] = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_sampler_table_builds_each_kind_and_names_the_choices(tiny_generator):
    assert set(SAMPLERS) == set(CLASSES)
    config = load_generator(str(tiny_generator)).scheduler.config  # a DDIM config: other kinds drop its extra keys
    for name, cls in CLASSES.items():
        sampler = make_sampler(name, config)
        assert type(sampler) is cls and sampler.config.beta_schedule == config.beta_schedule
        # called like the class, as build_generator does, with keys the kind does not take
        assert type(SAMPLERS[name](beta_start=0.00085, beta_end=0.012, clip_sample=False)) is cls
    assert make_sampler("dpmpp_2m", config).config.algorithm_type == "dpmsolver++"
    assert make_sampler("pndm", config).config.skip_prk_steps  # one UNet call a step, as SD 1.5's PNDM
    with pytest.raises(ValueError, match=r"sampler must be one of \['ddim', 'ddpm', 'dpmpp_2m', 'euler', "
                                         r"'euler_ancestral', 'pndm', 'unipc'\], got 'heun'"):
        make_sampler("heun", config)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_sampler_gives_the_pipelines_bytes_and_seeded_images(tiny_generator, name):
    pipe = with_sampler(tiny_generator, name)
    with torch.no_grad():
        reference = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=seeded([1, 2, 3]),
                         output_type="pt").images
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
        ours = sample_txt2img(pipe, cond, uncond, seeded([1, 2, 3]), 16, 4, 3.0)
        again = sample_txt2img(pipe, cond, uncond, seeded([1, 2, 3]), 16, 4, 3.0)
        other = sample_txt2img(pipe, cond, uncond, seeded([4, 5, 6]), 16, 4, 3.0)
    assert torch.equal(ours, reference)  # lbgen's loop is diffusers' loop, for this sampler too
    assert torch.isfinite(ours).all() and torch.equal(ours, again)
    assert all((ours[i] - other[i]).abs().max() > 1e-3 for i in range(3))  # the seed sets the image


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_training_time_sampler_runs_every_kind_with_gradients(tiny_generator, name):
    pipe = with_sampler(tiny_generator, name)  # PNDM and UniPC take no generator in step: not passed to them
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    hidden = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    out = sample_latents(pipe.unet, pipe.scheduler, latents, hidden, hidden * 0, 2.0, num_steps=3, grad_steps=1,
                         rng=seeded([7, 8]))
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and pipe.unet.conv_in.weight.grad.abs().sum() > 0


def test_training_time_sampler_corrects_eulers_first_noise_scale(tiny_generator):
    # lbGen scales the noise by init_noise_sigma before the timesteps are set; Euler's depends on them
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    unet = with_sampler(tiny_generator, "euler").unet
    early = make_sampler("euler", with_sampler(tiny_generator, "euler").scheduler.config)
    late = make_sampler("euler", early.config)
    late.set_timesteps(3)
    assert early.init_noise_sigma != late.init_noise_sigma
    with torch.no_grad():
        a = sample_latents(unet, early, noise * early.init_noise_sigma, hidden, None, 1.0, 3, 0)
        b = sample_latents(unet, late, noise * late.init_noise_sigma, hidden, None, 1.0, 3, 0)
    assert torch.allclose(a, b, atol=1e-6)


def test_guidance_interval_is_checked_and_counted():
    assert check_guidance_interval(None) is None and check_guidance_interval([0, 1]) is None  # every step
    assert check_guidance_interval([0, 0.5]) == (0.0, 0.5)
    for bad in ([0.5, 0.2], [0, 1.5], [-0.1, 0.5], [0.3], [0.1, 0.2, 0.3], "0,1", [True, 1], [0.2, 0.2]):
        with pytest.raises(ValueError, match="guidance_interval must be"):
            check_guidance_interval(bad)
    assert guided_steps(4, (0.25, 0.75)) == [False, True, True, False]
    assert unet_calls_per_image(10, 2.0) == 20 and unet_calls_per_image(10, 1.0, [0, 0.5]) == 10
    assert unet_calls_per_image(10, 2.0, [0, 0.5]) == 15 and unet_calls_per_image(10, 2.0, [0.2, 0.5]) == 13
    assert unet_calls_per_image(10, 2.0, strength=0.5) == 10  # img2img at r = 0.5: the last 5 steps
    assert unet_calls_per_image(10, 2.0, [0, 0.5], strength=0.7) == 9  # steps 3..9, of which 3, 4 guided
    with pytest.raises(ValueError, match="guidance_interval"):
        unet_calls_per_image(10, 2.0, [0.6, 0.5])


@pytest.mark.parametrize("interval", [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0)])
def test_guidance_interval_loop_gives_the_pipelines_bytes_and_saves_unet_calls(tiny_generator, interval):
    pipe = with_sampler(tiny_generator, "dpmpp_2m")
    calls = count_unet_images(pipe)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
        ours = sample_txt2img(pipe, cond, uncond, seeded([1, 2, 3]), 16, 8, 3.0, interval)
        assert sum(calls) == len(PROMPTS) * unet_calls_per_image(8, 3.0, interval) < len(PROMPTS) * 16
        assert sorted(set(calls)) == [3, 6]  # unguided steps: the prompts alone, not [uncond, cond]
        switch = GuidanceIntervalCallback(cond, uncond, 3.0, interval)
        reference = pipe(num_inference_steps=8, generator=seeded([1, 2, 3]), output_type="pt",
                         **switch.call_kwargs(pipe, 8)).images
        full = sample_txt2img(pipe, cond, uncond, seeded([1, 2, 3]), 16, 8, 3.0)
    assert torch.equal(ours, reference)  # diffusers' pipeline, guidance switched by its step-end callback
    assert not torch.equal(ours, full)


def test_img2img_guidance_interval_counts_steps_along_the_full_trajectory(tiny_generator):
    pipe = with_sampler(tiny_generator, "ddim")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    calls = count_unet_images(pipe)
    source = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)

        def run(guidance_scale: float, interval: tuple[float, float] | None) -> torch.Tensor:
            kwargs = {"prompt_embeds": cond, "negative_prompt_embeds": uncond, "guidance_scale": guidance_scale}
            if interval is not None:
                kwargs.update(GuidanceIntervalCallback(cond, uncond, guidance_scale, interval).call_kwargs(
                    img2img, 10, 0.6))
            return img2img(image=source, strength=0.6, num_inference_steps=10, generator=seeded([1, 2, 3]),
                           output_type="pt", **kwargs).images

        guided, unguided = run(3.0, None), run(1.0, None)
        calls.clear()
        # r = 0.6 of 10 steps runs steps 4..9: [0.4, 1] guides all of them, [0, 0.4] none, [0, 0.6] steps 4 and 5
        assert torch.equal(run(3.0, (0.4, 1.0)), guided)
        assert torch.equal(run(3.0, (0.0, 0.4)), unguided)
        assert sum(calls) == 3 * (unet_calls_per_image(10, 3.0, (0.4, 1.0), 0.6)
                                  + unet_calls_per_image(10, 3.0, (0.0, 0.4), 0.6)) == 3 * (12 + 6)
        calls.clear()
        half = run(3.0, (0.0, 0.6))
        assert calls == [6, 6, 3, 3, 3, 3] and not torch.equal(half, guided) and not torch.equal(half, unguided)


# --- the generation options ----------------------------------------------------------------------------------------
def test_generation_options_are_checked_and_recorded(tiny_generator, tmp_path):
    def system(**kwargs) -> GenerationSystem:
        return GenerationSystem(PretrainedGenerator(str(tiny_generator)), output_dir=str(tmp_path), **kwargs)

    plain = system()
    assert "sampler" not in plain.generator_record and "guidance_interval" not in plain.generator_record
    assert plain.generator_record["scheduler"] == "DDIMScheduler"
    chosen = system(sampler="unipc", guidance_interval=[0.0, 0.5])
    assert chosen.generator_record["sampler"] == "unipc" and chosen.generator_record["scheduler"] == \
        "UniPCMultistepScheduler"
    assert chosen.generator_record["guidance_interval"] == [0.0, 0.5]
    assert chosen.txt2img.scheduler is chosen.img2img.scheduler and type(chosen.img2img.scheduler) is \
        UniPCMultistepScheduler
    assert "guidance_interval" not in system(guidance_interval=[0, 1]).generator_record  # every step: the default
    with pytest.raises(ValueError, match="sampler must be one of"):
        system(sampler="lms")
    with pytest.raises(ValueError, match="guidance_interval must be"):
        system(guidance_interval=[0.8, 0.2])


@pytest.mark.slow
def test_sampler_and_interval_reach_the_manifest_and_a_resume_must_keep_them(tiny_generator, fmnist_fixture,
                                                                            tmp_path):
    out = tmp_path / "euler"
    _, records = generate(tiny_generator, fmnist_fixture, out, images_per_class=1,
                          model_kwargs={"sampler": "euler", "guidance_interval": [0.0, 0.5]})
    assert all(r["sampler"] == "euler" and r["scheduler"] == "EulerDiscreteScheduler"
               and r["guidance_interval"] == [0.0, 0.5] for r in records)
    assert json.loads((out / RUN_FILE).read_text())["sampler"] == "euler"
    with pytest.raises(ValueError, match=r"other settings \(differs in \['sampler', 'scheduler'\]\)"):
        generate(tiny_generator, fmnist_fixture, out, images_per_class=1,
                 model_kwargs={"sampler": "unipc", "guidance_interval": [0.0, 0.5]})
    with pytest.raises(ValueError, match=r"differs in \['guidance_interval'\]"):
        generate(tiny_generator, fmnist_fixture, out, images_per_class=1, model_kwargs={"sampler": "euler"})
    default = tmp_path / "default"
    generate(tiny_generator, fmnist_fixture, default, images_per_class=1)
    assert set(pngs(default)) == set(pngs(out)) and pngs(default) != pngs(out)


def test_img2img_and_genie_generate_with_a_guidance_interval(tiny_generator, fmnist_fixture, tmp_path):
    kwargs = {"images_per_class": 1, "model_kwargs": {"guidance_interval": [0.0, 0.5], "sampler": "dpmpp_2m"}}
    _, img2img = generate(tiny_generator, fmnist_fixture, tmp_path / "i2i", method="img2img", strength=0.7, **kwargs)
    _, genie = generate(tiny_generator, fmnist_fixture, tmp_path / "genie", method="genie", **kwargs)
    assert len(img2img) == len(genie) == 10 and all(r["guidance_interval"] == [0.0, 0.5] for r in img2img + genie)


def test_generation_warns_when_the_lora_was_trained_through_another_sampler(recipe_paths, tmp_path):
    import shutil

    from lbgen.components.lora import TRAINING_RECORD

    lora = tmp_path / "lora"
    shutil.copytree(recipe_paths["lora"], lora)
    (lora / TRAINING_RECORD).write_text(json.dumps({"sampler": "ddpm", "num_inference_steps": 50,
                                                     "guidance_scale": 2.0}))
    generator = PretrainedGenerator(str(recipe_paths["generator"]), lora=str(lora))
    with pytest.warns(UserWarning, match=r"sampler ddpm \(here DDIMScheduler\).*num_inference_steps 50 \(here 4\)"):
        GenerationSystem(generator, output_dir=str(tmp_path / "out"), num_inference_steps=4, guidance_scale=2.0)
    as_trained = {"sampler": "ddim", "num_inference_steps": 4, "guidance_scale": 2.0}
    (lora / TRAINING_RECORD).write_text(json.dumps(as_trained))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GenerationSystem(generator, output_dir=str(tmp_path / "out"), num_inference_steps=4, guidance_scale=2.0)
    assert not [w for w in caught if "The LoRA was trained" in str(w.message)]  # as trained: no warning
