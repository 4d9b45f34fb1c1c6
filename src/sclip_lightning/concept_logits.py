"""The file SemiCLIP's stage 1 hands to stage 2: concept logits of every unpaired image.

Written by :class:`~sclip_lightning.callbacks.ConceptLogitsWriter` at the end of stage 1,
read by :class:`~sclip_lightning.losses.SemiCLIPLoss` in stage 2. The file is keyed: it names
the concepts, the unpaired images (their paths, in order) and a digest of the concept
embeddings and scale it was computed with, so a stage 2 given another run's file (other
data, split, concepts, or a stage-1 checkpoint other than the one it starts from) stops with
an error instead of training on wrong targets (the release keys its pickle by dataset index
only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FORMAT = "sclip-concept-logits/1"


def save_concept_logits(
    path: str | Path,
    logits: torch.Tensor,
    concepts: list[str],
    unpaired_keys: list[str],
    unpaired_index: list[int],
    embedding_digest: str,
    view: str,
) -> Path:
    """Write the (N_u, K) logits with their keys (parent folders created)."""
    if logits.shape != (len(unpaired_keys), len(concepts)):
        raise ValueError(
            f"logits must be (N_u, K) = ({len(unpaired_keys)}, {len(concepts)}); got "
            f"{tuple(logits.shape)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "format": FORMAT,
        "logits": logits.detach().float().cpu().contiguous(),
        "concepts": list(concepts),
        "unpaired_keys": list(unpaired_keys),
        "unpaired_index": [int(i) for i in unpaired_index],
        "embedding_digest": embedding_digest,
        "view": view,
    }
    torch.save(record, path)
    return path


def load_concept_logits(
    path: str | Path,
    concepts: list[str],
    unpaired_keys: list[str],
    unpaired_index: list[int],
    embedding_digest: str,
) -> torch.Tensor:
    """The stage-1 logits as a table indexed by the unpaired items' ``index``: (max index
    + 1, K), NaN rows for indices that are not unpaired images.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not such a file, or written for other concepts, other unpaired images or
            other concept embeddings than this run's (each named with the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"stage-1 concept logits not found: {path}. Run stage 1 with the "
            "ConceptLogitsWriter callback first (configs/semiclip/*stage1*.yaml)"
        )
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a concept-logits file written by ConceptLogitsWriter")
    if record["concepts"] != list(concepts):
        raise ValueError(
            f"{path} holds logits over {len(record['concepts'])} concepts that differ from this "
            f"run's {len(concepts)}: stage 2 must mine concepts as stage 1 did (same data, "
            "label_ratio, split_seed and concept options)"
        )
    keys = record["unpaired_keys"]
    if keys != list(unpaired_keys) or record["unpaired_index"] != list(unpaired_index):
        first = next(
            (i for i, (a, b) in enumerate(zip(keys, unpaired_keys, strict=False)) if a != b),
            min(len(keys), len(unpaired_keys)),
        )
        raise ValueError(
            f"{path} was written for {len(keys)} unpaired images, this run has "
            f"{len(unpaired_keys)} (first difference at position {first}): stage 2 must use "
            "stage 1's data split (dataset, label_ratio, split_seed)"
        )
    if record["embedding_digest"] != embedding_digest:
        raise ValueError(
            f"{path} was computed with other concept embeddings than the checkpoint this stage "
            "starts from (model.init_from): give stage 2 the logits file and the checkpoint of "
            "the same stage-1 run"
        )
    logits = record["logits"]
    size = max(unpaired_index, default=-1) + 1
    table = torch.full((size, logits.shape[1]), float("nan"))
    if unpaired_index:
        table[torch.tensor(unpaired_index)] = logits
    return table
