"""Reading image files, and checking that detectron2's resize keeps a pixel on each side.

Detectron2's :func:`~detectron2.data.detection_utils.read_image` converts a 16-bit grayscale PNG
or TIFF to 8 bits by clipping, so that every pixel above 255 (all of them, in a real photo) reads
as white, and takes the high byte of a 16-bit color one; it raises PIL's errors, which do not
name the file (and PIL's ``DecompressionBombError`` is no ``OSError``). :func:`read_image` reads
8-bit images exactly as detectron2 does and 16-bit ones scaled to 8 bits, and names the file of
an image it cannot read.

Detectron2's ``ResizeShortestEdge`` resizes an image whose long side is more than
2 x ``max_size`` times its short side to 0 pixels on the short side, and fails deep in PIL
("height and width must be > 0"): :func:`check_resizable` refuses such an image with a message
giving its shape and the limit.
"""
from typing import Optional, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.utils.file_io import PathManager

__all__ = ["check_resizable", "read_image"]

_EXIF_ORIENT = 274  # the EXIF "Orientation" tag
_EXIF_TRANSPOSE = {  # as detectron2's _apply_exif_orientation
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# PIL's modes of images with more than 8 bits per sample (it opens a 16-bit color PNG or TIFF
# as "RGB" or "RGBA", with a raw mode such as "RGB;16B": see _more_than_8_bits).
_WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
# The errors of decoding a file that is not a readable image (PIL raises SyntaxError or
# ValueError for some malformed headers, cv2.error for images over its pixel limit).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, cv2.error)


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """
    Read an image file as detectron2's :func:`~detectron2.data.detection_utils.read_image`
    does (PIL, EXIF orientation applied, converted to `format`), except that

    * a 16-bit image (PNG or TIFF; grayscale, color, with or without alpha) is scaled to
      8 bits: ``value // 257``, so that 65535 is 255 and an 8-bit image saved as 16 bits
      (``value * 257``) reads as the 8-bit one. Detectron2 reads a 16-bit grayscale image as
      all white (it clips to 255) and a 16-bit color one by its high byte;
    * a file that cannot be decoded (not an image, truncated, over PIL's
      ``Image.MAX_IMAGE_PIXELS``, or with samples that are neither 8- nor 16-bit integers,
      e.g. a 32-bit float TIFF) raises a ValueError naming it.

    8-bit images are read by detectron2's code, so their arrays are the same as detectron2's.

    Args:
        file_name: the image's path (any path detectron2's PathManager opens).
        format: "BGR", "RGB", "L" or another of detectron2's formats; None for the image's own
            PIL mode.

    Returns:
        np.ndarray: uint8 [H, W, 3] for "BGR" and "RGB", [H, W, 1] for "L" (float for
        "YUV-BT.601", as detectron2), at the size the EXIF orientation gives.

    Raises:
        ValueError: naming `file_name`, with the decoder's error as its cause.
        OSError: when the file cannot be opened at all (e.g. FileNotFoundError).
    """
    with PathManager.open(file_name, "rb") as f:
        try:
            image = Image.open(f)
            if _more_than_8_bits(image):
                f.seek(0)
                image = _read_wide_image(f.read(), image, file_name)
            else:
                image = _apply_exif_orientation(image)
            return convert_PIL_to_numpy(image, format)
        except _UnsupportedImage as e:
            raise ValueError(str(e)) from None
        except _DECODE_ERRORS as e:
            if isinstance(e, UnidentifiedImageError):
                detail = "not an image file PIL can identify"
            elif isinstance(e, Image.DecompressionBombError):
                detail = (
                    f"{e} (PIL.Image.MAX_IMAGE_PIXELS is {Image.MAX_IMAGE_PIXELS}: raise it if "
                    "the image is trusted)"
                )
            else:
                detail = str(e)
            raise ValueError(
                f"Cannot read the image {file_name}: {type(e).__name__}: {detail}"
            ) from e


class _UnsupportedImage(Exception):
    """An image that decodes but has samples read_image does not convert."""


def _more_than_8_bits(image: Image.Image) -> bool:
    """Whether PIL's header of `image` says it has more than 8 bits per sample."""
    if image.mode in _WIDE_MODES:
        return True
    for tile in image.tile:
        args = tile[3]  # the decoder's arguments: the raw mode, or a tuple starting with it
        rawmode = args[0] if isinstance(args, tuple) and args else args
        # 16 bits per sample, big-, little-endian or native ("BGR;16" is 5-6-5 packed 8 bits)
        if isinstance(rawmode, str) and rawmode.endswith((";16B", ";16L", ";16N")):
            return True
    return False


def _read_wide_image(data: bytes, header: Image.Image, file_name: str) -> Image.Image:
    """
    Decode an image of more than 8 bits per sample with OpenCV (which, unlike PIL, keeps the
    16 bits of color images) and scale it to 8 bits (``value // 257``).

    Returns:
        PIL.Image: mode "L" [H, W], "RGB" or "RGBA", with `header`'s EXIF orientation applied.
    """
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise OSError(f"OpenCV cannot decode this {header.format} image of mode {header.mode}")
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise _UnsupportedImage(
            f"The image {file_name} has {array.dtype} samples; only images of 8- or 16-bit "
            "integers are read: convert it to 8 bits (values 0..255)."
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        image = Image.fromarray(array)
    elif array.shape[2] == 3:
        image = Image.fromarray(cv2.cvtColor(array, cv2.COLOR_BGR2RGB))
    elif array.shape[2] == 4:
        image = Image.fromarray(cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA))
    else:
        raise _UnsupportedImage(
            f"The image {file_name} has {array.shape[2]} channels; expected 1, 3 or 4."
        )
    try:
        orientation = header.getexif().get(_EXIF_ORIENT)
    except Exception:  # as detectron2: a broken EXIF block is ignored
        orientation = None
    method = _EXIF_TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def check_resizable(
    shape: Tuple[int, ...],
    short_edge_length: int,
    max_size: int,
    name: str = "The image",
    max_size_key: str = "INPUT.MAX_SIZE_TEST",
) -> None:
    """
    Refuse an image that detectron2's ``ResizeShortestEdge(short_edge_length, max_size)`` would
    resize to 0 pixels on a side: one whose long side is more than 2 x `max_size` times its
    short side (the resize makes its long side `max_size`, and rounds its short side to 0).

    Args:
        shape: the image's shape, [H, W, ...].
        short_edge_length: the resize's (smallest) short side.
        max_size: the resize's longest side.
        name: what the message calls the image (e.g. its file).
        max_size_key: the config key of `max_size`, for the message.

    Raises:
        ValueError: giving the shape, the size it would be resized to and the limit.
    """
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"{name} is empty: shape {tuple(shape)}.")
    new_height, new_width = ResizeShortestEdge.get_output_shape(
        height, width, short_edge_length, max_size
    )
    if min(new_height, new_width) >= 1:
        return
    ratio = max(height, width) / min(height, width)
    raise ValueError(
        f"{name} has shape {tuple(shape)}: resized to a short side of {short_edge_length} and "
        f"a long side of at most {max_size_key} = {max_size}, it would be "
        f"{new_height}x{new_width} pixels. Its aspect ratio, {ratio:.1f}:1, exceeds the limit "
        f"2 x {max_size_key} : 1 = {2 * max_size}:1: crop it into less elongated parts."
    )
