"""Rendering: how a curator sees one example, as an image, text, or a few fields.

A task may define ``render(example)`` returning an image (a 2-D/3-D array, tensor or PIL image),
text, or a small mapping of fields (which may hold one image). Without it the stored payload is
rendered: images from 2-D/3-D arrays in it (or a flat square array under an image-like name such as
``pixels``), text from ``text``/``tokens``-like fields, and the remaining short fields as they are.
The CLI (``examples show``), the HTML report and the review page all go through ``render_stored``.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InfluenceStoreError

IMAGE_NAMES = ("image", "img", "pixels", "picture", "x")
TEXT_NAMES = ("text", "tokens", "sentence", "sentence1", "sentence2", "premise", "hypothesis", "question",
              "passage", "source", "target")
MIN_SIDE = 96  # small images (8x8 digits) are scaled up by a whole factor to at least this many pixels


@dataclass
class Rendering:
    """What one example looks like: an optional PNG image, optional text, and short fields."""

    png: bytes | None = None
    text: str | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def data_uri(self) -> str | None:
        """The image as a ``data:`` URI for an ``<img>`` that needs no server or network."""
        return None if self.png is None else "data:image/png;base64," + base64.b64encode(self.png).decode()

    def as_text(self) -> str:
        """Plain-text form for a terminal."""
        lines = [self.text] if self.text else []
        lines += [f"{k}: {v}" for k, v in self.fields.items()]
        if self.png is not None:
            lines.append("(image; write it with -o FILE.png)")
        return "\n".join(lines)


def to_rendering(value: Any) -> Rendering:
    """Turn what ``render`` (or a stored payload) gives into a Rendering."""
    image = _image_array(value)
    if image is not None:
        return Rendering(png=png_bytes(image))
    if _is_pil(value):
        return Rendering(png=png_bytes(value))
    if isinstance(value, str):
        return Rendering(text=value)
    if isinstance(value, dict):
        return _render_mapping(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return Rendering(text=" ".join(value))
    return Rendering(text=_short(value, 2000))


def _render_mapping(mapping: dict) -> Rendering:
    out = Rendering()
    rest = dict(mapping)
    for name in list(rest):  # first image-like field becomes the picture
        value = rest[name]
        image = _image_array(value) if not _is_pil(value) else value
        if image is None and str(name).lower() in IMAGE_NAMES:
            image = _square(value)
        if image is not None:
            out.png = png_bytes(image)
            del rest[name]
            break
    for name in list(rest):
        value = rest[name]
        if str(name).lower() in TEXT_NAMES and (isinstance(value, str) or _strings(value)):
            text = value if isinstance(value, str) else " ".join(value)
            out.text = f"{out.text}\n{name}: {text}" if out.text else (text if len(rest) == 1 else f"{name}: {text}")
            del rest[name]
    for name, value in rest.items():
        if isinstance(value, str) or _strings(value):
            out.fields[str(name)] = _short(value if isinstance(value, str) else " ".join(value), 300)
        elif not _is_long(value):
            out.fields[str(name)] = _short(value, 120)
    return out


def png_bytes(image: Any) -> bytes:
    """PNG bytes of an image array (H x W, H x W x C or C x H x W) or PIL image, small ones scaled up."""
    from PIL import Image

    if not _is_pil(image):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # channels first (PyTorch) -> channels last
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if low >= 0 and high <= 1:
            low, high = 0.0, 1.0
        elif low >= 0 and high <= 255:
            low, high = 0.0, 255.0
        scaled = np.nan_to_num((array - low) / ((high - low) or 1.0)).clip(0, 1) * 255
        image = Image.fromarray(scaled.round().astype(np.uint8))
    factor = max(1, math.ceil(MIN_SIDE / max(1, min(image.size))))
    if factor > 1:
        image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_example(task, example: Any) -> Rendering:
    """Render a task's example with its ``render`` when it has one, else its JSON description."""
    value = task.render(example) if getattr(task, "render", None) is not None else task.describe(example)
    return to_rendering(value)


