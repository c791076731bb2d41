"""Class names only: the "dataset" of lbGen fine-tuning, which sees no real image.

Also the one reader of class files for every DataModule (``read_class_file``): a list of names, or a class map from
folder names (ImageNet's WordNet ids) to the human names that go into prompts and tables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

WORDNET_ID = re.compile(r"n\d{8}")
"""An ImageNet folder name (a WordNet noun id): a space-separated line ``n01440764 tench, Tinca tinca`` is a map."""

CLASS_FILE_FORMATS = ("a JSON object {folder: name}, a two-column text file 'folder<TAB>name' (or 'wnid name', as "
                      "ImageNet's LOC_synset_mapping.txt), or one name per line")


def _shown(items: list[str], limit: int = 10) -> str:
    """At most ``limit`` items, then how many more: a message stays readable for 1000 classes."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(map(repr, items[:limit])) + more


def read_class_file(path: str | Path, *, first_name_only: bool = False,
                    need_map: bool = False) -> list[str] | dict[str, str]:
    """A class file: a list of names (in class order) or a map ``{folder: human name}``.

    Formats: a ``.json`` file (an object ``{folder: name}`` or a list of names); a text file whose lines hold a TAB
    (``folder<TAB>name``); a text file whose every line starts with a WordNet id (``n01440764 tench, Tinca tinca``,
    ImageNet's ``LOC_synset_mapping.txt``); otherwise one name per line. With ``need_map`` (a DataModule reading
    folders) whitespace also separates the folder from the name. Blank lines and lines starting with ``#`` are skipped.

    Args:
        path: the file.
        first_name_only: keep a name's part before its first comma (``tench, Tinca tinca`` -> ``tench``).
        need_map: the caller maps folders: a plain list of names is an error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line or JSON, an empty name, a folder listed twice, or a list where a map is needed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class_names_file {path} does not exist; give {CLASS_FILE_FORMATS}.")
    text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM written by a spreadsheet is not part of a name
    entries: list[tuple[str, str]] | None = None
    names: list[str] | None = None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text, object_pairs_hook=lambda pairs: pairs)  # pairs: a key given twice is kept
        except json.JSONDecodeError as err:
            raise ValueError(f"class_names_file {path} is not valid JSON ({err}); give {CLASS_FILE_FORMATS}.") from err
        if isinstance(loaded, list) and all(isinstance(n, str) for n in loaded):
            names = loaded
        elif isinstance(loaded, list) and all(isinstance(p, tuple) and len(p) == 2 for p in loaded):
            entries = [(str(k), v if isinstance(v, str) else "") for k, v in loaded]
        else:
            raise ValueError(f"class_names_file {path} holds JSON that is neither an object {{folder: name}} nor a "
                             "list of names.")
    else:
        lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
                 if line.strip() and not line.lstrip().startswith("#")]
        if any("\t" in line for _, line in lines):
            bad = [i for i, line in lines if "\t" not in line]
            if bad:
                raise ValueError(f"class_names_file {path}: line(s) {bad[:10]} have no TAB, but others are "
                                 "'folder<TAB>name'; separate every folder from its name by a TAB.")
            entries = [tuple(part.strip() for part in line.split("\t", 1)) for _, line in lines]
        elif need_map or (lines and all(WORDNET_ID.fullmatch(line.split()[0]) and len(line.split()) > 1
                                        for _, line in lines)):
            bad = [i for i, line in lines if len(line.split(None, 1)) < 2]
            if len(bad) == len(lines):
                names = [line for _, line in lines]  # one word a line: a list of names (refused below)
            elif bad:
                raise ValueError(f"class_names_file {path}: line(s) {bad[:10]} have a folder but no name; a class "
                                 "map has 'folder<TAB>name' (or 'folder name') on every line, a list of names is "
                                 "not one (ImageNet: configs/lbgen/imagenet_class_map.txt).")
            else:
                entries = [tuple(line.split(None, 1)) for _, line in lines]
        else:
            names = [line for _, line in lines]
    if names is not None:
        if need_map:
            raise ValueError(f"class_names_file {path} is a list of names, not a class map: the folders cannot be "
                             "matched to names by position safely. Give 'folder<TAB>name' lines or a JSON object "
                             "{folder: name} (ImageNet: configs/lbgen/imagenet_class_map.txt).")
        return [_first(n) if first_name_only else n.strip() for n in names]
    mapping: dict[str, str] = {}
    twice = []
    for folder, name in entries:
        if folder in mapping:
            twice.append(folder)
        mapping[folder] = _first(name) if first_name_only else name.strip()
    if twice:
        raise ValueError(f"class_names_file {path} lists folder(s) {_shown(sorted(set(twice)))} more than once; "
                         "keep one line per folder.")
    empty = [folder for folder, name in mapping.items() if not name]
    if empty:
        raise ValueError(f"class_names_file {path} gives folder(s) {_shown(empty)} an empty name.")
    return mapping


def _first(name: str) -> str:
    return name.split(",", 1)[0].strip()


def _check_distinct(names: list[str], source: str, folders: list[str] | None = None) -> None:
    """Every class needs its own name (prompts, tables and the real/synthetic match are by name)."""
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        seen.setdefault(name, []).append(i)
    duplicates = {name: at for name, at in seen.items() if len(at) > 1}
    if duplicates:
        where = "; ".join(f"{name!r} for " + (", ".join(folders[i] for i in at) if folders else f"positions {at}")
                          for name, at in list(duplicates.items())[:10])
        raise ValueError(f"Duplicate class names {sorted(duplicates)[:10]} in {source} ({where}): every class needs "
                         "a distinct name for its prompt; rename them (e.g. 'crane (bird)', 'crane (machine)'; for "
                         "ImageNet use configs/lbgen/imagenet_class_map.txt, whose names are distinct).")


def names_for_folders(mapping: dict[str, str], folders: list[str] | None, source: str) -> list[str]:
    """The human names of ``folders`` (default: the map's folders, sorted as torchvision's ``ImageFolder`` orders
    them), after checking the map covers exactly these folders and names each class once.

    Raises:
        ValueError: folders the map misses, map entries for folders that do not exist, or duplicate human names.
    """
    folders = sorted(mapping) if folders is None else list(folders)
    missing = [f for f in folders if f not in mapping]
    known = set(folders)
    extra = sorted(f for f in mapping if f not in known)
    if missing or extra:
        parts = ([f"it has no name for folder(s) {_shown(missing)}: add a line for each"] if missing else []) + (
            [f"it names folder(s) {_shown(extra)} that do not exist: remove those lines (or add the folders)"]
            if extra else [])
        raise ValueError(f"class map {source} does not match the {len(folders)} class folders: {'; '.join(parts)}.")
    names = [mapping[f] for f in folders]
    _check_distinct(names, source, folders)
    return names


def class_list_difference(reference: list[str], other: list[str], reference_label: str, other_label: str) -> str:
    """Where two class lists first differ, e.g. ``position 3: real 'dog', synthetic 'cat'`` ('' when equal)."""
    if list(reference) == list(other):
        return ""
    position = next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b),
                    min(len(reference), len(other)))
    def at(names: list[str]) -> str:
        return repr(names[position]) if position < len(names) else "(no class)"

    sizes = f"{len(reference)} vs {len(other)} classes; " if len(reference) != len(other) else ""
    return (f"{sizes}first difference at position {position}: {reference_label} {at(reference)}, "
            f"{other_label} {at(other)}")


def check_same_classes(reference: list[str], other: list[str], reference_label: str, other_label: str,
                       fix: str) -> None:
    """Raise a ValueError naming the first differing position and both names when the class lists differ."""
    difference = class_list_difference(reference, other, reference_label, other_label)
    if difference:
        raise ValueError(f"The {other_label} classes differ from the {reference_label} classes ({difference}): "
                         f"{fix}")


def read_class_names(class_names: list[str] | None, class_names_file: str | None,
                     first_name_only: bool = False) -> list[str]:
    """Class names from a list or a class file (``read_class_file``; a map gives its names in sorted-folder order,
    the order of the real data's classes), checked for emptiness and duplicates."""
    if (class_names is None) == (class_names_file is None):
        raise ValueError(f"Give exactly one of class_names (a list) or class_names_file ({CLASS_FILE_FORMATS}).")
    source = "class_names"
    if class_names_file is not None:
        read = read_class_file(class_names_file, first_name_only=first_name_only)
        source = f"class_names_file {class_names_file}"
        class_names = names_for_folders(read, None, source) if isinstance(read, dict) else read
    names = [str(n).strip() for n in class_names or []]
    if len(names) < 2:
        raise ValueError(f"Need at least 2 class names, got {names}.")
    if any(not n for n in names):
        raise ValueError(f"A class name in {source} is empty (position {names.index('')}).")
    _check_distinct(names, source)
    return names


class BalancedLabels(Dataset):
    """Item ``i`` is a class index: each block of ``C`` consecutive items is a seeded permutation of all classes,
    so every batch covers the classes evenly and item ``i`` is the same in every run (resume, any world size)."""

    def __init__(self, num_classes: int, length: int, seed: int) -> None:
        self.num_classes, self.length, self.seed = num_classes, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block, offset = divmod(index, self.num_classes)
        label = np.random.default_rng((self.seed, block)).permutation(self.num_classes)[offset]
        return {"label": torch.tensor(int(label)), "index": torch.tensor(index)}


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints (``state_dict``): a run resumed mid-epoch continues with the batch
    after the last one trained, instead of restarting the epoch's sequence."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._skip = self._yielded = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches", 0))


class ClassNamesDataModule(L.LightningDataModule):
    """Batches of class indices for systems that learn from class names only (lbGen).

    Args:
        class_names: the category names (the prompts are built from them).
        class_names_file: or a class file (``read_class_file``): one name per line (e.g. the 1000 ImageNet names),
            or a class map ``folder<TAB>name`` / JSON ``{folder: name}`` whose names are taken in sorted-folder order
            (the order of the real ImageFolder's classes).
        first_name_only: keep each name's part before its first comma (``tench, Tinca tinca`` -> ``tench``).
        batch_size: class names per step and process.
        samples_per_epoch: class names per epoch over all processes (an epoch = this / (batch x world) steps).
        val_per_class: fixed validation prompts per class (generated with fixed seeds every validation).
        seed: the order of classes.
    """

    def __init__(self, class_names: list[str] | None = None, class_names_file: str | None = None,
                 batch_size: int = 4, samples_per_epoch: int = 2000, val_per_class: int = 2, seed: int = 0,
                 first_name_only: bool = False) -> None:
        super().__init__()
        if batch_size <= 0 or samples_per_epoch <= 0 or val_per_class < 0:
            raise ValueError("batch_size and samples_per_epoch must be positive and val_per_class >= 0, got "
                             f"{batch_size}, {samples_per_epoch}, {val_per_class}.")
        self._class_names = read_class_names(class_names, class_names_file, first_name_only)
        self.batch_size, self.samples_per_epoch = batch_size, samples_per_epoch
        self.val_per_class, self.seed = val_per_class, seed

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(BalancedLabels(self.num_classes, self.samples_per_epoch, self.seed),
                               batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_per_class:
            return []
        # a different seed from training; the same prompts in every validation
        return DataLoader(BalancedLabels(self.num_classes, self.val_per_class * self.num_classes, self.seed + 1),
                          batch_size=self.batch_size, shuffle=False)
