"""Stable Diffusion-style generators with diffusers' own classes: load (hub id or local folder), build small, save.

A generator is a ``StableDiffusionPipeline`` (UNet2DConditionModel + AutoencoderKL + CLIPTextModel + CLIPTokenizer +
scheduler). Real use loads SD 1.5 / 2.1 by hub id or folder; the embedded world and the tests build small ones
from the same classes (``build_generator``; ``build_sd_like``: SD's own layout at small widths, which the real-scale
recipes run on in the tests), with a tokenizer made from the BPE vocabulary that ships inside open_clip (no download).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lbgen.components.lora import load_lora
from lbgen.components.sampling import SAMPLERS
from lbgen.storage.files import looks_local, read_json


@functools.lru_cache(maxsize=2)
def _bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    # The same construction as open_clip's SimpleTokenizer (and OpenAI CLIP): 256 bytes, their word-final
    # forms, 48894 merges, then the two special tokens; 49408 ids in all.
    merges = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, [tuple(m.split()) for m in merges]


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` equal to OpenAI CLIP's, built offline from open_clip's bundled BPE file.

    Note: ``CLIPTokenizer(vocab_file=..., merges_file=...)`` would silently build a 3-token vocabulary with
    transformers 5; the vocabulary is passed as objects instead.
    """
    vocab, merges = _bpe_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def build_vae(image_size: int, block_out_channels: tuple[int, ...], latent_channels: int = 4,
              layers_per_block: int = 1, norm_num_groups: int | None = None) -> AutoencoderKL:
    """A randomly initialised SD-style ``AutoencoderKL``: it downsamples by ``2 ** (len(block_out_channels) - 1)``;
    group norms of ``min(32, *block_out_channels)`` groups unless given."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(block_out_channels), latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups or min(32, *block_out_channels), sample_size=image_size)


def _clip_text(width: int, layers: int, heads: int, intermediate: int | None, max_prompt_length: int,
               hidden_act: str = "quick_gelu") -> tuple[CLIPTokenizer, CLIPTextModel]:
    """OpenAI CLIP's tokenizer and a random ``CLIPTextModel`` of the given width (= the UNet's cross-attention)."""
    tokenizer = build_clip_tokenizer(max_prompt_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, projection_dim=width, intermediate_size=intermediate or 2 * width,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_prompt_length,
        hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return tokenizer, text_encoder


def build_generator(
    image_size: int = 32,
    vae_channels: tuple[int, ...] = (32, 64),
    latent_channels: int = 4,
    unet_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    text_layers: int = 2,
    text_heads: int = 4,
    text_intermediate: int | None = None,
    max_prompt_length: int = 77,
    scheduler: str = "ddim",
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> StableDiffusionPipeline:
    """A randomly initialised Stable Diffusion-style pipeline of the given (small) size.

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)``; the text encoder's width equals
    ``cross_attention_dim`` as in SD. Cross-attention sits in every UNet block but the first down / last up one.
    """
    if scheduler not in SAMPLERS:
        raise ValueError(f"scheduler must be one of {sorted(SAMPLERS)}, got {scheduler!r}.")
    factor = 2 ** (len(vae_channels) - 1)
    if image_size % (factor * 2 ** (len(unet_channels) - 1)):
        raise ValueError(f"image_size {image_size} must be divisible by the VAE factor {factor} times the UNet's "
                         f"{2 ** (len(unet_channels) - 1)}.")
    torch.manual_seed(seed)
    groups = min(32, *vae_channels, *unet_channels)
    unet = UNet2DConditionModel(
        sample_size=image_size // factor, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=layers_per_block, block_out_channels=tuple(unet_channels), norm_num_groups=groups,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim)
    vae = build_vae(image_size, vae_channels, latent_channels, layers_per_block, groups)
    tokenizer, text_encoder = _clip_text(cross_attention_dim, text_layers, text_heads, text_intermediate,
                                         max_prompt_length)
    noise_scheduler = SAMPLERS[scheduler](
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type=prediction_type, **({"set_alpha_to_one": False, "steps_offset": 1} if scheduler == "ddim"
                                            else {}))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=noise_scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


SD_VERSIONS = ("1.5", "2.1")
"""The Stable Diffusion layouts ``build_sd_like`` copies (2.1: the 512-px ``stable-diffusion-2-1-base``)."""


def build_sd_like(
    version: str = "1.5",
    image_size: int = 256,
    unet_channels: tuple[int, int, int, int] = (32, 32, 64, 64),
    vae_channels: tuple[int, int, int, int] = (16, 16, 32, 32),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    text_layers: int = 2,
    text_heads: int = 4,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """A randomly initialised pipeline with Stable Diffusion 1.5's (or 2.1-base's) architecture at small widths.

    The same classes and layout as the real model (``configs/scale/sd15_*.json``): UNet blocks CrossAttnDown x3 +
    Down / Up + CrossAttnUp x3 with a cross-attention mid block, a 4-channel latent, a 4-level VAE (8x down) with
    SD's ``scaling_factor`` 0.18215, a 77-token ``CLIPTextModel`` and the pipeline's own PNDM scheduler; 2.1 adds the
    linear attention projections, head widths growing with depth and a GELU text encoder. Only the widths and the
    depth are small, so recipes written for SD run on it at real resolution (the tests: 256 px, latent 32).

    Args:
        version: ``1.5`` or ``2.1``.
        image_size: output side in pixels (a multiple of 64: 8x VAE, 3 UNet downsamplings).
        unet_channels: the 4 UNet block widths (SD: 320, 640, 1280, 1280).
        vae_channels: the 4 VAE block widths (SD: 128, 256, 512, 512).
        layers_per_block: ResNet layers per UNet / VAE block (SD: 2).
        cross_attention_dim: text-encoder width = UNet cross-attention width (SD 1.5: 768, 2.1: 1024).
        attention_head_dim: 1.5: the attention heads of every block (diffusers reads SD 1.5's ``attention_head_dim:
            8`` so); 2.1: the width of one head (SD: 64), so the wider blocks have more heads.
        text_layers: text-encoder layers (SD 1.5: 12).
        text_heads: text-encoder heads (SD 1.5: 12).
        seed: seed of the random initialisation.
    """
    if version not in SD_VERSIONS:
        raise ValueError(f"version must be one of {list(SD_VERSIONS)}, got {version!r}.")
    if len(unet_channels) != 4 or len(vae_channels) != 4:
        raise ValueError(f"SD has 4 UNet and 4 VAE blocks: got unet_channels {unet_channels}, vae_channels "
                         f"{vae_channels}; use build_generator for other layouts.")
    if image_size % 64:
        raise ValueError(f"image_size must be a multiple of 64 (8x VAE times 8x UNet), got {image_size}.")
    torch.manual_seed(seed)
    if version == "1.5":
        # diffusers reads SD 1.5's attention_head_dim as the number of heads (a historical misnomer)
        heads, linear, act = attention_head_dim, False, "quick_gelu"
    else:
        heads, linear, act = tuple(max(1, c // attention_head_dim) for c in unet_channels), True, "gelu"
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(unet_channels), norm_num_groups=min(32, *unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=heads, use_linear_projection=linear)
    vae = build_vae(image_size, vae_channels, 4, layers_per_block, min(32, *vae_channels))
    tokenizer, text_encoder = _clip_text(cross_attention_dim, text_layers, text_heads, None, 77, act)
    # SD's own scheduler (its scheduler_config.json): what `sampler: null` in a generation recipe runs
    # from a config as the hub's file, clip_sample false included: a sampler built from it (lbGen's DDPM, a
    # generation `sampler: ddim`) then never clips latents, as with the real SD 1.5 / 2.1
    scheduler = PNDMScheduler.from_config({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                                           "clip_sample": False})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def _check_pipeline_folder(path: Path, trust_remote_code: bool) -> None:
    """Refuse a local folder that is not a diffusers pipeline, or that would run its own code unasked."""
    if not path.exists():
        raise FileNotFoundError(f"Generator folder {path} does not exist. Run the stage that writes it (e.g. `lbgen "
                                "fit -c configs/foundation/fashion_generator.yaml`) or fix `model:`; a hub id looks "
                                "like 'namespace/name'.")
    index_file = path / "model_index.json"
    if not path.is_dir() or not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json). Pass a folder "
                                "written by `save_pretrained` / lbgen's generator stage, or a hub id.")
    index = read_json(index_file, "the generator folder is damaged: save or copy it again.")
    if not isinstance(index, dict):
        raise ValueError(f"{index_file} is not a diffusers model index; save or copy the generator folder again.")
    # diffusers imports <component>/<library>.py when model_index.json names such a library: code in the folder
    custom = [f"{name}/{entry[0]}.py" for name, entry in index.items() if isinstance(entry, list) and entry
              and isinstance(entry[0], str) and (path / name / f"{entry[0]}.py").is_file()]
    if custom and not trust_remote_code:
        raise ValueError(f"{path} ships its own code ({', '.join(custom)}), which loading it would run. Refused: "
                         "read that code, and set `trust_remote_code: true` on PretrainedGenerator only if you trust "
                         "it; otherwise save the pipeline with diffusers' own classes.")


def load_generator(
    model: str,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    lora: str | None = None,
    trust_remote_code: bool = False,
) -> StableDiffusionPipeline:
    """Load a generator by hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``) or local diffusers folder.

    A local folder never touches the network. ``lora`` is a folder or file written by ``save_lora_weights``; one that
    does not fit the UNet (or text encoder) is refused. Code shipped with the model runs only with
    ``trust_remote_code``; weights are read from safetensors or with ``torch.load(weights_only=True)`` by diffusers.

    Raises:
        FileNotFoundError: a local path that does not exist or is not a diffusers pipeline folder.
        ValueError: the folder ships code and ``trust_remote_code`` is off, or the LoRA does not fit.
        OSError: a hub id that cannot be loaded (not cached offline, unknown, no network).
    """
    path = Path(model).expanduser()
    # a hub id is "name" or "namespace/name": anything else that names a path is local and must exist
    local = looks_local(model)
    if local:
        _check_pipeline_folder(path, trust_remote_code)
        model = str(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=torch_dtype, variant=variant, local_files_only=local, safety_checker=None,
            requires_safety_checker=False, trust_remote_code=trust_remote_code)
    except OSError as err:
        if local:
            raise
        raise OSError(f"Cannot load generator {model!r}: there is no such local folder, and as a hub id it cannot be "
                      f"loaded ({err}). Pass a diffusers folder, or download the model first (`hf download {model}`, "
                      "then run with HF_HUB_OFFLINE=1).") from err
    if lora:
        load_lora(pipe, lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GeneratorSource:
    """Where a system gets its generator pipeline from; configured in YAML, called once per process."""

    def __call__(self) -> StableDiffusionPipeline:
        raise NotImplementedError

    @property
    def generator_id(self) -> str:
        """A short id recorded in every manifest record."""
        raise NotImplementedError


class PretrainedGenerator(GeneratorSource):
    """A generator loaded with ``from_pretrained``: a hub id (SD 1.5 / 2.1) or a local diffusers folder.

    Args:
        model: hub id or folder.
        torch_dtype: ``float32``, ``float16`` or ``bfloat16`` (None: as saved).
        variant: weight variant such as ``fp16``.
        lora: a folder or file of LoRA weights written by ``save_lora_weights``.
        trust_remote_code: let a model that ships its own Python code run it (off: such a model is refused).
    """

    def __init__(self, model: str, torch_dtype: str | None = None, variant: str | None = None,
                 lora: str | None = None, trust_remote_code: bool = False) -> None:
        if torch_dtype is not None and torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(_DTYPES)}, got {torch_dtype!r}.")
        if lora in ("None", "null") and not Path(lora).exists():
            # jsonargparse turns `null` given on the command line two class levels deep into the string "None"
            raise ValueError(f"lora={lora!r} is a string, not 'no LoRA': `--...generator.init_args.lora null` is read "
                             "as text at this depth. Leave out the recipe that sets a LoRA, or set `lora: null` in a "
                             "config file (-c).")
        self.model, self.torch_dtype, self.variant, self.lora = model, torch_dtype, variant, lora
        self.trust_remote_code = bool(trust_remote_code)

    def __call__(self) -> StableDiffusionPipeline:
        return load_generator(self.model, _DTYPES.get(self.torch_dtype or ""), self.variant, self.lora,
                              trust_remote_code=self.trust_remote_code)

    @property
    def generator_id(self) -> str:
        return self.model


class NewGenerator(GeneratorSource):
    """A randomly initialised small generator (``build_generator``), optionally with a trained VAE folder.

    Every argument but ``vae`` is ``build_generator``'s, with its default (a test keeps the two signatures equal).

    Args:
        vae: folder of a trained ``AutoencoderKL`` (``save_pretrained``) that replaces the random one.
        image_size: output side in pixels.
        vae_channels: VAE block widths (the VAE downsamples by ``2 ** (len - 1)``).
        latent_channels: latent channels.
        unet_channels: UNet block widths.
        layers_per_block: ResNet layers per UNet / VAE block.
        cross_attention_dim: text-encoder width = UNet cross-attention width.
        attention_head_dim: UNet attention head width.
        text_layers: text-encoder layers.
        text_heads: text-encoder attention heads.
        text_intermediate: text-encoder MLP width (default twice its width).
        max_prompt_length: tokens per prompt.
        scheduler: ``ddim`` or ``ddpm``.
        prediction_type: ``epsilon`` or ``v_prediction``.
        seed: seed of the random initialisation.
    """

    def __init__(self, vae: str | None = None, image_size: int = 32, vae_channels: tuple[int, ...] = (32, 64),
                 latent_channels: int = 4, unet_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                 cross_attention_dim: int = 32, attention_head_dim: int = 8, text_layers: int = 2,
                 text_heads: int = 4, text_intermediate: int | None = None, max_prompt_length: int = 77,
                 scheduler: str = "ddim", prediction_type: str = "epsilon", seed: int = 0) -> None:
        # the arguments, as given, for build_generator (locals() holds exactly them here: first statement)
        self.kwargs = {name: value for name, value in locals().items() if name not in ("self", "vae")}
        self.vae = vae

    def __call__(self) -> StableDiffusionPipeline:
        pipe = build_generator(**self.kwargs)
        if self.vae:
            if not (Path(self.vae) / "config.json").is_file():
                raise FileNotFoundError(f"{self.vae} is not an AutoencoderKL folder (no config.json): train one with "
                                        "`lbgen fit -c configs/foundation/fashion_vae.yaml`, or fix `vae:`.")
            vae = AutoencoderKL.from_pretrained(self.vae, local_files_only=True)
            if vae.config.latent_channels != pipe.unet.config.in_channels:
                raise ValueError(f"The VAE in {self.vae} has {vae.config.latent_channels} latent channels, the UNet "
                                 f"expects {pipe.unet.config.in_channels}: set latent_channels to match.")
            pipe.register_modules(vae=vae)
            pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            pipe.image_processor.config.vae_scale_factor = pipe.vae_scale_factor
        return pipe

    @property
    def generator_id(self) -> str:
        return f"new-generator(seed={self.kwargs['seed']})"
