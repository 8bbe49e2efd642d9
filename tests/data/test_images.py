"""read_image: 16-bit PNG and TIFF scaled to 8 bits (detectron2 reads them white), 8-bit images as
detectron2 reads them, unreadable files named; check_resizable: the aspect ratio limit."""
import cv2
import numpy as np
import pytest
from conftest import FRUIT
from PIL import Image

from detectron2.data.detection_utils import read_image as detectron2_read_image

from solov2_d2.data import check_resizable, read_image


@pytest.fixture(scope="module")
def photo_rgb():
    """A fruit photo as detectron2 reads it (PIL's JPEG decoder), RGB uint8 [H, W, 3], cut small."""
    return detectron2_read_image(str(FRUIT / "14.jpg"), format="RGB")[100:260, 200:440].copy()


def _write(path, array_rgb_or_gray):
    """Write an RGB (or RGBA, or gray) array with OpenCV, which keeps 16 bits."""
    array = array_rgb_or_gray
    if array.ndim == 3:
        code = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        array = cv2.cvtColor(array, code)
    assert cv2.imwrite(str(path), array)
    return str(path)


@pytest.mark.parametrize("ext", ["png", "tif"])
@pytest.mark.parametrize("format", ["BGR", "RGB", "L"])
def test_16_bit_color_images_read_as_the_8_bit_ones(tmp_path, photo_rgb, ext, format):
    eight = _write(tmp_path / f"8.{ext}", photo_rgb)
    sixteen = _write(tmp_path / f"16.{ext}", photo_rgb.astype(np.uint16) * 257)
    image = read_image(sixteen, format)
    assert image.dtype == np.uint8
    assert np.array_equal(image, detectron2_read_image(eight, format))


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_grayscale_images_are_not_white(tmp_path, photo_rgb, ext):
    gray = cv2.cvtColor(photo_rgb, cv2.COLOR_RGB2GRAY)
    eight = _write(tmp_path / f"8.{ext}", gray)
    sixteen = _write(tmp_path / f"16.{ext}", gray.astype(np.uint16) * 257)
    # Detectron2 clips to 255: a white image.
    assert (detectron2_read_image(sixteen, "BGR") == 255).all()
    for format in ("BGR", "RGB", "L"):
        assert np.array_equal(read_image(sixteen, format), detectron2_read_image(eight, format))
    assert read_image(sixteen, "L").shape == gray.shape + (1,)


def test_16_bit_values_are_divided_by_257(tmp_path):
    values = np.array([[0, 256, 257, 513, 514, 32896, 65534, 65535]], dtype=np.uint16)
    path = _write(tmp_path / "gray16.png", values)
    assert read_image(path, "L")[:, :, 0].tolist() == [[0, 0, 1, 1, 2, 128, 254, 255]]
    # Color: the high byte would give 2 for 513 (0x0201) and 255 for 65534.
    color = _write(tmp_path / "color16.png", np.repeat(values[:, :, None], 3, axis=2))
    assert read_image(color, "RGB")[0, :, 0].tolist() == [0, 0, 1, 1, 2, 128, 254, 255]


def test_16_bit_images_with_alpha_lose_it(tmp_path, photo_rgb):
    rgba = cv2.cvtColor(photo_rgb, cv2.COLOR_RGB2RGBA)
    rgba[:, :, 3] = 7
    path = _write(tmp_path / "rgba16.png", rgba.astype(np.uint16) * 257)
    assert np.array_equal(read_image(path, "RGB"), photo_rgb)
    assert read_image(path).shape == photo_rgb.shape[:2] + (4,)  # format None: PIL's mode


def test_16_bit_images_follow_their_exif_orientation(tmp_path):
    gray = (np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint8)
    exif = Image.Exif()
    exif[274] = 6  # rotated: shown 90 degrees clockwise
    Image.fromarray(gray).save(tmp_path / "8.png", exif=exif)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16.png", exif=exif)
    expected = detectron2_read_image(str(tmp_path / "8.png"), "L")
    assert expected.shape == (40, 30, 1)
    assert np.array_equal(read_image(str(tmp_path / "16.png"), "L"), expected)


def test_8_bit_images_read_as_detectron2_reads_them(tmp_path, photo_rgb):
    palette = Image.fromarray(photo_rgb).convert("P")
    palette.save(tmp_path / "palette.png")
    gray = Image.fromarray(photo_rgb).convert("L")
    gray.save(tmp_path / "gray.png")
    for path in (str(FRUIT / "14.jpg"), str(tmp_path / "palette.png"), str(tmp_path / "gray.png")):
        for format in ("BGR", "RGB", "L", None):
            assert np.array_equal(read_image(path, format), detectron2_read_image(path, format))


def test_unreadable_files_are_named(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=f"Cannot read the image {text}: UnidentifiedImageError"):
        read_image(str(text), "BGR")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((FRUIT / "14.jpg").read_bytes()[:5000])
    message = f"Cannot read the image {truncated}: OSError: image file is truncated"
    with pytest.raises(ValueError, match=message):
        read_image(str(truncated), "BGR")
    with pytest.raises(FileNotFoundError):
        read_image(str(tmp_path / "missing.jpg"))


def test_float_images_are_refused(tmp_path):
    path = tmp_path / "float.tif"
    assert cv2.imwrite(str(path), np.full((10, 20), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match=f"The image {path} has float32 samples; only images"):
        read_image(str(path), "BGR")


def test_decompression_bombs_are_named(tmp_path, monkeypatch):
    """PIL's DecompressionBombError is no OSError: detectron2's callers catching OSError let it
    through. A limit of 10000 pixels makes the 160 x 240 photo a bomb (over twice the limit)."""
    path = str(FRUIT / "14.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)
    with pytest.raises(Image.DecompressionBombError):
        detectron2_read_image(path, "BGR")
    message = f"Cannot read the image {path}: DecompressionBombError: .*MAX_IMAGE_PIXELS is 10000"
    with pytest.raises(ValueError, match=message):
        read_image(path, "BGR")


def test_check_resizable_refuses_aspect_ratios_beyond_2_max_size():
    # A long side of 640 leaves the short side 1 / 1280 * 640 = 0.5 px, rounded to 1; 20000 x 20
    # gives 0.64 px, 30000 x 20 0.43 px.
    check_resizable((1, 1280, 3), 288, 640)
    check_resizable((1280, 1), 288, 640)
    check_resizable((20000, 20), 288, 640)
    message = (
        r"The image has shape \(1, 1281, 3\): .* INPUT.MAX_SIZE_TEST = 640, it would be 0x640 "
        r"pixels. Its aspect ratio, 1281.0:1, exceeds the limit 2 x INPUT.MAX_SIZE_TEST : 1 = "
        r"1280:1"
    )
    with pytest.raises(ValueError, match=message):
        check_resizable((1, 1281, 3), 288, 640)
    with pytest.raises(ValueError, match=r"x.jpg has shape \(30000, 20\).*it would be 640x0"):
        check_resizable((30000, 20), 288, 640, name="x.jpg")
