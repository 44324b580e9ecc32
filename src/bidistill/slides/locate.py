"""Finding slides and their annotations on disk: a folder of slides indexed by slide id, the
annotation file of a slide, and a lookup over the files and folders a user gives."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bidistill.errors import ConfigError, SlideError
from bidistill.slides.reader import SLIDE_SUFFIXES

ANNOTATION_SUFFIXES = (".json", ".geojson")


def index_slide_files(slides_dir: Path) -> dict[str, Path]:
    """Map slide id → file, for ``<slide_id>.<supported ext>`` files and ``<slide_id>/`` folders;
    a file wins over a folder of the same name (MIRAX keeps its data in one beside the ``.mrxs``).
    """
    if not slides_dir.is_dir():
        raise ConfigError(f"{slides_dir}: slides folder not found (`slides.dir` in the config)")
    files: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    for entry in sorted(slides_dir.iterdir()):
        if entry.is_dir():
            folders[entry.name] = entry
        elif entry.suffix.lower() in SLIDE_SUFFIXES:
            files.setdefault(entry.stem, entry)
    return {**folders, **files}


def locate_annotations(annotations_dir: Path | None, slide_id: str) -> Path | None:
    if annotations_dir is None:
        return None
    for suffix in ANNOTATION_SUFFIXES:
        candidate = annotations_dir / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


class SlideFinder:
    """slide id → slide file or patch folder, among files, patch folders and folders of slides
    (a folder named by the slide id is that slide's patch folder)."""

    def __init__(self, items: Sequence[str | Path]):
        self.folders: dict[str, Path] = {}
        self.indexed: dict[str, Path] = {}
        self.files: dict[str, Path] = {}
        for item in map(Path, items):
            if item.is_dir():
                self.folders.setdefault(item.name, item)
                for slide_id, path in index_slide_files(item).items():
                    self.indexed.setdefault(slide_id, path)
            elif item.is_file():
                self.files[item.stem] = item
            else:
                raise SlideError(f"{item}: no such slide file or folder")

    def find(self, slide_id: str) -> Path | None:
        return self.files.get(slide_id) or self.folders.get(slide_id) or self.indexed.get(slide_id)

    def slide_ids(self) -> list[str]:
        """Every slide file given, and every slide in the folders given (a patch folder is a
        slide of the folder holding it)."""
        return list(dict.fromkeys([*self.files, *self.indexed]))
