"""Generation speed work: lbgen's sampler loop gives diffusers' bytes, the prompt-embedding cache, the background
shard writer, the compile / channels_last flags, one decode per synthetic image, the SD 1.5 scale configs, and the
benchmarks' pure parts (the benchmarks themselves are run by hand: benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
import threading

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

from lbgen.callbacks import dataset_writer
from lbgen.callbacks.dataset_writer import BackgroundWorker
from lbgen.components import PretrainedGenerator
from lbgen.components.diffusion import load_generator
from lbgen.datamodules import FashionMNISTDataModule, MixedDataModule, SyntheticDataModule
from lbgen.models import GenerationSystem
from lbgen.models.generation import PromptEmbeddingCache, sample_txt2img
from lbgen.storage import dataset_format as synthetic_module
from lbgen.storage.dataset_format import RUN_FILE, SHARD_DIR, complete_shards, read_index

from .conftest import REPO
from .test_generation import _decode, generate, pngs

PROMPTS = ["a photo of a Sneaker", "a photo of a Bag", "a photo of a Sneaker", "a photo of a Coat"]


def bench(name: str):
    """Import ``benchmarks/<name>.py`` (not a package: the scripts put their folder on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in range(n)]


# --- the sampler loop -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", [DDIMScheduler, DDPMScheduler, PNDMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_loop_gives_the_pipelines_bytes(tiny_generator, scheduler, guidance):
    pipe = load_generator(str(tiny_generator))
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)  # DDPM: noise drawn from the rngs per step
    with torch.no_grad():
        reference = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, generator=seeded(4),
                         output_type="pt").images
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, guidance > 1, None)
        ours = sample_txt2img(pipe, cond, uncond, seeded(4), 16, 4, guidance)
    assert torch.equal(ours, reference)


def test_guidance_is_one_unet_call_per_step(tiny_generator):
    pipe = load_generator(str(tiny_generator))
    calls: list[int] = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
        sample_txt2img(pipe, cond, uncond, seeded(4), 16, 5, 3.0)
        assert calls == [8] * 5  # [uncond, cond] in one batch, as diffusers does
        calls.clear()
        pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, generator=seeded(4), output_type="pt")
        assert calls == [8] * 5


# --- prompt embeddings ----------------------------------------------------------------------------------------------
def test_prompt_cache_encodes_each_prompt_once_and_is_bounded(tiny_generator):
    pipe = load_generator(str(tiny_generator))
    encoded: list[str] = []

    def encode(prompt: str) -> torch.Tensor:
        encoded.append(prompt)
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]

    cache = PromptEmbeddingCache(encode, max_size=2)
    with torch.no_grad():
        rows = cache(PROMPTS)
        batched = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert torch.equal(rows, batched)  # the same hidden states as diffusers' batched encoding
    assert encoded == ["a photo of a Sneaker", "a photo of a Bag", "a photo of a Coat"]
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2)  # the Bag went out: least recently used
    cache(["a photo of a Sneaker"])
    assert encoded[-1] == "a photo of a Coat" and cache.hits == 2
    with pytest.raises(ValueError, match="positive"):
        PromptEmbeddingCache(encode, max_size=0)


@pytest.mark.slow
def test_cache_and_background_writer_keep_the_dataset_byte_for_byte(tiny_generator, fmnist_fixture, tmp_path):
    # reference: every batch's prompts encoded by diffusers, PNGs written in the main thread
    _, inline = generate(tiny_generator, fmnist_fixture, tmp_path / "inline", images_per_class=3,
                         model_kwargs={"prompt_cache_size": 0, "writer_queue": 0})
    _, fast = generate(tiny_generator, fmnist_fixture, tmp_path / "fast", images_per_class=3,
                       model_kwargs={"writer_queue": 1})  # a queue of 1: the main thread waits on the writer
    assert len(pngs(tmp_path / "fast")) == 30 and pngs(tmp_path / "fast") == pngs(tmp_path / "inline")

    def without_shard(records):
        return [{k: v for k, v in r.items() if k != "shard"} for r in records]

    def grouping(folder):
        return sorted(sorted(r["id"] for r in read_index(s)) for s in complete_shards(folder))

    assert without_shard(fast) == without_shard(inline)  # shard names differ only by their random run tag
    assert grouping(tmp_path / "fast") == grouping(tmp_path / "inline")
    run = json.loads((tmp_path / "fast" / RUN_FILE).read_text())
    assert "compile" not in run and "channels_last" not in run  # defaults leave older runs resumable


