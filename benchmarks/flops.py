"""FLOPs per image, counted: per UNet call (batch 1, and batch 2 = one image with classifier-free guidance), per VAE
decode and per text-encoder call, for the embedded generator and for SD 1.5's architecture at 512 px.

    .venv/bin/python benchmarks/flops.py [--generator DIR] [--out OUT] [--steps 50] [--guidance 7.5]

Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, convolution and attention kernels, 2 FLOPs per
multiply-accumulate; normalisations, activations and other elementwise work are not counted: a few percent) on
models built from their configs under ``torch.device("meta")``: shapes only, no weights, no memory, about a second
even for SD 1.5. Architectures: SD 1.5 from ``configs/scale/`` (the files ``gpu_sd15.py`` builds), the embedded
generator from ``--generator``'s folder (its ``unet`` / ``vae`` / ``text_encoder`` configs) or, without one, a
random generator of its architecture (``common.SMALL_GENERATOR``, saved under ``--out``).
FLOPs per image = text encoder (prompt, and the empty prompt with guidance) + every UNet call of the sampler (the
guided ones at batch 2) + one VAE decode: ``flops_per_image``. The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_generator, markdown_table  # noqa: E402

from lbgen.components.sampling import check_guidance_interval, guided_steps  # noqa: E402

SD15_CONFIGS = REPO / "configs" / "scale"

# public reference figures for SD 1.5 at 512 px (issue 21), to print beside the counts
SD15_REFERENCE_TFLOP = {"unet_call_b1": 0.80, "vae_decode": 2.5}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn()`` and their split by aten operator, as ``FlopCounterMode`` counts them (no gradients)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def meta_models(unet_config: dict, vae_config: dict, text_config: dict) -> tuple[torch.nn.Module, ...]:
    """UNet, VAE and CLIP text encoder built from their configs on the meta device (shapes, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = {k: v for k, v in text_config.items() if k not in ("architectures", "_name_or_path")}
    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(unet_config), AutoencoderKL.from_config(vae_config),
                CLIPTextModel(CLIPTextConfig(**text_config)).eval())