class StoredRenderer:
    """Renders stored examples from their stored payload, or with ``use_task`` through the ``render`` of
    the task of a run that saw them (loading a task may retrain its model, so it is asked for; each task
    is loaded at most once, and one that fails to load falls back to the payload)."""

    def __init__(self, use_task: bool = False) -> None:
        self.use_task = use_task
        self._tasks: dict[str, Any] = {}
        self.problems: dict[str, str] = {}  # task spec -> why it could not be used

    def render(self, example: dict, run: dict | None = None) -> Rendering:
        """``example`` is a row of ``Store.examples``; ``run`` a run that saw it (gives the task)."""
        found = self._task_example(example, run) if (self.use_task and run) else None
        if found is not None:
            task, item = found
            try:
                return render_example(task, item)
            except Exception as exc:  # a faulty user render must not take the page down
                self.problems[run["task_spec"]] = f"render failed: {type(exc).__name__}: {exc}"
        return to_rendering(example["payload"])

    def _task_example(self, example: dict, run: dict):
        entry = self._load(run)
        if entry is None:
            return None
        task, index = entry
        item = index.get(example["key"])
        if item is None or example.get("content_hash") not in (None, item[1]):
            return None  # the task's data changed since the run: show what the store holds
        return task, item[0]

    def _load(self, run: dict):
        spec = run["task_spec"]
        cache_key = spec + json.dumps(run.get("task_options") or {}, sort_keys=True)
        if cache_key not in self._tasks:
            self._tasks[cache_key] = None
            try:
                from .task import content_hash, load_task

                task = load_task(spec, run.get("task_options") or {})
                if getattr(task, "render", None) is not None:  # without one, the stored payload renders the same
                    index = {}
                    for split in ("train", "test"):
                        for k, e in zip(task.keys(split), getattr(task, split)):
                            index[k] = (e, content_hash(task.describe(e)))
                    self._tasks[cache_key] = (task, index)
            except Exception as exc:  # moved file, missing package: fall back to the stored payload
                self.problems[spec] = f"{type(exc).__name__}: {exc}"
        return self._tasks[cache_key]


def write_rendering(rendering: Rendering, output: str) -> str:
    """Write a rendering's image to a .png file, or its text to any other file."""
    from pathlib import Path

    path = Path(output)
    if not path.parent.is_dir():
        raise InfluenceStoreError(f"folder {str(path.parent)!r} does not exist; create it first")
    if path.suffix.lower() == ".png":
        if rendering.png is None:
            raise InfluenceStoreError("this example renders as text, not an image; write it to a .txt file")
        path.write_bytes(rendering.png)
    else:
        path.write_text(rendering.as_text() + "\n")
    return str(path)


def _image_array(value: Any):
    """The value as a numeric 2-D/3-D array when it looks like an image, else None."""
    if isinstance(value, (str, bytes, dict)) or value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and not (value and isinstance(value[0], (list, tuple))):
        return None
    try:
        import numpy as np

        array = np.asarray(value)
    except Exception:
        return None
    if array.dtype.kind not in "biuf" or array.ndim not in (2, 3) or min(array.shape) < 1:
        return None
    if array.ndim == 3 and not (array.shape[0] in (1, 3, 4) or array.shape[2] in (1, 3, 4)):
        return None
    if array.ndim == 2 and min(array.shape) < 4:  # e.g. a few (x, y) pairs: numbers, not a picture
        return None
    return array


def _square(value: Any):
    """A flat numeric list whose length is a square (>= 16), as a square image; else None."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
        return None
    side = math.isqrt(len(value))
    if side < 4 or side * side != len(value):
        return None
    import numpy as np

    return np.asarray(value, dtype=np.float64).reshape(side, side)


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save")


def _strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def _is_long(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict)) and len(value) > 12


def _short(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"
