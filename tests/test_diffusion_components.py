"""Generator components: offline tokenizer, small pipelines of diffusers' real classes, save / load."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from open_clip.tokenizer import SimpleTokenizer

from lbgen.components.diffusion import build_clip_tokenizer, build_generator, load_generator


def test_tokenizer_matches_open_clip():
    tokenizer = build_clip_tokenizer()
    reference = SimpleTokenizer()
    for text in ("a photo of a T-shirt/top", "an ankle boot, café-style!", "Sneaker   in  the grass"):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id == 49406 and ids[-1] == tokenizer.eos_token_id == 49407
        assert ids[1:-1] == reference.encode(text)
    assert len(tokenizer) == 49408


def _images(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(["a photo of a Bag", "a photo of a Coat"], num_inference_steps=2, guidance_scale=2.0,
                generator=generator, output_type="np", height=32, width=32, **kwargs).images


@pytest.mark.slow
def test_small_generator_saves_and_loads_offline(tmp_path):
    pipe = build_generator(image_size=32)
    pipe.set_progress_bar_config(disable=True)
    images = _images(pipe)
    assert images.shape == (2, 32, 32, 3)
    pipe.save_pretrained(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    loaded = load_generator(str(tmp_path / "gen"))
    assert loaded.tokenizer("a Bag").input_ids == pipe.tokenizer("a Bag").input_ids
    assert abs(_images(loaded) - images).max() < 1e-5  # same weights; float reductions may differ by an ulp
    # the same components serve img2img; at strength ~0 it gives the source image back (up to the VAE)
    img2img = StableDiffusionImg2ImgPipeline(**loaded.components)
    out = img2img(["a photo of a Bag"], image=torch.zeros(1, 3, 32, 32), strength=0.5, num_inference_steps=4,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    # diffusers' own loader opens the folder too
    assert isinstance(StableDiffusionPipeline.from_pretrained(tmp_path / "gen", local_files_only=True),
                      StableDiffusionPipeline)


def test_load_generator_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        load_generator(str(tmp_path))
    with pytest.raises(ValueError, match="image_size 30"):
        build_generator(image_size=30)


def test_new_generator_takes_exactly_build_generators_arguments():
    """NewGenerator restates build_generator's parameters for the CLI: a parameter added to one must reach the
    other (one had been lost before: text_intermediate)."""
    import inspect

    from lbgen.components.diffusion import NewGenerator

    built = inspect.signature(build_generator).parameters
    source = inspect.signature(NewGenerator).parameters
    assert list(source) == ["vae", *built]
    assert {k: p.default for k, p in source.items() if k != "vae"} == {k: p.default for k, p in built.items()}
    generator = NewGenerator(image_size=16, vae_channels=(16, 32), unet_channels=(16, 32), cross_attention_dim=16,
                             attention_head_dim=4, text_layers=1, text_heads=2, text_intermediate=24, seed=3)
    pipe = generator()
    assert pipe.text_encoder.config.intermediate_size == 24
    assert generator.generator_id == "new-generator(seed=3)"
