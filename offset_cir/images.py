"""Opening images and masks: the one decoder of datasets, search, uploads and the mask pipeline.

:func:`read_image` takes a path, the bytes of a file, or a binary file object, and

1. reads the header only (PIL's ``Image.open`` decodes nothing yet), so a file with more pixels than
   ``max_pixels`` is refused before any pixel is decoded, naming the file or field, its size and the limit;
2. refuses what is not an image (or not one of ``formats``), naming it;
3. decodes it and converts it to ``mode`` ("RGB" for images, "L" for masks, None to keep the stored mode).

Pixels are returned as stored: no EXIF orientation is applied, so an image, its mask and the features computed
from them keep the geometry of the files (a mask is made, saved and checked at its image's stored size).
:func:`read_header` gives the size, mode and format from the header alone (and checks the file's integrity on
request, still decoding nothing).

Every error is an :class:`ImageReadError` (a :class:`~offset_cir.errors.UserInputError`) whose message names the
source; :class:`ImageMissingError` (also a ``FileNotFoundError``) and :class:`ImageTooLargeError` (with ``size``
and ``limit``) let a caller answer each case its own way (a DatasetError, an HTTP 404/413/415 ...).
"""
from __future__ import annotations

import io
import os
from typing import IO, NamedTuple, Sequence, Union

from offset_cir.errors import UserInputError

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]


class ImageReadError(UserInputError):
    """A file or upload that cannot be read as an image (missing, not an image, corrupt, or too large);
    ``reason`` is what was wrong, without the name of the file (for messages that name it their own way)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


class ImageMissingError(ImageReadError, FileNotFoundError):
    """The image file does not exist."""


class ImageTooLargeError(ImageReadError):
    """An image whose header claims more pixels than the limit; nothing was decoded."""

    def __init__(self, message: str, size: tuple[int, int] | None, limit: int):
        super().__init__(message)
        self.size, self.limit = size, limit


class ImageHeader(NamedTuple):
    size: tuple[int, int]  # width, height
    mode: str  # as stored ("RGB", "L", "P", "I;16" ...)
    format: str  # PIL's format name ("PNG", "JPEG" ...)


def _is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))


class _Where(NamedTuple):
    """How messages name a source: ``what`` it is ("image", "mask", "field 'image'") and its path or name."""

    what: str
    label: str | None

    @classmethod
    def of(cls, source, what: str, name: str | None) -> "_Where":
        return cls(what, name if name is not None else (os.fspath(source) if _is_path(source) else None))

    def __str__(self) -> str:
        return f"{self.what} {self.label}" if self.label else self.what


def _stream(source):
    """A seekable binary stream of ``source`` (bytes are wrapped; paths are opened by PIL itself)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return source


def _pil_limit() -> int | None:
    """The pixel count above which PIL refuses to open any image (None: the check is switched off)."""
    from PIL import Image

    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def _claimed_size(source, formats: Sequence[str] | None) -> tuple[int, int] | None:
    """Width and height that the header claims, read by the format's own parser without PIL's pixel check."""
    from PIL import Image

    Image.init()
    try:
        fp = open(source, "rb") if _is_path(source) else _stream(source)
    except OSError:
        return None
    try:
        fp.seek(0)
        prefix = fp.read(16)
        for fmt in formats or Image.ID:
            factory, accept = Image.OPEN.get(fmt.upper(), (None, None))
            verdict = True if accept is None else (accept(prefix) if factory is not None else False)
            if not verdict or isinstance(verdict, str):  # a str is PIL's "this format, but unsupported"
                continue
            try:
                fp.seek(0)
                return tuple(factory(fp, "").size)
            except Exception:  # noqa: BLE001  not this format after all: try the next
                continue
        return None
    finally:
        if _is_path(source):
            fp.close()


def _too_large(where: _Where, size: tuple[int, int] | None, limit: int) -> ImageTooLargeError:
    if size is None:
        return ImageTooLargeError(f"{where} has more pixels than the limit of {limit:,} pixels", None, limit)
    w, h = size
    return ImageTooLargeError(f"{where} is {w}x{h} = {w * h:,} pixels; the limit is {limit:,} pixels", size, limit)


def _unreadable(where: _Where, reason: str) -> ImageReadError:
    named = f"{where.label} ({reason})" if where.label else reason
    return ImageReadError(f"{where.what} cannot be read (corrupt or not an image): {named}", reason)


def _open(source, where: _Where, formats: Sequence[str] | None):
    """PIL's lazy image (header read, nothing decoded), or the error that names ``where``."""
    from PIL import Image, UnidentifiedImageError

    if _is_path(source) and os.path.isdir(source):
        raise _unreadable(where, "it is a folder")
    try:
        return Image.open(_stream(source), formats=list(formats) if formats else None)
    except FileNotFoundError:
        raise ImageMissingError(f"{where.what} not found: {where.label}") from None
    except Image.DecompressionBombError:  # PIL's own limit, above any we set
        raise _too_large(where, _claimed_size(source, formats), _pil_limit()) from None
    except UnidentifiedImageError:
        kinds = f"one of {', '.join(formats)}" if formats else "an image format PIL reads"
        raise _unreadable(where, f"not {kinds}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _unreadable(where, str(exc) or type(exc).__name__) from None


def read_header(source: Source, *, what: str = "image", name: str | None = None,
                formats: Sequence[str] | None = None, verify: bool = False) -> ImageHeader:
    """Size, mode and format of an image from its header alone (nothing is decoded); ``verify=True`` also runs
    PIL's integrity check of the whole file (chunk checksums, structure), still without decoding pixels."""
    where = _Where.of(source, what, name)
    with _open(source, where, formats) as im:
        header = ImageHeader(tuple(im.size), im.mode, str(im.format))
        if verify:
            try:
                im.verify()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise _unreadable(where, str(exc) or type(exc).__name__) from None
        return header


def read_image(source: Source, mode: str | None = "RGB", *, what: str = "image", name: str | None = None,
               max_pixels: int | None = None, formats: Sequence[str] | None = None, upright: bool = False):
    """Decode ``source`` (a path, bytes, or a binary file object) as a PIL image in ``mode`` (None: as stored).

    ``what`` and ``name`` say how messages name it (``what="mask"``; ``name="field 'image'"`` for an upload; a
    path names itself). ``max_pixels`` refuses larger images before decoding (None: PIL's own limit,
    ``2 * Image.MAX_IMAGE_PIXELS``, which also applies above any larger value); ``formats`` restricts the
    accepted formats (PIL's names: ``("PNG", "JPEG")``); ``upright=True`` turns the image by its EXIF orientation,
    as a browser shows it (an upload a person painted a mask over). Raises :class:`ImageReadError` and its
    subclasses.
    """
    where = _Where.of(source, what, name)
    with _open(source, where, formats) as im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise _too_large(where, (w, h), max_pixels)
        try:
            im.load()
            if upright:
                from PIL import ImageOps

                turned = ImageOps.exif_transpose(im)
                return turned.convert(mode) if mode else turned.copy()
            return im.convert(mode) if mode else im.copy()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _unreadable(where, str(exc) or type(exc).__name__) from None
