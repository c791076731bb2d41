"""The data card of a generated set (``lbgen predict -c configs/evaluate/data_card.yaml``): features of every
generated and real image extracted through Lightning, then ``card.md`` / ``card.json``, a sample grid, the leakage
guard's ``leakage.json`` and a view without the copies, written into the dataset folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lbgen.callbacks.dataset_writer import write_dataset_grid
from lbgen.components.clip import ClipScorer
from lbgen.components.prompts import fill_caption
from lbgen.datamodules.class_names import check_same_classes
from lbgen.datamodules.reference import RealReferenceDataModule
from lbgen.datamodules.synthetic import SyntheticDataModule
from lbgen.distributed import gather_lists
from lbgen.evaluation.card import (
    CARD_JSON,
    CARD_MARKDOWN,
    card_markdown,
    check_manifest_matches_shards,
    class_statistics,
    distribution_measures,
    laplacian_variance,
)
from lbgen.evaluation.leakage import (
    LEAKAGE_FILE,
    find_copies,
    image_hashes,
    leakage_report,
    nearest_neighbours,
    no_leaks_view,
    pixel_features,
    similarity_summary,
    to_uint8,
)
from lbgen.losses.quality import QualityLoss
from lbgen.models.precision import low_precision_setup
from lbgen.storage.dataset_format import read_manifest
from lbgen.storage.files import atomic_write, atomic_write_json

FeatureSpace = Literal["clip", "oracle"]
LeakageSpace = Literal["features", "pixels"]


def load_oracle(checkpoint: str) -> torch.nn.Module:
    """A frozen ``ClassifierSystem`` from a checkpoint trained on real data (the label-consistency judge)."""
    from lbgen.models.classifier import ClassifierSystem

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"oracle_checkpoint {checkpoint} does not exist: train one on real data (lbgen fit -c "
                                "configs/classifier/fashion_5shot.yaml -c configs/classifier/fashion_full.yaml -c "
                                "configs/classifier/fashion_oracle.yaml).")
    return ClassifierSystem.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True
                                                ).requires_grad_(False).eval()


def concat_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Gathered per-batch parts (``index`` plus tensors and lists per image) as one set ordered by ``index``."""
    if not parts:
        return {"index": torch.empty(0, dtype=torch.long)}
    out: dict[str, Any] = {}
    index = torch.cat([p["index"] for p in parts])
    order = index.argsort()
    for key in parts[0]:
        if isinstance(parts[0][key], torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])[order]
        else:
            flat = [v for p in parts for v in p[key]]
            out[key] = [flat[i] for i in order.tolist()]
    if len(set(out["index"].tolist())) != len(out["index"]):
        raise RuntimeError("an image was read twice: evaluation loaders must not repeat samples across processes.")
    return out


