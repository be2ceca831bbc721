"""Every common image file becomes the RGB picture a viewer shows; bad files get a reason."""

import numpy as np
import pytest
from PIL import Image

from vistra.data import images
from vistra.data.images import ImageLoadError, check_image, is_image_file, load_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def test_extensions_are_case_insensitive():
    assert is_image_file("a/photo.JPG") and is_image_file("scan.TiFf") and is_image_file("x.webp")
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


@pytest.mark.parametrize("ext", ["jpg", "png", "bmp", "webp", "tif", "gif"])
def test_each_format_loads_as_rgb(tmp_path, ext):
    path = tmp_path / f"img.{ext}"
    Image.new("RGB", (12, 8), RED).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (12, 8)
    assert np.abs(np.asarray(image, dtype=int) - RED).max() <= 8  # lossy formats


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, red left / blue right; orientation 6 means "rotate 90 degrees
    # clockwise to display", so the picture is 20 wide x 40 high with red on top.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_rgb(path)
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 6), RED), Image.new("RGB", (6, 6), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_rgb(path).getpixel((3, 3)) == RED


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 2))
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.putdata([0, 0, 1, 1] * 2)
    image.info["transparency"] = 0  # palette entry 0 (red) is see-through
    return image


def halves(mode, left, right):
    """A 4x2 image in `mode`: colour `left` in columns 0-1, `right` in columns 2-3."""
    image = Image.new(mode, (4, 2), left)
    image.paste(right, (2, 0, 4, 2))
    return image


@pytest.mark.parametrize(
    "make, expected_left, expected_right",
    [
        (lambda: halves("L", 0, 200), (0, 0, 0), (200, 200, 200)),
        (_palette_with_transparency, WHITE, BLUE),  # transparent entry -> white
        (lambda: halves("RGBA", (255, 0, 0, 0), (0, 0, 255, 255)), WHITE, BLUE),
        (lambda: halves("RGBA", (0, 0, 0, 128), (0, 0, 0, 255)), (127, 127, 127), (0, 0, 0)),
        (lambda: halves("LA", (0, 0), (90, 255)), WHITE, (90, 90, 90)),
        (lambda: halves("CMYK", (0, 0, 0, 0), (0, 255, 255, 0)), WHITE, RED),
    ],
    ids=["L", "P+transparency", "RGBA", "RGBA-half", "LA", "CMYK"],
)
def test_modes_convert_to_rgb(tmp_path, make, expected_left, expected_right):
    source = make()
    path = tmp_path / ("image.tif" if source.mode == "CMYK" else "image.png")
    source.save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == expected_left and image.getpixel((3, 1)) == expected_right


def test_16_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 1000, 32768, 65535]], np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    gray = np.asarray(load_rgb(path))[0, :, 0]
    assert gray.tolist() == [0, 4, 128, 255]  # value / 257: mid-grey stays mid-grey


def test_float_image_is_scaled(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(path)
    assert np.asarray(load_rgb(path))[0, :, 1].tolist() == [0, 128, 255]


def test_good_file_passes_check(tmp_path):
    path = tmp_path / "ok.jpg"
    Image.new("RGB", (64, 48), RED).save(path)
    assert check_image(path) is None


def test_truncated_jpeg_is_reported(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    path = tmp_path / "cut.jpg"
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert check_image(path) == "truncated"
    with pytest.raises(ImageLoadError, match="cut.jpg.*truncated"):
        load_rgb(path)


def test_random_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    assert check_image(path) == "not an image"


def test_missing_file_is_unreadable(tmp_path):
    assert check_image(tmp_path / "gone.png").startswith("unreadable")


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 9_999)
    assert check_image(path).startswith("too large")
    with pytest.raises(ImageLoadError, match="bomb.png"):
        load_rgb(path)


def test_decode_rgb_reads_bytes_like_load_rgb_reads_files(tmp_path):
    path = tmp_path / "x.png"
    Image.new("LA", (9, 5), (100, 0)).save(path)  # transparent grey: white once flattened
    from_bytes = images.decode_rgb(path.read_bytes(), "x.png")
    assert from_bytes.mode == "RGB" and np.array_equal(np.asarray(from_bytes),
                                                       np.asarray(load_rgb(path)))
    with pytest.raises(ImageLoadError, match="too large"):
        images.decode_rgb(path.read_bytes(), max_pixels=44)
    with pytest.raises(ImageLoadError, match="upload: truncated"):
        images.decode_rgb(_noise_png_bytes()[:3000])
    with pytest.raises(ImageLoadError, match="not an image"):
        images.decode_rgb(b"plain text")


def _noise_png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
