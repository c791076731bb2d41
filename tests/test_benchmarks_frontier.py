"""The pure parts of the speed-to-dataset benchmarks (issue 21): FLOPs counted and per image, the frontier's grid,
intervals and choice, the time-to-N quality test, and the zero-cost stand-ins of the host-overhead benchmark (the
benchmarks themselves are run by hand: benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from lbgen.components.sampling import SAMPLERS, unet_calls_per_image

from .conftest import REPO


def bench(name: str):
    """Import ``benchmarks/<name>.py`` as the module ``bench_<name>`` (registered: its dataclasses need that)."""
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def test_sd15_flops_counted_on_the_meta_device_match_the_public_figures():
    flops = bench("flops")
    counts = flops.architecture_flops(*flops.sd15_configs())
    assert counts["unet_parameters"] == 859_520_964 and counts["image_size"] == 512
    assert counts["unet_call_b1"] / 1e12 == pytest.approx(0.80, rel=0.01)  # attention included (bmm)
    assert counts["vae_decode"] / 1e12 == pytest.approx(2.5, rel=0.01)
    assert counts["unet_call_b2"] == 2 * counts["unet_call_b1"]
    assert counts["by_op"]["unet_call_b1"]["aten.bmm"] > 0  # attention scores and values are counted
    assert sum(counts["by_op"]["vae_decode"].values()) == counts["vae_decode"]


def test_embedded_flops_from_a_generator_folder(tiny_generator):
    flops = bench("flops")
    counts = flops.architecture_flops(*flops.folder_configs(tiny_generator))
    assert counts["image_size"] == 16 and counts["tokens"] == 16
    assert 0 < counts["unet_call_b1"] < counts["unet_call_b2"] and counts["vae_decode"] > 0
    assert counts["text_encoder"] > 0


def test_flops_per_image_counts_guided_calls_twice_on_lbgens_steps():
    flops = bench("flops")
    per_call = {1: 10.0, 2: 20.0}
    assert flops.flops_per_image(50, 4.0, None, per_call, 100.0) == 50 * 20 + 100
    assert flops.flops_per_image(50, 1.0, None, per_call, 100.0, text_encoder=3.0) == 50 * 10 + 100 + 3
    assert flops.flops_per_image(10, 4.0, [0, 0.5], per_call, 0.0, text_encoder=3.0) == 5 * 20 + 5 * 10 + 6
    for steps in (5, 8, 15, 20):  # the same steps as lbgen's sampler loop guides
        for interval in (None, [0.0, 0.5], [0.2, 0.8]):
            assert (flops.flops_per_image(steps, 4.0, interval, per_call, 0.0)
                    == 10.0 * unet_calls_per_image(steps, 4.0, interval))
    with pytest.raises(ValueError, match="sampler_steps"):
        flops.flops_per_image(0, 4.0, None, per_call, 0.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        flops.flops_per_image(10, 4.0, [0.8, 0.2], per_call, 0.0)
    sd15 = bench("flops").scheduler_calls
    config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "num_train_timesteps": 1000}
    assert sd15(config, 50) == 51 and sd15(config, 15, "dpmpp_2m") == 15  # PLMS takes one extra call


def test_wilson_interval_and_paired_difference():
    frontier = bench("frontier")
    low, high = frontier.wilson_interval(80, 100)
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)  # the textbook values
    assert frontier.wilson_interval(0, 10)[0] == 0.0 and frontier.wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="successes"):
        frontier.wilson_interval(11, 10)
    mean, lo, hi = frontier.paired_difference([1, 1, 0, 1], [1, 0, 0, 0])
    assert mean == 0.5 and lo < 0.5 < hi
    assert frontier.paired_difference([1, 0], [1, 0]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal length"):
        frontier.paired_difference([1], [1, 0])


def test_cheapest_setting_within_the_best_ones_interval():
    frontier = bench("frontier")

    def row(name, calls, consistency, half=0.03):
        return {"name": name, "unet_calls_per_image": calls, "consistency": consistency,
                "ci_low": consistency - half, "ci_high": consistency + half}

    rows = [row("ddim-50", 100, 0.90), row("dpmpp-15", 30, 0.88), row("dpmpp-8", 16, 0.80),
            row("dpmpp-15-trunc", 23, 0.875), {"name": "unscored", "unet_calls_per_image": 1, "consistency": None}]
    assert frontier.cheapest_within_best(rows)["name"] == "dpmpp-15-trunc"
    rows.append(row("better", 200, 0.99, half=0.005))  # a tight best interval leaves only itself
    assert frontier.cheapest_within_best(rows)["name"] == "better"
    with pytest.raises(ValueError, match="--oracle"):
        frontier.cheapest_within_best([{"name": "x", "unet_calls_per_image": 1, "consistency": None}])


def test_settings_names_flags_and_the_default_grid():
    frontier = bench("frontier")
    setting = frontier.Setting("dpmpp_2m", 15, 4.0, "truncated")
    assert setting.name == "dpmpp_2m-15-g4-truncated" and frontier.parse_setting(setting.name) == setting
    assert frontier.parse_setting("euler_ancestral-8-g2.5-interval").interval == (0.2, 0.8)
    assert setting.flags() == ["--model.init_args.sampler=dpmpp_2m", "--model.init_args.guidance_interval=[0.0,0.5]"]
    assert frontier.Setting("pipeline", 50, 4.0).flags() == []  # the generator's own scheduler, every step
    for bad in ("dpmpp_2m-15-4-full", "dpmpp_2m-x-g4-full", "dpmpp_2m-15-gx-full"):
        with pytest.raises(ValueError, match="SAMPLER-STEPS|not a number"):
            frontier.parse_setting(bad)
    with pytest.raises(ValueError, match="guidance mode"):
        frontier.parse_setting("ddim-15-g4-sometimes")
    grid = frontier.default_grid()
    assert len(grid) == len(set(grid)) and frontier.Setting("pipeline", 50, 4.0, "full") in grid
    assert {s.sampler for s in grid} == set(SAMPLERS) | {"pipeline"}
    assert {s.mode for s in grid} == set(frontier.GUIDANCE_MODES)


def test_time_to_n_equal_quality_rule():
    ttn = bench("time_to_n")
    plain = {"consistency": 0.80, "ci_low": 0.77, "ci_high": 0.83}
    assert ttn.equal_quality({"consistency": 0.795}, plain)  # within 1 point
    assert ttn.equal_quality({"consistency": 0.775}, plain)  # inside the plain loop's interval
    assert not ttn.equal_quality({"consistency": 0.76}, plain)
    assert ttn.equal_quality({"consistency": 0.95}, plain)  # better is equal or better
    assert ttn.parse_setting(ttn.DEFAULT_LBGEN_SETTING).sampler in SAMPLERS


@pytest.mark.parametrize("sampler", ["pndm", "dpmpp_2m"])
def test_zero_cost_stand_ins_run_lbgens_loop_with_the_real_shapes(sampler):
    host = bench("host_overhead")
    pipe = host.zero_cost_pipeline("embedded", sampler)
    calls: list[tuple[int, ...]] = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    from lbgen.models.generation import sample_txt2img

    cond = torch.zeros(3, 16, 64)
    rngs = [torch.Generator().manual_seed(i) for i in range(3)]
    with torch.no_grad():
        images = sample_txt2img(pipe, cond, cond, rngs, 32, 4, 4.0)
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()
    assert calls[0] == (6, 4, 8, 8) and len(calls) == (5 if sampler == "pndm" else 4)
    assert host.unet_call_ms_at_peak_share(1) == pytest.approx(1.6065e12 / (0.4 * 989e12) * 1e3)
    assert not math.isnan(host.per_step(pipe, 1, (2, 4), repeats=1)["ms_per_step"])
