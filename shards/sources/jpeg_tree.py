"""Full-resolution ImageNet as a folder tree ``<root>/train/<wnid>/*.JPEG`` (and ``val/<wnid>/``).

The tree is listed in a fixed order -- class folders by name, files by name -- so a build does
not depend on the file system's listing order (the authors' ``generate_dataset.py`` uses
``os.listdir``'s, which differs between file systems; sorting is our stand-in).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = (".jpeg", ".jpg", ".png")


@dataclass
class ClassTree:
    """One split folder: class folder names (sorted) and each class's relative image paths."""

    folder: Path
    classes: list[str]
    files: list[list[str]]  # files[k]: "<split>/<class>/<name>", sorted by name

    def count(self) -> int:
        return sum(len(f) for f in self.files)


def scan_class_tree(root: Path, split: str) -> ClassTree:
    """List ``root/split/<class>/<image>``.

    Raises:
        ValueError: the folder is missing or holds no class folder, a file where a class folder
            belongs, a class folder without images, or a file that is not an image (named).
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise ValueError(f"{folder}: not found (expected {split}/<wnid>/*.JPEG under {root})")
    classes: list[str] = []
    files: list[list[str]] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise ValueError(f"{entry.path}: a file where a class folder ({split}/<wnid>/) belongs")
        names = sorted(e.name for e in os.scandir(entry.path) if not e.name.startswith("."))
        bad = [n for n in names if not n.lower().endswith(IMAGE_EXTS)]
        if bad:
            raise ValueError(f"{Path(entry.path) / bad[0]}: not an image file ({'/'.join(IMAGE_EXTS)})")
        if not names:
            raise ValueError(f"{entry.path}: class folder without images")
        classes.append(entry.name)
        files.append([f"{split}/{entry.name}/{n}" for n in names])
    if not classes:
        raise ValueError(f"{folder}: no class folder ({split}/<wnid>/*.JPEG)")
    return ClassTree(folder, classes, files)
