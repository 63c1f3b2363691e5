"""The official package's image helpers (lpips_fast.compat) against the official functions.

im2tensor and tensor2im do the official arithmetic in the same order, so in-range results
are compared for equality (torch.equal / np.array_equal), not to a tolerance. load_image
decodes 8-bit PNG and JPEG files with Pillow where the official one uses OpenCV; both wrap
libjpeg(-turbo)'s default (islow) decoder, so equality is expected and asked for there too.
"""
import numpy as np
import pytest
import torch

import cv2  # noqa: F401 - a test dependency: the official load_image reads with it
import lpips
import lpips_fast
from lpips_fast.io import ImageError


def random_image(h=37, w=53, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def save(array, path, **kwargs):
    from PIL import Image
    Image.fromarray(array.squeeze()).save(path, **kwargs)
    return str(path)


def test_drop_in_names():
    """A script written for the official package runs with `import lpips_fast as lpips`."""
    for name in ("LPIPS", "load_image", "im2tensor", "tensor2im"):
        assert callable(getattr(lpips_fast, name))


@pytest.mark.parametrize("cent, factor", [(1., 255. / 2.), (0., 255.), (0.5, 3.)])
def test_im2tensor_equals_the_official(cent, factor):
    for image in (random_image(seed=1), random_image(seed=2).astype(np.float64) / 7):
        ours = lpips_fast.im2tensor(image, cent=cent, factor=factor)
        theirs = lpips.im2tensor(image, cent=cent, factor=factor)
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (1, 3, 37, 53)
        assert torch.equal(ours, theirs)


def test_tensor2im_equals_the_official_in_range_and_clips_outside():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 19, 23, generator=gen) * 2 - 1
    x[0, 0, 0, :4] = torch.tensor([-1., 1., 0., 0.999])  # the ends of the range
    assert np.array_equal(lpips_fast.tensor2im(x), lpips.tensor2im(x))
    assert np.array_equal(lpips_fast.tensor2im(x, imtype=np.float32),
                          lpips.tensor2im(x, imtype=np.float32))
    # Outside [-1, 1] the official conversion wraps around; ours saturates.
    x[0, 0, 0, :3] = torch.tensor([-1.5, 1.5, -1.01])
    ours, theirs = lpips_fast.tensor2im(x), lpips.tensor2im(x)
    assert ours[0, :3, 0].tolist() == [0, 255, 0]
    assert theirs[0, :3, 0].tolist() == [193, 62, 255]  # what the clipping is for
    assert np.array_equal(ours[1:], theirs[1:]) and np.array_equal(ours[:, 3:], theirs[:, 3:])
    # requires_grad and CUDA-free tensors alike: the image is a copy, detached
    assert lpips_fast.tensor2im(x.requires_grad_()).shape == (19, 23, 3)


@pytest.mark.parametrize("kind", ["png", "jpg", "grey.png", "rgba.png", "bmp"])
def test_load_image_equals_the_official(tmp_path, kind):
    channels = {"grey.png": 1, "rgba.png": 4}.get(kind, 3)
    path = save(random_image(seed=4, channels=channels), tmp_path / f"x.{kind}",
                **({"quality": 90} if kind == "jpg" else {}))
    ours, theirs = lpips_fast.load_image(path), lpips.load_image(path)
    assert ours.dtype == np.uint8 and ours.shape == (37, 53, 3)
    assert np.array_equal(ours, theirs)


def test_load_image_follows_the_exif_orientation_like_the_official(tmp_path):
    from PIL import Image
    img = Image.fromarray(random_image(seed=5))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = str(tmp_path / "rotated.jpg")
    img.save(path, quality=95, exif=exif)
    ours, theirs = lpips_fast.load_image(path), lpips.load_image(path)
    assert ours.shape == theirs.shape == (53, 37, 3)
    assert np.array_equal(ours, theirs)


def test_sixteen_bit_is_scaled_to_eight(tmp_path):
    """OpenCV divides by 256, we scale by 255/65535 and round: at most one apart."""
    from PIL import Image
    a = np.random.default_rng(6).integers(0, 65536, (29, 31), dtype=np.uint16)
    a[0, :3] = [0, 65535, 32768]
    path = str(tmp_path / "deep.png")
    Image.fromarray(a).save(path)
    ours, theirs = lpips_fast.load_image(path), lpips.load_image(path)
    expected = np.rint(a.astype(np.float64) * 255 / 65535)
    assert np.array_equal(ours, np.repeat(expected[..., None], 3, axis=2).astype(np.uint8))
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_the_drop_in_script_gives_the_officials_tensors(tmp_path):
    """The official README's pattern: im2tensor(load_image(path)) is the same tensor."""
    path = save(random_image(seed=7), tmp_path / "a.jpg", quality=80)
    assert torch.equal(lpips_fast.im2tensor(lpips_fast.load_image(path)),
                       lpips.im2tensor(lpips.load_image(path)))
    # and it is what lpips_fast's own loader gives (so scores agree with `lpips-fast pair`),
    # up to float32 rounding: k / 127.5 - 1 in float64 then rounded, or in float32 (ulp 6e-8)
    torch.testing.assert_close(lpips_fast.im2tensor(lpips_fast.load_image(path)),
                               lpips_fast.io.load_image(path), rtol=0, atol=1e-6)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="missing.png: no such file"):
        lpips_fast.load_image(str(tmp_path / "missing.png"))
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="notes.jpg"):
        lpips_fast.load_image(tmp_path / "notes.jpg")
    with pytest.raises(ValueError, match=r"H x W x C array .* shape \(37, 53\)"):
        lpips_fast.im2tensor(random_image(channels=1)[..., 0])
    with pytest.raises(ValueError, match=r"N x C x H x W tensor; got shape \(3, 4, 5\)"):
        lpips_fast.tensor2im(torch.zeros(3, 4, 5))
