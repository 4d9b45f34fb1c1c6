"""Comics: Simpsons captions (a Hugging Face ``save_to_disk`` folder or a caption table)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sclip_lightning.data.base import CaptionedDataset, Transform, require
from sclip_lightning.data.generic import CaptionTable
from sclip_lightning.data.images import CorruptImageError, to_rgb


class SimpsonsCaptions(CaptionedDataset):
    """Simpsons captions (the release: Hugging Face ``Norod78/simpsons-blip-captions``).

    ``root`` is either a folder written by ``datasets``' ``save_to_disk`` (columns ``image``
    and ``text``; a DatasetDict's ``train`` part is used) or a caption table (CSV/TSV/JSONL
    with ``image`` and ``text`` columns, see :class:`CaptionTable`). As in the release, a
    seeded permutation (seed 42) keeps 90% for ``"train"`` and 10% for ``"val"``/``"test"``.
    Needs ``datasets`` for the folder form (``pip install datasets``).
    """

    LAYOUT = "<root>/ (datasets.save_to_disk folder: image, text) or a table file"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        train_ratio: float = 0.9,
        seed: int = 42,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        import torch

        self.root = require(Path(root), "Simpsons captions", self.LAYOUT)
        self._hf = None
        if self.root.is_file():
            table = CaptionTable(self.root, caption_column="text", skip_corrupt=skip_corrupt)
            texts, paths = table.captions, table.paths
        else:
            try:
                import datasets
            except ImportError as e:
                raise ImportError(
                    "reading a Hugging Face dataset folder needs `pip install datasets`"
                ) from e
            hf = datasets.load_from_disk(str(self.root))
            if isinstance(hf, datasets.DatasetDict):
                hf = hf["train"]
            if "image" not in hf.column_names or "text" not in hf.column_names:
                raise KeyError(f"{self.root}: needs columns image and text, has {hf.column_names}")
            self._hf = hf
            texts = [[t] for t in hf["text"]]
            paths = [Path(f"{self.root}#{i}") for i in range(len(hf))]
        n = len(texts)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        cut = int(n * train_ratio)
        keep = perm[:cut] if split == "train" else perm[cut:]
        self.rows = keep
        for i in keep:
            self._add(paths[i], texts[i], f"{self.root} record {i}")

    def load(self, index: int) -> tuple[Image.Image, str]:
        if self._hf is None:
            return super().load(index)
        row = self.rows[index]
        try:
            image = to_rgb(self._hf[row]["image"])
        except (OSError, ValueError, TypeError, SyntaxError) as e:
            raise CorruptImageError(
                f"cannot decode the image of record {row} of {self.root}: {e}. Repair the "
                "dataset, or pass skip_corrupt=True to skip unreadable images (counted, logged)."
            ) from e
        return image, str(self.paths[index])