# --- the background writer -------------------------------------------------------------------------------------------
def test_background_worker_order_errors_and_no_deadlock():
    done: list[int] = []

    def work(item: int) -> None:
        if item == 2:
            raise OSError("disk full (simulated)")
        done.append(item)

    worker = BackgroundWorker(work, max_pending=1)
    for item in (0, 1):
        worker.submit(item)
    worker.wait()
    assert done == [0, 1]
    worker.submit(2)
    with pytest.raises(OSError, match="simulated"):
        worker.wait()
    for item in range(3, 20):  # after a failure items are dropped: a full queue never blocks the main thread
        worker.submit(item)
    worker.wait()  # the error is raised once
    assert done == [0, 1]
    worker.close()
    worker.close()
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundWorker(work, max_pending=0)


@pytest.mark.slow
def test_writer_thread_error_stops_the_run_in_the_main_thread(tiny_generator, fmnist_fixture, tmp_path,
                                                              monkeypatch):
    original, calls = dataset_writer.png_bytes, []

    def failing(image):
        calls.append(1)
        if len(calls) > 10:  # after the first shard (8 images)
            raise OSError("No space left on device (simulated)")
        return original(image)

    monkeypatch.setattr(dataset_writer, "png_bytes", failing)
    with pytest.raises(OSError, match="simulated"):
        generate(tiny_generator, fmnist_fixture, tmp_path / "out", images_per_class=3)
    assert not [t for t in threading.enumerate() if t.name == "lbgen-writer" and t.is_alive()]
    shards = complete_shards(tmp_path / "out")
    assert len(shards) == 1  # what was written before the failure is whole: tar and index agree
    with tarfile.open(shards[0]) as tar:
        assert sorted(m.name[:-4] for m in tar.getmembers() if m.name.endswith(".png")) == sorted(
            r["id"] for r in read_index(shards[0]))


# --- flags ---------------------------------------------------------------------------------------------------------
def test_compile_flag_compiles_the_unet_in_place(tiny_generator, tmp_path):
    # only built, not run: compiling even the tiny UNet took 50 s on the 2-core CI machine
    model = GenerationSystem(PretrainedGenerator(str(tiny_generator)), output_dir=str(tmp_path), compile=True)
    assert model.unet._compiled_call_impl is not None and model.txt2img.unet is model.unet
    assert model.generator_record["compile"] is True and "channels_last" not in model.generator_record
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())  # no second copy of the weights


@pytest.mark.slow
def test_channels_last_gives_the_images_within_a_level(tiny_generator, fmnist_fixture, tmp_path):
    generate(tiny_generator, fmnist_fixture, tmp_path / "plain", images_per_class=1)
    generate(tiny_generator, fmnist_fixture, tmp_path / "cl", images_per_class=1,
             model_kwargs={"channels_last": True})
    plain, cl = pngs(tmp_path / "plain"), pngs(tmp_path / "cl")
    assert set(plain) == set(cl) and len(cl) == 10
    assert max(np.abs(_decode(plain[k]) - _decode(cl[k])).max() for k in plain) <= 2
    assert json.loads((tmp_path / "cl" / RUN_FILE).read_text())["channels_last"] is True
    with pytest.raises(ValueError, match="other settings"):  # a resume must keep the numerics of the run
        generate(tiny_generator, fmnist_fixture, tmp_path / "cl", images_per_class=1)
    model = GenerationSystem(PretrainedGenerator(str(tiny_generator)), output_dir=str(tmp_path / "x"),
                               channels_last=True)
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="writer_queue"):
        GenerationSystem(PretrainedGenerator(str(tiny_generator)), output_dir=str(tmp_path), writer_queue=-1)


