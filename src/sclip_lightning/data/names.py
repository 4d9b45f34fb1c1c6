"""Class-name cleaning for prompts."""

from __future__ import annotations

import re

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def clean_class_name(name: str, drop_letter_prefix: bool = False) -> str:
    """Turn a folder or file class name into prompt words.

    ``"DenseResidential"``, ``"dense_residential"``, ``"dense-residential"`` ->
    ``"dense residential"``; with ``drop_letter_prefix`` (RSSCN7's ``aGrass``) -> ``"grass"``.
    """
    name = name.strip()
    if drop_letter_prefix and len(name) > 1 and name[0].islower() and name[1].isupper():
        name = name[1:]
    name = name.replace("_", " ").replace("-", " ")
    name = _CAMEL.sub(" ", name)
    return re.sub(r"\s+", " ", name).strip().lower()