def architecture_flops(unet_config: dict, vae_config: dict, text_config: dict) -> dict[str, Any]:
    """Counted FLOPs of one UNet call at batch 1 and 2, one VAE decode and one text-encoder call (one prompt)."""
    unet, vae, text_encoder = meta_models(unet_config, vae_config, text_config)
    size, tokens = unet.config.sample_size, text_encoder.config.max_position_embeddings
    result: dict[str, Any] = {"latent": [unet.config.in_channels, size, size], "tokens": tokens,
                              "image_size": size * 2 ** (len(vae.config.block_out_channels) - 1), "by_op": {}}
    with torch.device("meta"):
        for batch in (1, 2):
            x = torch.empty(batch, unet.config.in_channels, size, size)
            hidden = torch.empty(batch, tokens, unet.config.cross_attention_dim)
            t = torch.empty((), dtype=torch.long)
            flops, by_op = count_flops(lambda x=x, t=t, hidden=hidden: unet(x, t, hidden))
            result[f"unet_call_b{batch}"], result["by_op"][f"unet_call_b{batch}"] = flops, by_op
        latents = torch.empty(1, vae.config.latent_channels, size, size)
        result["vae_decode"], result["by_op"]["vae_decode"] = count_flops(lambda: vae.decode(latents))
        ids = torch.zeros(1, tokens, dtype=torch.long)
        result["text_encoder"], result["by_op"]["text_encoder"] = count_flops(lambda: text_encoder(ids))
    result["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    return result


def folder_configs(folder: str | Path) -> tuple[dict, dict, dict]:
    """The UNet, VAE and text-encoder configs of a diffusers pipeline folder."""
    folder = Path(folder)
    return tuple(json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder"))


def sd15_configs() -> tuple[dict, dict, dict]:
    """SD 1.5's published UNet, VAE and text-encoder configs (``configs/scale/``)."""
    return tuple(json.loads((SD15_CONFIGS / f"sd15_{part}.json").read_text())
                 for part in ("unet", "vae", "text_encoder"))


def flops_per_image(sampler_steps: int, guidance_scale: float, guidance_interval: Sequence[float] | None,
                    per_call: Mapping[int, float], decode: float, text_encoder: float = 0.0) -> float:
    """FLOPs of one generated image.

    Args:
        sampler_steps: UNet calls along the trajectory (the scheduler's timesteps: PNDM makes steps + 1).
        guidance_scale: classifier-free guidance weight (<= 1: no guidance, no unconditional row).
        guidance_interval: ``[start, end]`` fractions of the trajectory with guidance (``GenerationSystem``'s
            option: step i of N guided when ``start <= i / N < end``); None: every call.
        per_call: FLOPs of one UNet call by batch: ``{1: conditional only, 2: guided}``.
        decode: FLOPs of one VAE decode.
        text_encoder: FLOPs of encoding one prompt; counted once for the prompt, once more for the empty prompt
            when any call is guided (lbgen's prompt cache encodes each distinct prompt once per run: less).
    """
    if sampler_steps <= 0:
        raise ValueError(f"sampler_steps must be positive, got {sampler_steps}.")
    # lbgen's own rule (the one its sampler loop follows): step i of N guided when start <= i / N < end
    guided = sum(guided_steps(sampler_steps, check_guidance_interval(guidance_interval))) if guidance_scale > 1 else 0
    return (text_encoder * (2 if guided else 1) + guided * per_call[2] + (sampler_steps - guided) * per_call[1]
            + decode)


def per_call(counts: Mapping[str, Any]) -> dict[int, float]:
    """``flops_per_image``'s ``per_call`` from ``architecture_flops``' result."""
    return {1: counts["unet_call_b1"], 2: counts["unet_call_b2"]}


def scheduler_calls(scheduler_config: dict, steps: int, sampler: str | None = None) -> int:
    """UNet calls of ``steps`` sampler steps: the timesteps diffusers' scheduler makes (PNDM: steps + 1)."""
    import diffusers

    if sampler is not None:
        from lbgen.components.sampling import make_sampler

        scheduler = make_sampler(sampler, scheduler_config)
    else:  # the pipeline's own scheduler
        scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    scheduler.set_timesteps(steps, device="cpu")
    return len(scheduler.timesteps)


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the counts, in GFLOP."""
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['image_size']} px", r["unet_call_b1"] / 1e9, r["unet_call_b2"] / 1e9,
                     r["vae_decode"] / 1e9, r["text_encoder"] / 1e9])
    return markdown_table(["architecture", "image", "UNet call b1 GFLOP", "UNet call b2 (guided) GFLOP",
                           "VAE decode GFLOP", "text encoder GFLOP"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=None, help="the embedded generator's folder; default: a random one")
    parser.add_argument("--out", type=Path, default=None, help="where a random generator is saved (default: temp)")
    parser.add_argument("--quick", action="store_true", help="the same counts (they take about a second)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ensure_generator(args.generator, args.out or Path(tmp))
        results = {"embedded": architecture_flops(*folder_configs(folder)),
                   "sd15": architecture_flops(*sd15_configs())}
        embedded_scheduler = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    sd15_scheduler = json.loads((SD15_CONFIGS / "sd15_scheduler.json").read_text())
    per_image = {}
    for name, scheduler in (("embedded", embedded_scheduler), ("sd15", sd15_scheduler)):
        counts = results[name]
        for steps, guidance in ((50, 7.5), (20, 7.5), (15, 7.5)):
            calls = scheduler_calls(scheduler, steps)
            per_image[f"{name} {scheduler['_class_name']} {steps} steps, guidance every call"] = {
                "unet_calls": calls, "gflop": flops_per_image(calls, guidance, None, per_call(counts),
                                                              counts["vae_decode"], counts["text_encoder"]) / 1e9}
    result = {"architectures": results, "per_image": per_image,
              "sd15_reference_tflop": SD15_REFERENCE_TFLOP,
              "sd15_vs_reference": {"unet_call_b1": results["sd15"]["unet_call_b1"] / 1e12 / 0.80,
                                    "vae_decode": results["sd15"]["vae_decode"] / 1e12 / 2.5}}
    print(table(results))
    print(markdown_table(["per image", "UNet calls", "GFLOP"],
                         [[k, v["unet_calls"], v["gflop"]] for k, v in per_image.items()]))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