class DataCardSystem(L.LightningModule):
    """``lbgen predict`` over a ``RealReferenceDataModule`` (a generated set + the real data): write its data card.

    Into the dataset folder: ``card.json`` and ``card.md`` (per class and overall: count, oracle label consistency
    and the most frequent wrong label, CLIP probability of the intended class, quality, Vendi diversity beside the
    real test images', KID to them, a real-vs-generated domain classifier's AUC, near copies of the real test set
    and training split), ``samples.png`` (samples, a row per class), ``leakage.json`` (every flagged image, keyed
    by record id, with the real image it copies: a sidecar, the manifest stays as generation wrote it) and
    ``views/<view_name>.json`` (the set without them, for ``SyntheticDataModule(view=...)``).

    Args:
        oracle_checkpoint: a ``ClassifierSystem`` checkpoint trained on real data; None: no label consistency.
        clip: the CLIP judge (real use ViT-L-14 / openai); None: no CLIP probability.
        clip_template: CLIP text of a class.
        quality: the quality judge (``QualityLoss``); None: no quality column.
        features: the image features of diversity, KID, the domain classifier and the leakage guard: ``clip``'s
            image encoder or the ``oracle``'s backbone.
        leakage_space: near copies by cosine similarity of those ``features``, or of ``pixels`` (grey 16x16,
            centred: a correlation); exact pixel copies are always found, by hash.
        leakage_threshold: a nearest real neighbour this similar (or more) flags the image.
        kid_subset_size: KID subset size (cut to the smaller set's size).
        kid_subsets: KID subsets.
        grid_per_class: samples per class in the grid.
        view_name: the view without the flagged images.
        block_queries: generated images per block of the nearest-neighbour search.
        block_references: real images per block of it.
        seed: seed of KID's subsets and the domain classifier's folds.
        class_names: linked from the data (unused: the data's classes are checked against the set's).
        num_classes: linked from the data.
    """

    def __init__(self, oracle_checkpoint: str | None = None, clip: ClipScorer | None = None,
                 clip_template: str = "a photo of a {class}", quality: QualityLoss | None = None,
                 features: FeatureSpace = "clip", leakage_space: LeakageSpace = "features",
                 leakage_threshold: float = 0.95, kid_subset_size: int = 1000, kid_subsets: int = 100,
                 grid_per_class: int = 8, view_name: str = "no_leaks", block_queries: int = 4096,
                 block_references: int = 16384, seed: int = 0, class_names: list[str] | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if features not in ("clip", "oracle"):
            raise ValueError(f"features must be 'clip' or 'oracle', got {features!r}.")
        if leakage_space not in ("features", "pixels"):
            raise ValueError(f"leakage_space must be 'features' or 'pixels', got {leakage_space!r}.")
        if (features == "clip" and clip is None) or (features == "oracle" and oracle_checkpoint is None):
            need = "model.init_args.clip" if features == "clip" else "model.init_args.oracle_checkpoint"
            raise ValueError(f"features={features!r} needs its extractor: set {need}, or choose the other features.")
        if not -1 <= leakage_threshold <= 1:
            raise ValueError(f"leakage_threshold is a cosine similarity in [-1, 1], got {leakage_threshold}.")
        if grid_per_class < 1 or kid_subsets < 1 or kid_subset_size < 2:
            raise ValueError("grid_per_class and kid_subsets must be >= 1, kid_subset_size >= 2; got "
                             f"{grid_per_class}, {kid_subsets}, {kid_subset_size}.")
        if not view_name or not view_name.replace("-", "_").isidentifier():
            raise ValueError(f"view_name must be a plain name (letters, digits, - and _), got {view_name!r}.")
        self.oracle = load_oracle(oracle_checkpoint) if oracle_checkpoint is not None else None
        self.clip = clip.requires_grad_(False).eval() if clip is not None else None
        self.quality = quality.requires_grad_(False).eval() if quality is not None else None
        self.oracle_checkpoint, self.clip_template = oracle_checkpoint, clip_template
        self.features, self.leakage_space, self.leakage_threshold = features, leakage_space, leakage_threshold
        self.kid_subset_size, self.kid_subsets, self.grid_per_class = kid_subset_size, kid_subsets, grid_per_class
        self.view_name, self.seed = view_name, seed
        self.search = {"block_queries": block_queries, "block_references": block_references}
        self._parts: dict[int, list[dict[str, Any]]] = {}

    # --- set-up ---------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        low_precision_setup(self, [m for m in (self.oracle, self.clip, self.quality) if m is not None], lora=False)
        data = self.trainer.datamodule
        if not isinstance(data, RealReferenceDataModule) or not isinstance(data.data, SyntheticDataModule):
            raise ValueError("DataCardSystem reads a generated set beside the real data: use data "
                             "RealReferenceDataModule with data SyntheticDataModule (configs/evaluate/data_card.yaml).")
        generated = data.data
        if generated.mode != "memory":
            raise ValueError(f"{generated.folder} is streamed (mode {generated.mode!r}); the card maps every image to "
                             "its record: set the SyntheticDataModule's mode: memory.")
        check_same_classes(data.class_names, generated.class_names, "real", f"generated ({generated.folder})",
                           "describe a set generated for the reference's classes.")
        check_manifest_matches_shards(generated.folder)
        if self.oracle is not None:
            if self.oracle.num_classes != data.num_classes:
                raise ValueError(f"The oracle {self.oracle_checkpoint} has {self.oracle.num_classes} classes, the data "
                                 f"{data.num_classes}: use an oracle trained on these classes.")
            self.oracle.check_input_size(data.image_size)  # refuses an extractor built for another size, with the fix

    def on_predict_start(self) -> None:
        self._parts = {}

    # --- features -------------------------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, oracle logits or None) of images in [0, 1]."""
        logits = None
        if self.oracle is not None:
            hidden = self.oracle.backbone(images)
            logits = self.oracle.head(hidden)
            if self.features == "oracle":
                return hidden.float(), logits
        return self.clip.encode_images(images).float(), logits

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch["image"], batch["label"]
        features, logits = self.image_features(images)
        pixels = to_uint8(images).cpu()
        part: dict[str, Any] = {"index": batch["index"].cpu().long(), "features": features.cpu(),
                                "labels": labels.cpu().long(), "hash": image_hashes(pixels),
                                "sharpness": laplacian_variance(images).cpu()}
        if self.leakage_space == "pixels":
            part["leak"] = pixel_features(images).float().cpu()
        if dataloader_idx == 0:
            if logits is not None:
                part["oracle_probs"] = logits.float().softmax(-1).cpu()
            if self.clip is not None:
                names = self.trainer.datamodule.class_names
                probs = self.clip.class_probabilities(images, [fill_caption(self.clip_template, n) for n in names])
                part["clip_prob"] = probs.gather(1, labels.view(-1, 1)).squeeze(1).float().cpu()
            if self.quality is not None:
                part["quality"] = self.quality.score(images).float().cpu()
        self._parts.setdefault(dataloader_idx, []).append(part)

    def on_predict_epoch_end(self) -> None:
        gathered = {i: concat_parts(gather_lists(self._parts.get(i, []))) for i in range(3)}
        if self.trainer.is_global_zero:
            self._write(gathered)
        self.trainer.strategy.barrier()

    # --- the card -------------------------------------------------------------------------------------------------
    def _write(self, parts: dict[int, dict[str, Any]]) -> None:
        data: RealReferenceDataModule = self.trainer.datamodule
        generated, names = data.data, data.class_names
        folder = Path(generated.folder)
        gen, train, test = parts[0], parts[1], parts[2]
        records = [dict(generated.records[i]) for i in gen["index"].tolist()]
        if len(records) != len(generated.records) and not self.trainer.fast_dev_run:
            raise RuntimeError(f"{len(generated.records) - len(records)} generated images were not read.")
        for i, r in enumerate(records):
            scores = dict(r.get("scores", {}))
            c = r["class_index"]
            if "oracle_probs" in gen:
                p = gen["oracle_probs"][i]
                scores.update(oracle_label=int(p.argmax()), oracle_agrees=int(p.argmax()) == c,
                              oracle_prob=float(p[c]))
            if "clip_prob" in gen:
                scores["clip_prob"] = float(gen["clip_prob"][i])
            if "quality" in gen:
                scores["quality"] = float(gen["quality"][i])
            scores["sharpness"] = float(gen["sharpness"][i])
            r["scores"] = scores
        per_class, consistency = class_statistics(records, names)
        labels = [r["class_index"] for r in records]
        distribution = distribution_measures(gen["features"], labels, test["features"], test["labels"].tolist(),
                                             names, self.kid_subset_size, self.kid_subsets, self.seed)
        leak_key = "leak" if self.leakage_space == "pixels" else "features"
        copies, reference_ids = {}, {}
        for name, ref, loader in (("test", test, 2), ("train", train, 1)):
            source = data.source(loader)
            reference_ids[name] = [source.sample_id(int(p)) for p in ref["index"].tolist()]
            copies[name] = find_copies(gen[leak_key], gen["hash"], ref[leak_key], ref["hash"],
                                       self.leakage_threshold, device=self.device, **self.search)
        leakage = leakage_report(records, names, copies, reference_ids)
        # how close real images come to each other: the test set's nearest training images (where a threshold
        # stops meaning "copy" on this data)
        real_sim, _ = nearest_neighbours(test[leak_key], train[leak_key], device=self.device, **self.search)
        flagged = set(leakage["flagged"])
        self_sim, _ = nearest_neighbours(gen[leak_key], gen[leak_key], device=self.device, exclude_self=True,
                                         **self.search)
        # the view covers the whole manifest (a card of a view or of max_per_class checks fewer: those are kept)
        _, manifest = read_manifest(folder)
        view = {**no_leaks_view(manifest, names, flagged, self.view_name), "n_checked": len(records)}
        (folder / "views").mkdir(exist_ok=True)
        atomic_write_json(folder / "views" / f"{self.view_name}.json", view)
        atomic_write_json(folder / LEAKAGE_FILE, {"space": self.leakage_space, "threshold": self.leakage_threshold,
                                                  "flagged": leakage["flagged"]})
        real_counts = torch.bincount(test["labels"], minlength=len(names)).tolist()
        real_sharpness = [_mean(test["sharpness"][test["labels"] == c].tolist()) for c in range(len(names))]
        card: dict[str, Any] = {
            "folder": str(folder), "methods": sorted({str(r.get("method")) for r in records}),
            "features": f"{self.features} ({self.clip.name if self.features == 'clip' else self.oracle_checkpoint})",
            "real_reference": "the real test set", "oracle": self.oracle_checkpoint,
            "clip": self.clip.name if self.clip is not None else None, "clip_template": self.clip_template,
            "overall": {"count": len(records), "real_count": len(test["labels"]),
                        "label_consistency": consistency["overall"], "most_frequent_wrong_label": None,
                        "most_frequent_wrong_share": None,
                        "clip_prob": _mean(r["scores"].get("clip_prob") for r in records),
                        "quality": _mean(r["scores"].get("quality") for r in records),
                        "sharpness": _mean(r["scores"].get("sharpness") for r in records),
                        "sharpness_real": _mean(test["sharpness"].tolist()), **distribution["overall"]},
            "per_class": {n: {**per_class[n], "real_count": real_counts[c], "sharpness_real": real_sharpness[c],
                              **distribution["per_class"][n]} for c, n in enumerate(names)},
            "leakage": {"space": self.leakage_space, "threshold": self.leakage_threshold, "file": LEAKAGE_FILE,
                        "view": self.view_name, "n_kept": view["n_kept"], "n_flagged": len(flagged),
                        "self_duplicates": int((self_sim >= self.leakage_threshold).sum()),
                        "sets": leakage["sets"], "real_test_to_train": similarity_summary(real_sim.tolist()),
                        "flagged_examples": dict(list(sorted(leakage["flagged"].items()))[:20])},
        }
        write_dataset_grid(folder, records, per_class=self.grid_per_class)  # samples.png, read back from the shards
        atomic_write_json(folder / CARD_JSON, card)
        atomic_write(folder / CARD_MARKDOWN, card_markdown(card))
        rank_zero_info(f"Data card of {len(records)} images: {folder / CARD_MARKDOWN}; {len(flagged)} flagged as "
                       f"copies of real images (view {self.view_name!r} keeps {view['n_kept']}).")


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