# --- reading synthetic data -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_synthetic_images_are_decoded_once_not_per_epoch(tiny_generator, fmnist_fixture, tmp_path, monkeypatch):
    generate(tiny_generator, fmnist_fixture, tmp_path / "syn", images_per_class=2)
    decoded: list[str] = []
    original = synthetic_module.decode_image

    def counting(data, shard, image_id, image_size, member="png"):
        decoded.append(image_id)
        return original(data, shard, image_id, image_size, member)

    monkeypatch.setattr(synthetic_module, "decode_image", counting)
    real = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, image_size=16, batch_size=8)
    synthetic = SyntheticDataModule(str(tmp_path / "syn"), image_size=16, batch_size=8)
    mixed = MixedDataModule(real, synthetic)
    mixed.setup("fit")
    loader = mixed.train_dataloader()
    seen = 0
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        seen += sum(int((batch["source"] == 1).sum()) for batch in loader)
    assert seen == 40  # two epochs over the 20 synthetic images ...
    assert sorted(decoded) == sorted(r["id"] for r in synthetic.records)  # ... each decoded once, at set-up
    mixed.setup("fit")
    assert len(decoded) == 20
    threaded = synthetic_module.load_images(tmp_path / "syn", synthetic.records, 16, threads=3)
    assert torch.equal(threaded, synthetic_module.load_images(tmp_path / "syn", synthetic.records, 16, threads=1))
    assert torch.equal(threaded, synthetic.pool[0].images)


@pytest.mark.slow
def test_an_image_missing_from_its_shard_is_named(tiny_generator, fmnist_fixture, tmp_path):
    _, records = generate(tiny_generator, fmnist_fixture, tmp_path / "syn", images_per_class=1)
    shard = tmp_path / "syn" / SHARD_DIR / records[0]["shard"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name != records[0]["id"] + ".png":
                tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=f"has no image {records[0]['id']}.png"):
        SyntheticDataModule(str(tmp_path / "syn"), image_size=16).setup("fit")


# --- SD 1.5 at scale ------------------------------------------------------------------------------------------------
def test_sd15_scale_configs_build_the_public_architecture():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = {n: json.loads((REPO / "configs/scale" / f"sd15_{n}.json").read_text())
               for n in ("unet", "vae", "text_encoder", "scheduler")}
    with torch.device("meta"):  # shapes only: no 3.4 GB of fp32 weights
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae),
                                                                             ("text", text))}
    assert count == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480}  # SD 1.5's published sizes
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64
    assert PNDMScheduler.from_config(configs["scheduler"]).config.skip_prk_steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_benchmark_stops_with_a_message_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="CUDA GPU and found none"):
        bench("gpu_sd15").main(["--out", str(tmp_path / "sd15")])
    assert not (tmp_path / "sd15").exists()


# --- the benchmarks' pure parts -------------------------------------------------------------------------------------
def test_benchmark_helpers():
    common = bench("common")
    assert common.ratio(6.0, 2.0) == 3.0 and common.ratio(1.0, 0.0) != common.ratio(1.0, 0.0)  # NaN
    assert common.last_json_line('log\n{"a": 1}\n| table |\n{"b": 2}\nbye\n') == {"b": 2}
    with pytest.raises(ValueError, match="no JSON"):
        common.last_json_line("nothing here")
    table = common.markdown_table(["what", "ratio"], [["x", 1.234], ["y", float("nan")]])
    assert table.splitlines() == ["| what | ratio |", "|---|---:|", "| x | 1.23 |", "| y | n/a |"]
    data = bench("data_pipeline").summarize({"setup_s": 1.0, "epoch_s": [1.0, 0.5, 0.5], "images": 100},
                                            {"setup_s": 0.0, "epoch_s": [4.0, 3.0, 2.0], "images": 100})
    assert data["ratio_first_epoch"] == 2.0 and data["ratio_later_epochs"] == 5.0
    assert data["later_epoch_img_s"] == {"lbgen": 200.0, "image_folder": 40.0}
    chunks = bench("generation").request_chunks(3, 4)
    assert [len(c) for c in chunks] == [4] * 7 + [2] and chunks[0][0]["id"] == "c0000-i000000"


