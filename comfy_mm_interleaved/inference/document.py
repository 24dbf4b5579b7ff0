"""``Interleaved``: an ordered list of text segments and images, the input and output of generation.

    doc = Interleaved(["A red square.", Image.open("a.png"), "Then it turns"])
    doc = doc.append_text("blue.").append_image(comfy_image)      # every append returns a NEW document
    doc.to_json("out/story.json")                                   # images written beside it as PNG
    Interleaved.from_json("out/story.json")

JSON format: ``[{"text": "..."}, {"image": "relative/or/absolute.png"}, ...]`` (a bare string is a text segment;
``{"segments": [...]}`` and the training JSONL's ``"loss"`` key are accepted too). ``{"image": null}`` is a *pending*
image: the document asks for an image there (the official gray placeholder). Only the last segment may be pending;
:meth:`InterleavedEngine.generate_images` resolves it.

Images are kept as 8-bit RGB PIL images. Inputs are converted: PIL images of any common mode (transparent ones are
composited onto white, 16-bit ones scaled to 8 bits), file paths, ComfyUI ``IMAGE`` tensors ``[B, H, W, C]`` /
``[H, W, C]`` float in [0, 1] (C = 1, 3 or 4) and uint8 arrays. Floating-point PIL images (mode ``F``) are refused.
The model later center-crops and resizes every image to its encoder size, as the official pipeline does.

The official tokenisation of a document is ``<s>`` + text with, for every image, ``<|beginofimage|>`` followed by
``num_img_token`` x ``<|image|>`` (:func:`comfy_mm_interleaved.tokenizer.encode_document`); a text segment produced
by the model keeps its exact token ids so that the continued document tokenises to what the model generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------------------
# Segments


@dataclass(frozen=True)
class TextPart:
    """A piece of text. ``token_ids`` holds the exact ids of model-generated text (never written to JSON)."""

    text: str
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"text segments must be str, got {type(self.text).__name__}")


@dataclass(frozen=True, eq=False)
class ImagePart:
    """An 8-bit RGB image, or ``image=None`` for a pending image. ``key`` is a hash of the pixels (the engine's
    feature-cache key); ``source`` remembers where the image came from (informational)."""

    image: Image.Image | None
    source: str | None = None
    key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.image is not None:
            if not isinstance(self.image, Image.Image) or self.image.mode != "RGB":
                raise TypeError("ImagePart.image must be an RGB PIL image; build parts with Interleaved(...)")
            object.__setattr__(self, "key", image_key(self.image))

    @property
    def pending(self) -> bool:
        return self.image is None


Segment = TextPart | ImagePart


def image_key(image: Image.Image) -> str:
    """Content hash of an RGB image (size and pixels)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Image conversion


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_CONVERTIBLE_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _white_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """A new 8-bit RGB copy of a PIL image (alpha composited onto white, 16-bit scaled); clear errors otherwise."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name} is empty ({image.width}x{image.height})")
    mode = image.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _white_background(image)
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"{name} is a 32-bit integer image with values outside 0..65535; convert it to 8-bit RGB first"
            )
        gray = np.rint(values / 257.0).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(gray).convert("RGB")
    if mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")  # always a new image, also for RGB
    raise ValueError(
        f"{name} has PIL mode {mode!r}, which cannot be converted unambiguously; convert it to 8-bit RGB "
        "(e.g. image.convert('RGB')) first"
    )


def _array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
    """[H, W, C] uint8 or float in [0, 1] (C = 1, 3, 4) -> RGB PIL image (float rounded as the official code)."""
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(
            f"{name} must be an image array [H, W, C] (ComfyUI IMAGE layout, C = 1, 3 or 4), got shape "
            f"{tuple(array.shape)}"
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name} must be float in [0, 1] or uint8, got {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        array = np.clip(array.astype(np.float64) * 255 + 0.5, 0, 255).astype(np.uint8)
    channels = array.shape[-1]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    return to_rgb(Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode), name)


def tensor_to_images(tensor: torch.Tensor, name: str = "image") -> list[Image.Image]:
    """ComfyUI ``IMAGE`` [B, H, W, C] or one [H, W, C] (float in [0, 1] or uint8) -> RGB PIL images."""
    array = tensor.detach().to("cpu")
    if array.is_floating_point():
        array = array.float()
    array = array.numpy()
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(
            f"{name} must be a ComfyUI IMAGE tensor [B, H, W, C] or [H, W, C], got shape {tuple(tensor.shape)}"
        )
    if array.shape[0] == 0:
        raise ValueError(f"{name} is an empty IMAGE batch {tuple(tensor.shape)}: pass at least one image")
    return [_array_to_rgb(a, f"{name}[{i}]") for i, a in enumerate(array)]


def check_inside(path: PathLike, root: PathLike, what: str) -> None:
    """Refuse ``path`` unless it lies inside the folder ``root`` (by its normalised absolute path, as ComfyUI checks
    its own files: a symlink placed inside the folder is the folder owner's choice)."""
    folder = os.path.abspath(root)
    if os.path.commonpath([os.path.abspath(path), folder]) != folder:
        raise ValueError(f"{what} lies outside {folder}; only files inside that folder can be used here")


def load_image_file(
    path: PathLike, base_dir: PathLike | None = None, name: str = "image", root: PathLike | None = None
) -> Image.Image:
    """Open an image file (relative to ``base_dir``) as RGB, with a clear error when missing or unreadable.

    ``root``: refuse a file outside that folder (a document that a server loads for its users must not read the
    server's other files)."""
    resolved = Path(path)
    if base_dir is not None and not resolved.is_absolute():
        resolved = Path(base_dir) / resolved
    if root is not None:
        check_inside(resolved, root, f"{name}: image {str(path)!r}")
    if not resolved.is_file():
        where = f" (resolved against {base_dir})" if base_dir is not None and not Path(path).is_absolute() else ""
        raise FileNotFoundError(f"{name}: image file not found: {resolved}{where}")
    try:
        with Image.open(resolved) as image:
            image.load()
            return to_rgb(image, f"{name} ({resolved})")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{name}: cannot read image {resolved}: {err}") from None


def as_images(item: Any, base_dir: PathLike | None = None, name: str = "image") -> list[Image.Image]:
    """PIL image, path, ComfyUI tensor (a batch gives several images) or uint8 / float array -> RGB images."""
    if isinstance(item, Image.Image):
        return [to_rgb(item, name)]
    if isinstance(item, str | os.PathLike):
        return [load_image_file(item, base_dir, name)]
    if torch.is_tensor(item):
        return tensor_to_images(item, name)
    if isinstance(item, np.ndarray):
        return tensor_to_images(torch.from_numpy(item), name)
    raise TypeError(
        f"{name} is a {type(item).__name__}; use a PIL image, a file path or a ComfyUI IMAGE tensor [B, H, W, C]"
    )


# ----------------------------------------------------------------------------------------------------------------
# The document


class Interleaved:
    """An immutable ordered list of :class:`TextPart` / :class:`ImagePart`.

    The constructor takes segments (``TextPart``/``ImagePart``) or plain items: ``str`` = text, PIL image / path /
    ComfyUI tensor / array = image(s), ``None`` = a pending image (last position only). ``meta`` carries optional
    information such as the official annotation's ``generate_mode`` / ``num_iter``.
    """

    def __init__(self, items: Iterable[Any] = (), *, base_dir: PathLike | None = None, meta: dict | None = None):
        segments: list[Segment] = []
        for i, item in enumerate(items):
            name = f"segment {i}"
            if isinstance(item, TextPart | ImagePart):
                segments.append(item)
            elif isinstance(item, str):
                segments.append(TextPart(item))
            elif item is None:
                segments.append(ImagePart(None))
            else:
                source = str(item) if isinstance(item, str | os.PathLike) else None
                segments += [ImagePart(img, source) for img in as_images(item, base_dir, name)]
        pending = [i for i, s in enumerate(segments) if isinstance(s, ImagePart) and s.pending]
        if pending and pending != [len(segments) - 1]:
            raise ValueError(
                f"only the last segment may be a pending image ({{'image': null}}), found one at segment(s) {pending}"
            )
        self._segments: tuple[Segment, ...] = tuple(segments)
        self.meta: dict = dict(meta or {})

    # ---- read access ---------------------------------------------------------------------------------------
    @property
    def segments(self) -> tuple[Segment, ...]:
        return self._segments

    def __len__(self) -> int:
        return len(self._segments)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self._segments)

    def __getitem__(self, index: int) -> Segment:
        return self._segments[index]

    def __repr__(self) -> str:
        return f"Interleaved({self.to_readable_text()!r})"

    @property
    def images(self) -> list[Image.Image]:
        """The (resolved) images in order."""
        return [s.image for s in self._segments if isinstance(s, ImagePart) and not s.pending]

    @property
    def image_parts(self) -> list[ImagePart]:
        return [s for s in self._segments if isinstance(s, ImagePart) and not s.pending]

    @property
    def num_images(self) -> int:
        return len(self.image_parts)

    @property
    def ends_with_pending_image(self) -> bool:
        return bool(self._segments) and isinstance(self._segments[-1], ImagePart) and self._segments[-1].pending

    def is_empty(self) -> bool:
        """No image and no non-blank text."""
        return not any(isinstance(s, ImagePart) or s.text.strip() for s in self._segments)

    def to_readable_text(self) -> str:
        """Text with ``<image k>`` markers (1-based; ``<image k: pending>`` for a pending image)."""
        pieces, k = [], 0
        for seg in self._segments:
            if isinstance(seg, ImagePart):
                k += 1
                pieces.append(f"<image {k}: pending>" if seg.pending else f"<image {k}>")
            elif seg.text.strip():
                pieces.append(seg.text.strip())
        return " ".join(pieces)

    # ---- new documents -------------------------------------------------------------------------------------
    def _with(self, segments: Sequence[Segment]) -> Interleaved:
        return Interleaved(segments, meta=self.meta)

    def append_text(self, text: str, token_ids: Sequence[int] | None = None) -> Interleaved:
        """A new document with ``text`` appended (``token_ids``: its exact ids, for model-generated text)."""
        return self._with([*self._segments, TextPart(text, None if token_ids is None else tuple(token_ids))])

    def append_image(self, image: Any, base_dir: PathLike | None = None) -> Interleaved:
        """A new document with the image(s) appended; a pending last image is resolved by the first one."""
        new = [ImagePart(img, str(image) if isinstance(image, str | os.PathLike) else None)
               for img in as_images(image, base_dir, "appended image")]  # fmt: skip
        return self._with([*self.without_pending_image()._segments, *new])

    def append_pending_image(self) -> Interleaved:
        """A new document that asks for an image at its end (no-op if it already does)."""
        if self.ends_with_pending_image:
            return self
        return self._with([*self._segments, ImagePart(None)])

    def without_pending_image(self) -> Interleaved:
        return self._with(self._segments[:-1]) if self.ends_with_pending_image else self

    # ---- JSON ----------------------------------------------------------------------------------------------
    @classmethod
    def from_list(
        cls, data: Any, base_dir: PathLike | None = None, name: str = "document", root: PathLike | None = None
    ) -> Interleaved:
        """A parsed JSON document: a list of ``{"text": ...}`` / ``{"image": path or null}`` / str items, or
        ``{"segments": [...]}``. Relative image paths are resolved against ``base_dir``; with ``root``, an image
        outside that folder is refused."""
        if isinstance(data, dict) and "segments" in data:
            data = data["segments"]
        if not isinstance(data, list):
            raise ValueError(
                f'{name} must be a JSON list of segments ([{{"text": ...}}, {{"image": "a.png"}}]), '
                f"got {type(data).__name__}"
            )
        items: list[Any] = []
        for i, entry in enumerate(data):
            where = f"{name}, segment {i}"
            if isinstance(entry, str):
                items.append(TextPart(entry))
                continue
            keys = set(entry) - {"loss"} if isinstance(entry, dict) else set()
            if keys == {"text"} and isinstance(entry["text"], str):
                items.append(TextPart(entry["text"]))
            elif keys == {"image"} and (entry["image"] is None or isinstance(entry["image"], str)):
                path = entry["image"]
                items.append(None if path is None else ImagePart(load_image_file(path, base_dir, where, root), path))
            else:
                raise ValueError(f'{where}: expected {{"text": str}} or {{"image": path or null}}, got {entry!r}')
        return cls(items)

    @classmethod
    def from_json(cls, path: PathLike) -> Interleaved:
        """Read one document from a JSON file (image paths relative to the file's folder)."""
        path = Path(path)
        return cls.from_list(_read_json(path), base_dir=path.parent, name=str(path))

    def to_list(self, image_names: Sequence[str | None]) -> list[dict[str, Any]]:
        """The JSON list, with ``image_names[k]`` as the reference of the k-th image segment (None if pending)."""
        out, k = [], 0
        for seg in self._segments:
            if isinstance(seg, TextPart):
                out.append({"text": seg.text})
            else:
                out.append({"image": image_names[k]})
                k += 1
        return out

    def _image_segments(self) -> list[ImagePart]:
        """Every image segment, pending ones included."""
        return [s for s in self._segments if isinstance(s, ImagePart)]

    def image_file_names(self, stem: str) -> list[str | None]:
        """The PNG name :meth:`to_json` gives each image segment of a document saved as ``<stem>.json`` (None:
        pending)."""
        return [None if part.pending else f"{stem}-{k:02d}.png" for k, part in enumerate(self._image_segments())]

    def to_json(self, path: PathLike, pnginfo: PngInfo | None = None) -> Path:
        """Write the document to ``path`` and its images beside it as ``<stem>-<k>.png``, referenced relatively
        (``pnginfo``: text chunks for every PNG, e.g. the ComfyUI workflow)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = self.image_file_names(path.stem)
        for seg, name in zip(self._image_segments(), names):
            if name is not None:
                seg.image.save(path.parent / name, pnginfo=pnginfo)
        path.write_text(json.dumps(self.to_list(names), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_official_annotation(
        cls,
        source: PathLike | list[dict] | dict,
        base_dir: PathLike | None = None,
        name: str | None = None,
        root: PathLike | None = None,
    ) -> list[Interleaved]:
        """Documents of the official demo annotation (``annt.json``: a list of ``{"sentences", "images",
        "sentence_ixs", "image_first"}``; optional ``generate_mode`` / ``num_iter`` go to ``meta``).

        Image k is placed before (``image_first``) or after sentence ``sentence_ixs[k]``; several images of one
        sentence keep their list order. Relative paths resolve against ``base_dir`` (default: the file's folder);
        with ``root``, an image outside that folder is refused.
        """
        name = name or "annotation"
        if isinstance(source, str | os.PathLike):
            name = str(source)
            base_dir = Path(source).parent if base_dir is None else base_dir
            source = _read_json(Path(source))
        entries = [source] if isinstance(source, dict) else source
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{name}: the official annotation is a JSON list of objects with 'sentences', 'images'")
        return [cls._from_annotation_entry(e, base_dir, f"{name}, entry {i}", root) for i, e in enumerate(entries)]

    @classmethod
    def _from_annotation_entry(
        cls, entry: dict, base_dir: PathLike | None, where: str, root: PathLike | None
    ) -> Interleaved:
        """One official annotation entry as a document (errors start with ``where``)."""
        from ..train.documents import BadInput
        from ..train.sources import parse_annotation

        try:
            parsed = parse_annotation(entry, random.Random(0), {})
        except BadInput as err:
            raise ValueError(f"{where}: {err.detail}") from None
        items: list[Any] = []
        for seg in parsed.segments:
            if hasattr(seg, "text"):
                items.append(TextPart(seg.text))
            else:
                items.append(ImagePart(load_image_file(seg.source, base_dir, where, root), str(seg.source)))
        meta = {k: entry[k] for k in ("generate_mode", "num_iter") if k in entry}
        return cls(items, meta=meta)


def _read_text(path: Path) -> str:
    """A document file's text: UTF-8, with or without a byte-order mark."""
    if not path.is_file():
        raise FileNotFoundError(f"document file not found: {path}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _is_annotation(entry: Any) -> bool:
    return isinstance(entry, dict) and "sentences" in entry


@dataclass(frozen=True)
class _Entry:
    """One document of a file, not read yet: ``raw`` is parsed JSON, or the text of a JSON line."""

    where: str
    raw: Any
    is_line: bool = False


def _entries(path: Path) -> list[_Entry]:
    """The documents of a file, in order (see :func:`load_documents` for the formats)."""
    if path.suffix.lower() == ".jsonl":
        lines = enumerate(_read_text(path).splitlines(), start=1)
        return [_Entry(f"{path} line {number}", line, True) for number, line in lines if line.strip()]
    data = _read_json(path)
    if isinstance(data, list) and any(_is_annotation(e) for e in data):
        others = [i for i, e in enumerate(data) if not _is_annotation(e)]
        if others:
            raise ValueError(
                f"{path}: entries {others[:8]} are not official annotation entries (objects with 'sentences', "
                "'images'), but the others are; a .json file holds one document (a segment list) or a list of "
                "annotation entries"
            )
        return [_Entry(f"{path}, entry {i}", e) for i, e in enumerate(data)]
    return [_Entry(str(path), data)]


def _read_entry(entry: _Entry, base_dir: Path, root: PathLike | None) -> Interleaved:
    data = entry.raw
    if entry.is_line:
        try:
            data = json.loads(data)
        except json.JSONDecodeError as err:
            raise ValueError(f"{entry.where} is not valid JSON: {err}") from None
    if _is_annotation(data):
        return Interleaved._from_annotation_entry(data, base_dir, entry.where, root)
    return Interleaved.from_list(data, base_dir=base_dir, name=entry.where, root=root)


def load_documents(path: PathLike, root: PathLike | None = None) -> list[Interleaved]:
    """Every document of an input file, in order.

    ``.jsonl``: one document per line (a segment list, ``{"segments": [...]}`` or an official annotation entry).
    ``.json``: one document (segment list, ``{"segments": [...]}`` or one annotation entry) or the official
    annotation (a list of entries). Image paths are relative to the file's folder; with ``root``, an image outside
    that folder is refused. Errors name the file and line or entry.
    """
    path = Path(path)
    entries = _entries(path)
    if not entries:
        raise ValueError(f"{path} holds no document")
    return [_read_entry(entry, path.parent, root) for entry in entries]


def load_document(path: PathLike, index: int = 0, root: PathLike | None = None) -> tuple[Interleaved, int]:
    """Document ``index`` of a file (formats as :func:`load_documents`) and how many the file holds. Only that
    document is read, so one entry of a large annotation file does not decode every image of the file."""
    path = Path(path)
    entries = _entries(path)
    if not entries:
        raise ValueError(f"{path} holds no document")
    if not 0 <= index < len(entries):
        raise ValueError(
            f"{path} holds {len(entries)} document(s), so index {index} does not exist; use 0 to {len(entries) - 1}"
        )
    return _read_entry(entries[index], path.parent, root), len(entries)


def document_files(path: PathLike, index: int = 0) -> list[Path]:
    """The files that reading document ``index`` of ``path`` opens: the file itself, then the images it names
    (unread; for noticing that a document changed). A file that cannot be parsed gives just itself."""
    path = Path(path)
    try:
        entry = _entries(path)[index]
        data = json.loads(entry.raw) if entry.is_line else entry.raw
    except (ValueError, OSError, IndexError):
        return [path]
    if _is_annotation(data):
        sources = data.get("images")
    else:
        segments = data.get("segments") if isinstance(data, dict) else data
        sources = [s.get("image") for s in segments if isinstance(s, dict)] if isinstance(segments, list) else []
    if not isinstance(sources, list):
        return [path]
    return [path] + [path.parent / s for s in sources if isinstance(s, str)]
