"""The retrieval baseline: instead of generating, take real images from an unlabelled pool by CLIP text-to-image
similarity, and write them as a dataset folder in lbgen's format (``lbgen predict -c
configs/generate/fashion_retrieval.yaml``): the classifier, the scorer, the data card and the report then treat it
like any generated set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lbgen.callbacks.dataset_writer import write_dataset_grid
from lbgen.components.clip import ClipScorer
from lbgen.components.prompts import fill_caption
from lbgen.datamodules.reference import RealReferenceDataModule
from lbgen.distributed import gather_lists
from lbgen.evaluation.leakage import find_copies, image_hashes, pixel_features, to_uint8
from lbgen.models.card import concat_parts
from lbgen.models.precision import low_precision_setup
from lbgen.storage.dataset_format import (
    MANIFEST_FILE,
    SHARD_DIR,
    new_shard_tag,
    png_bytes,
    request_id,
    request_seed,
    shard_name,
    write_manifest,
    write_run,
    write_shard,
)

METHOD = "retrieval"


class RetrievalSystem(L.LightningModule):
    """``lbgen predict`` over a ``RealReferenceDataModule`` whose ``data`` is the unlabelled pool (its labels are
    never read): the ``images_per_class`` pool images most similar to each class's text, as a dataset folder.

    Each pool image goes to the class whose text it is most similar to (so no image serves two classes); each
    class keeps its most similar ones. Images that copy a real training image (the classifier's split: they would
    count twice) or a real test image (leakage) are left out first: exact pixel copies, and near copies with a
    nearest-neighbour similarity >= ``dedup_threshold``. Every manifest record has the image's ``similarity`` (cosine
    to its class text), ``clip_prob`` (CLIP's probability of the class among all class texts: a soft weight),
    ``pool_id`` and its ``rank`` in the class. Images are stored as PNG at the pool's ``image_size``.

    Args:
        clip: the retrieval model (real use ViT-L-14 / openai).
        output_dir: the dataset folder to write (must not hold a finished set).
        images_per_class: k.
        clip_template: the class text.
        dedup_space: near copies by cosine of CLIP ``features`` or of ``pixels`` (grey 16x16 correlation).
        dedup_threshold: similarity at or above which a pool image counts as a copy of a real reference image.
        shard_size: images per shard.
        class_names: linked from the data (the reference's classes: what the pool is searched for).
        num_classes: linked from the data.
    """

    def __init__(self, clip: ClipScorer, output_dir: str, images_per_class: int = 100,
                 clip_template: str = "a photo of a {class}", dedup_space: Literal["features", "pixels"] = "features",
                 dedup_threshold: float = 0.95, shard_size: int = 1000, class_names: list[str] | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}.")
        if dedup_space not in ("features", "pixels"):
            raise ValueError(f"dedup_space must be 'features' or 'pixels', got {dedup_space!r}.")
        if not -1 <= dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold is a cosine similarity in [-1, 1], got {dedup_threshold}.")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        self.clip = clip.requires_grad_(False).eval()
        self.output_dir, self.images_per_class, self.clip_template = Path(output_dir), images_per_class, clip_template
        self.dedup_space, self.dedup_threshold, self.shard_size = dedup_space, dedup_threshold, shard_size
        self._parts: dict[int, list[dict[str, Any]]] = {}

    def setup(self, stage: str) -> None:
        low_precision_setup(self, [self.clip], lora=False)
        if not isinstance(self.trainer.datamodule, RealReferenceDataModule):
            raise ValueError("RetrievalSystem reads an unlabelled pool beside the real data: use data "
                             "RealReferenceDataModule (configs/generate/fashion_retrieval.yaml).")
        if (self.output_dir / MANIFEST_FILE).exists():
            raise FileExistsError(f"{self.output_dir} already holds a finished set; choose a new output_dir or delete "
                                  "it (retrieval is deterministic: rerunning gives the same set).")

    def on_predict_start(self) -> None:
        self._parts = {}

    @property
    def texts(self) -> list[str]:
        return [fill_caption(self.clip_template, n) for n in self.trainer.datamodule.class_names]

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        images = batch["image"]
        features = self.clip.encode_images(images).float()
        part: dict[str, Any] = {"index": batch["index"].cpu().long(), "hash": image_hashes(to_uint8(images).cpu()),
                                "dedup": (pixel_features(images) if self.dedup_space == "pixels" else features).cpu()}
        if dataloader_idx == 0:  # the pool: its labels are not read
            text = self.clip.encode_texts(self.texts)
            scale = self.clip.model.logit_scale.exp().float() if hasattr(self.clip.model, "logit_scale") else 100.0
            sims = features @ text.T
            similarity, assigned = sims.max(dim=1)
            part.update(similarity=similarity.cpu(), assigned=assigned.cpu(),
                        clip_prob=(scale * sims).softmax(-1).max(dim=1).values.cpu())
        self._parts.setdefault(dataloader_idx, []).append(part)

    def on_predict_epoch_end(self) -> None:
        # the references (small) go to every process; each keeps its own pool images' best per class, then only
        # those candidates travel to rank 0: exact, since whether an image is a copy depends on it alone
        train, test = (concat_parts(gather_lists(self._parts.get(i, []))) for i in (1, 2))
        pool = concat_parts(self._parts.get(0, []))
        candidates, removed = self._local_candidates(pool, train, test)
        everyone = gather_lists([(candidates, removed)])
        if self.trainer.is_global_zero:
            self._write([c for cs, _ in everyone for c in cs], sum(n for _, n in everyone))
        self.trainer.strategy.barrier()

    def _local_candidates(self, pool: dict[str, Any], train: dict[str, Any], test: dict[str, Any]
                          ) -> tuple[list[tuple[int, int, float, float]], int]:
        if len(pool["index"]) == 0:
            return [], 0
        copy = torch.zeros(len(pool["index"]), dtype=torch.bool)
        for reference in (train, test):
            if len(reference["index"]):
                found = find_copies(pool["dedup"], pool["hash"], reference["dedup"], reference["hash"],
                                    self.dedup_threshold, device=self.device)
                copy |= torch.tensor(found["flagged"])
        out = []
        for c in range(self.trainer.datamodule.num_classes):
            mine = torch.nonzero((pool["assigned"] == c) & ~copy).flatten()
            best = mine[pool["similarity"][mine].argsort(descending=True)[:self.images_per_class]]
            out += [(int(pool["index"][i]), c, float(pool["similarity"][i]), float(pool["clip_prob"][i]))
                    for i in best]
        return out, int(copy.sum())

    def _write(self, candidates: list[tuple[int, int, float, float]], removed: int) -> None:
        data: RealReferenceDataModule = self.trainer.datamodule
        names, source = data.class_names, data.source(0)
        chosen: list[tuple[int, int, float, float]] = []
        for c in range(len(names)):
            own = sorted((x for x in candidates if x[1] == c), key=lambda x: (-x[2], x[0]))
            chosen += own[:self.images_per_class]
            if len(own) < self.images_per_class:
                rank_zero_info(f"Retrieval: class {names[c]!r} has only {len(own)} pool images (not copies of real "
                               f"training or test images) assigned to it, fewer than {self.images_per_class}.")
        folder = self.output_dir
        (folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        write_run(folder, {"requests": {"class_names": list(names), "method": METHOD, "base_seed": 0,
                                        "images_per_class": self.images_per_class, "template": self.clip_template},
                           "retrieval": {"clip": self.clip.name, "pool": getattr(data.data, "dataset_name", None),
                                         "pool_size": len(source), "reference": data.reference.dataset_name,
                                         "split_seed": data.reference.split_seed, "shots": data.reference.shots,
                                         "dedup_space": self.dedup_space, "dedup_threshold": self.dedup_threshold,
                                         "removed_as_copies": removed}})
        tag, records, shard = new_shard_tag(0), [], []
        ranks: dict[int, int] = {}

        def flush() -> None:
            name = shard_name(tag, len({r["shard"] for r in records}))
            write_shard(folder / SHARD_DIR / name, shard)
            records.extend({**r, "shard": name} for _, r in shard)
            shard.clear()

        for position, c, similarity, clip_prob in chosen:
            i = ranks[c] = ranks.get(c, -1) + 1
            shard.append((png_bytes(source.load(position)), {
                "id": request_id(c, i), "class_index": c, "class_name": names[c], "index": i,
                "seed": request_seed(0, c, i), "prompt": self.texts[c], "method": METHOD, "rank": i,
                "similarity": round(similarity, 6), "clip_prob": round(clip_prob, 6),
                "pool_id": source.sample_id(position)}))
            if len(shard) == self.shard_size:
                flush()
        if shard:
            flush()
        records.sort(key=lambda r: r["id"])
        write_manifest(folder, records)
        write_dataset_grid(folder, records)
        rank_zero_info(f"Retrieved {len(records)} images from a pool of {len(source)} into {folder} ({removed} left "
                       "out as copies of real training or test images).")