def test_run_all_summary_rows_and_failures():
    run_all = bench("run_all")
    results = {
        "generation": {"default": {"speedup_vs_plain": 1.5, "compute_share_of_wall": 0.9, "wall_s": 10.0,
                                   "vs_plain_pixels": {"identical": 100, "compared": 100}},
                       "channels_last": {"wall_s": 12.0}},
        "data_pipeline": {"native_size": 32, "image_size": 32,
                          "workers": {"0": {"ratio_later_epochs": 4.0, "ratio_first_epoch": 1.5}}},
        "generation_ddp": "RuntimeError: gloo failed",
        "lbgen_step": {"rows": [{"k": 5, "checkpointing": False, "step_s": 1.0, "peak_mib": 300.0},
                                {"k": 5, "checkpointing": True, "step_s": 1.5, "peak_mib": 120.0}]},
    }
    rows = {r[0].split(" (")[0]: r for r in run_all.summary_rows(results)}
    assert rows["generation img/s: `lbgen predict` / plain `StableDiffusionPipeline` loop"][3] == "met (CPU run)"
    assert rows["generation: pure UNet + VAE compute / `lbgen predict` wall"][3] == "missed"
    assert rows["generation wall: `channels_last` / default"][1] == pytest.approx(1.2)
    assert rows["input img/s, later epochs: shards / PNG ImageFolder"][3] == "met"
    assert rows["`lbgen predict` 1 vs 2 processes"][3] == "failed: RuntimeError: gloo failed"
    assert run_all.failure("Traceback\n  File x | y\nOSError: disk full\n") == "failed: OSError: disk full"
    memory = rows["lbGen step peak memory, checkpointing / plain"]
    assert memory[1] == pytest.approx(0.4) and memory[3] == "met"
    assert rows["input pipeline"][3] == "not run"  # the large-image part of this fake run
    assert rows["background writer"][3] == "not run"
    assert "not run" in run_all.summary_rows({})[0][3]


def test_run_all_rows_for_time_to_n_flops_and_host_overhead():
    run_all = bench("run_all")
    per_image = {"plain": {"setting": "pipeline-50-g4-full", "gflop_per_image": 16.9, "unet_calls_per_image": 100},
                 "lbgen": {"setting": "dpmpp_2m-15-g4-full", "gflop_per_image": 5.3, "unet_calls_per_image": 30}}
    results = {"time_to_n": {"images": 1000, "speedup": 2.8, "flop_ratio": 3.2, "speedup_over_flop_ratio": 0.875,
                             "per_image": per_image, "equal_quality": False,
                             "plain_consistency": {"consistency": 0.8, "ci_low": 0.77, "ci_high": 0.83, "n": 1000},
                             "lbgen_consistency": {"consistency": 0.7, "ci_low": 0.67, "ci_high": 0.73, "n": 1000}},
               "host_overhead": {"loop": [{"shape": "sd15", "sampler": "pndm", "batch": 1, "ms_per_step": 0.4,
                                           "sd15_guided_call_ms_at_40pct_h100": 4.06},
                                          {"shape": "sd15", "sampler": "pndm", "batch": 64, "ms_per_step": 9.0,
                                           "sd15_guided_call_ms_at_40pct_h100": 260.0}]},
               "flops": "RuntimeError: meta"}
    rows = {r[0].split(" (")[0]: r for r in run_all.summary_rows(results)}
    assert rows["time to 1000 images: plain diffusers loop"][1:] == [2.8, ">= 2.5", "missed (consistency lower)"]
    assert rows["wall-time ratio / FLOP ratio"][3] == "met" and rows["counted FLOPs per image, plain / lbgen"][1] == 3.2
    assert rows["label consistency, lbgen / plain loop"][1] == pytest.approx(0.875)
    host = [r for r in run_all.summary_rows(results) if r[0].startswith("host ms per sampler step")]
    assert [r[3] for r in host] == ["met", "missed"]
    assert rows["FLOP counts"][3] == "failed: RuntimeError: meta"
    results["time_to_n"].update(equal_quality=True)
    assert run_all.summary_rows(results)[0][3] == "met (at equal consistency)"
