"""Evaluation sets of the data module: which sets, from the ``zeroshot`` / ``retrieval``
entries (``"name"`` or ``"name=root"``), and their datasets for one split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import DataLoader, Dataset

from sclip_lightning.data import registry
from sclip_lightning.data.datasets import (
    KeyedSet,
    RetrievalProtocol,
    RetrievalSet,
    collate_retrieval,
)
from sclip_lightning.data.sampling import eval_loader
from sclip_lightning.evaluation import EvalSpec

Kind = Literal["zeroshot", "retrieval"]


def eval_entries(
    given: list[str] | None, kind: Kind, dataset: str, root: str | None
) -> list[tuple[str, str, Path]]:
    """``(source name, display name, root)`` of each evaluation set of ``kind``.

    ``given`` None: the training ``dataset`` itself, when it has classes (zero-shot) or
    captions (retrieval) and evaluates itself. An entry without a root takes ``root`` when it
    names ``dataset``. The display name is the data set's name (``rsscn7``, not
    ``rsscn7=/data/RSSCN7``), with ``-2``, ``-3`` ... when one source is given twice.
    """
    if given is None:
        src = registry.get_source(dataset)
        has = src.classes if kind == "zeroshot" else src.captioned
        given = [dataset] if has is not None and src.evaluates_itself else []
    out, seen = [], {}  # type: ignore[var-annotated]
    for entry in given:
        name, _, where = entry.partition("=")
        r = registry.resolve_root(name, where or (root if name == dataset else None))
        seen[name] = seen.get(name, 0) + 1
        out.append((name, name if seen[name] == 1 else f"{name}-{seen[name]}", r))
    return out


@dataclass
class EvalSet:
    """One evaluation set of a split: its dataset, spec and collate function."""

    dataset: Dataset
    spec: EvalSpec
    collate_fn: Callable | None = None


def build_eval_sets(
    entries: list[tuple[str, str, Path]],
    kind: Kind,
    split: str,
    transform: Callable,
    tokenizer: Callable,
    outputs: Callable[[str, Any, bool], Any],
    templates: list[str] | None,
    retrieval_protocol: RetrievalProtocol,
    source_kwargs: Callable[[str], dict[str, Any]],
) -> list[EvalSet]:
    """The datasets of ``entries`` for ``split``.

    Args:
        outputs: ``(name, base, captions) -> TowerOutputs | None`` (the tower-output cache).
        templates: zero-shot prompt templates (None: each source's own).
        source_kwargs: keyword arguments of a captioned source, by name.
    """
    sets = []
    for name, label, root in entries:
        if kind == "zeroshot":
            kw = source_kwargs(name)
            base = registry.build_classes(name, root, split, skip_corrupt=kw["skip_corrupt"])
            keyed = KeyedSet(base, transform, ("label",), outputs(f"{label}/{split}", base, False))
            prompts = templates or registry.get_source(name).templates
            spec = EvalSpec(label, kind, list(base.classes), prompts, split)
            sets.append(EvalSet(keyed, spec))
        else:
            base = registry.build_captioned(name, root, split, **source_kwargs(name))
            rs = RetrievalSet(
                base,
                transform,
                tokenizer,
                retrieval_protocol,
                outputs=outputs(f"{label}/{split}", base, True),
            )
            sets.append(EvalSet(rs, EvalSpec(label, kind, split=split), collate_retrieval))
    return sets


def eval_loaders(
    hp: Any,
    split: str,
    kinds: tuple[Kind, ...],
    transform: Callable,
    tokenizer: Callable,
    outputs: Callable[[str, Any, bool], Any],
    source_kwargs: Callable[[str], dict[str, Any]],
) -> tuple[list[DataLoader], list[EvalSpec]]:
    """The in-order loaders of every evaluation set of ``kinds`` for ``split`` and their
    specs, from a data module's hyperparameters ``hp`` (see :func:`build_eval_sets`)."""
    loaders, specs = [], []
    for kind in kinds:
        given = hp.zeroshot if kind == "zeroshot" else hp.retrieval
        entries = eval_entries(given, kind, hp.dataset, hp.root)
        for es in build_eval_sets(
            entries, kind, split, transform, tokenizer, outputs, hp.templates,
            hp.retrieval_protocol, source_kwargs,
        ):  # fmt: skip
            batch, workers = hp.eval_batch_size, hp.num_workers
            loaders.append(eval_loader(es.dataset, batch, workers, collate_fn=es.collate_fn))
            specs.append(es.spec)
    return loaders, specs


def predict_classes(
    given: list[str] | None,
    templates: list[str] | None,
    zeroshot: list[str] | None,
    dataset: str,
    root: str | None,
    split: str,
) -> tuple[list[str], list[str]]:
    """``predict``'s class names and templates: ``given`` (with ``templates`` or the training
    source's own), else the classes and templates of the first zero-shot set."""
    if given:
        return list(given), list(templates or registry.get_source(dataset).templates)
    entries = eval_entries(zeroshot, "zeroshot", dataset, root)
    if not entries:
        raise ValueError("predict needs class names: set data.predict_classes or a zero-shot set")
    name, _, where = entries[0]
    classes = list(registry.build_classes(name, where, split).classes)
    return classes, list(templates or registry.get_source(name).templates)


def predict_set(hp: Any, transform: Callable) -> tuple[KeyedSet, EvalSpec, list[str]]:
    """``predict``'s data set (``{"image", "index", "path"}`` of every image under
    ``hp.predict_root``, any depth), its spec (:func:`predict_classes`) and its image paths,
    from a data module's hyperparameters ``hp``."""
    if hp.predict_root is None:
        raise ValueError("predict needs data.predict_root: a folder of images to label")
    from sclip_lightning.data.generic import ImageFolderUnpaired

    base = ImageFolderUnpaired(hp.predict_root, skip_corrupt=hp.skip_corrupt)
    classes, templates = predict_classes(
        hp.predict_classes, hp.templates, hp.zeroshot, hp.dataset, hp.root, hp.test_split
    )
    spec = EvalSpec(str(hp.predict_root), "predict", classes, list(templates))
    return KeyedSet(base, transform, ("path",)), spec, [str(p) for p in base.paths]
