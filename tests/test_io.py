"""Image loading (formats, modes, 16-bit, alpha, EXIF), size policies, heat maps, folder helpers.

All in-process and fast: no model is built here.
"""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lpips_fast import folders, heatmap, io


def rgb(seed=0, h=40, w=56):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_hwc(t):
    assert t.dtype == torch.float32 and t.dim() == 4 and t.shape[:2] == (1, 3)
    return t[0].permute(1, 2, 0).numpy()


def expected(a8):
    return a8.astype(np.float32) / 127.5 - 1


@pytest.mark.parametrize("fmt,suffix,kwargs", [
    ("PNG", "png", {}), ("BMP", "bmp", {}), ("TIFF", "tif", {}), ("TIFF", "tiff", {}),
    ("WEBP", "webp", {"lossless": True}),
])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt, suffix, kwargs):
    a = rgb()
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(a).save(path, format=fmt, **kwargs)
    x = io.load_image(path)
    assert x.shape == (1, 3, 40, 56)
    np.testing.assert_array_equal(as_hwc(x), expected(a))
    assert x.min() >= -1 and x.max() <= 1


def test_jpeg_round_trip_is_close(tmp_path):
    y, x = np.mgrid[0:64, 0:64]
    a = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)  # smooth: JPEG keeps it
    Image.fromarray(a).save(tmp_path / "x.jpg", quality=95)
    got = as_hwc(io.load_image(tmp_path / "x.jpg"))
    assert np.abs(got - expected(a)).mean() < 0.02


def test_grayscale_and_bilevel_become_rgb(tmp_path):
    g = rgb()[..., 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    got = as_hwc(io.load_image(tmp_path / "g.png"))
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], expected(g))
    Image.fromarray(g > 127).save(tmp_path / "b.png")
    got = as_hwc(io.load_image(tmp_path / "b.png"))
    assert set(np.unique(got)) == {-1.0, 1.0}


def test_alpha_is_dropped_with_one_note(tmp_path, capsys):
    io._noted.clear()
    a = rgb()
    alpha = np.full(a.shape[:2], 7, np.uint8)
    Image.fromarray(np.dstack([a, alpha])).save(tmp_path / "a.png")
    Image.fromarray(np.dstack([a[..., 0], alpha]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(as_hwc(io.load_image(tmp_path / "a.png")), expected(a))
    got = as_hwc(io.load_image(tmp_path / "la.png"))
    np.testing.assert_array_equal(got[..., 2], expected(a[..., 0]))
    err = capsys.readouterr().err
    assert err.count("alpha channel") == 1 and "a.png" in err  # once per process


def test_palette_with_transparency(tmp_path):
    img = Image.fromarray(rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    a, had_alpha = io.read_image(tmp_path / "p.png")
    assert had_alpha and a.shape == (40, 56, 3)
    np.testing.assert_array_equal(a, expected(np.asarray(Image.open(tmp_path / "p.png")
                                                         .convert("RGB"))))


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_grayscale_uses_the_full_range(tmp_path, suffix):
    v = (np.arange(40 * 56).reshape(40, 56) * 29 % 65536).astype(np.uint16)
    v[0, 0], v[0, 1] = 0, 65535
    Image.fromarray(v).save(tmp_path / f"g16.{suffix}")
    assert Image.open(tmp_path / f"g16.{suffix}").mode.startswith("I")
    got = as_hwc(io.load_image(tmp_path / f"g16.{suffix}"))
    np.testing.assert_allclose(got[..., 1], v / 65535 * 2 - 1, atol=1e-6)
    assert got[0, 0, 0] == -1 and got[0, 1, 0] == 1
    assert (got > 0).mean() > 0.4  # not clipped at 255/65535


def test_16bit_modes_in_memory():
    v = np.array([[0, 255, 256, 32768, 65535] * 8] * 8, dtype=np.uint16)
    for img in (Image.frombytes("I;16B", (40, 8), v.astype(">u2").tobytes()),
                Image.frombytes("I;16", (40, 8), v.astype("<u2").tobytes()),
                Image.fromarray(v.astype(np.int32), mode="I")):
        got = as_hwc(io.to_tensor(img))[..., 0]
        np.testing.assert_allclose(got, v / 65535 * 2 - 1, atol=1e-6, err_msg=img.mode)


def png16_rgb(path, a):
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                      0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png_keeps_its_range(tmp_path):
    a = np.random.default_rng(3).integers(0, 65536, (40, 48, 3)).astype(np.uint16)
    png16_rgb(tmp_path / "c16.png", a)
    got = as_hwc(io.load_image(tmp_path / "c16.png"))
    # Pillow reads 16-bit colour at 8-bit precision; the range is right (not clipped)
    np.testing.assert_allclose(got, a / 65535 * 2 - 1, atol=2 / 255)


@pytest.mark.parametrize("orientation,rot", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, rot):
    a = rgb(h=40, w=56)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    Image.fromarray(a).save(tmp_path / "o.jpg", exif=exif, quality=100)
    got = as_hwc(io.load_image(tmp_path / "o.png"))
    np.testing.assert_array_equal(got, expected(np.rot90(a, k=rot)))
    size = (56, 40) if orientation in (6, 8) else (40, 56)
    assert io.image_size(tmp_path / "o.png") == size == io.image_size(tmp_path / "o.jpg")
    assert io.load_image(tmp_path / "o.jpg").shape[2:] == size


def test_errors_are_one_line_and_name_the_file(tmp_path):
    Image.fromarray(rgb()).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image at all\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    cases = {"missing.png": "no such file", "trunc.png": "corrupt or truncated",
             "text.png": "not an image", "empty.jpg": "not an image",
             "folder.png": "is a directory"}
    for name, problem in cases.items():
        with pytest.raises(io.ImageError) as e:
            io.load_image(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name)) and problem in msg and "\n" not in msg
    assert isinstance(io.ImageError("x"), ValueError)


def test_min_size_is_checked_after_resizing():
    with pytest.raises(io.ImageError, match=r"f.png: 1 x 1 pixels is too small for net 'alex', "
                                            r"which needs at least 31 x 31"):
        io.check_scoring_size("f.png", (1, 1), "g.png", (1, 1), (1, 1), "alex")
    io.check_scoring_size("f.png", (31, 31), "g.png", (31, 31), (31, 31), "alex")
    # to-first enlarges a small second image: scorable
    io.check_scoring_size("big.png", (64, 64), "small.png", (8, 8), (64, 64), "alex")
    # to-smaller shrinks two scorable images below the minimum: not
    with pytest.raises(io.ImageError, match=r"a.png and b.png, resized to 20 x 20 \(W x H\): "
                                            r"20 x 20 pixels is too small"):
        io.check_scoring_size("a.png", (20, 100), "b.png", (100, 20), (20, 20), "alex")


def test_multi_frame_files_say_the_first_frame_is_scored(tmp_path, capsys, monkeypatch):
    from PIL import Image
    frames = [Image.new("RGB", (40, 40), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    monkeypatch.setattr(io, "_noted", set())
    x = io.load_image(tmp_path / "anim.gif")
    assert x.shape == (1, 3, 40, 40)
    assert "anim.gif has 3 frames" in capsys.readouterr().err


def test_resize_policies():
    assert io.target_size((40, 50), (40, 50), "none") == (40, 50)
    assert io.target_size((40, 50), (30, 60), "none") is None
    assert io.target_size((40, 50), (30, 60), "to-first") == (40, 50)
    assert io.target_size((40, 50), (30, 60), "to-smaller") == (30, 50)
    x = torch.rand(2, 3, 30, 60) * 2 - 1
    for mode in io.RESAMPLE:
        y = io.resize(x, (40, 50), mode)
        assert y.shape == (2, 3, 40, 50) and y.min() >= -1 and y.max() <= 1
    assert io.resize(x, (30, 60)) is x


def test_heatmap_has_the_input_size_plus_a_scale_bar(tmp_path):
    dmap = np.linspace(0, 0.3, 64 * 80, dtype=np.float32).reshape(64, 80)
    img = heatmap.render(dmap)
    assert img.mode == "RGB" and img.height == 64 and img.width > 80
    a = np.asarray(img)
    np.testing.assert_array_equal(a[:, :80], heatmap.colorize(dmap, 0.3))
    assert tuple(a[0, 0]) == tuple(heatmap.INFERNO[0].astype(np.uint8))
    assert tuple(a[-1, 79]) == tuple(heatmap.INFERNO[-1].astype(np.uint8))
    heatmap.save_map(tmp_path / "m.png", dmap)
    heatmap.save_map(tmp_path / "m.npy", dmap)
    assert Image.open(tmp_path / "m.png").size == img.size
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), dmap)
    assert heatmap.render(np.zeros((4, 4))).height == 4  # tiny and all-zero maps work too
    assert heatmap.nice_ticks(0.73) == [0.0, 0.2, 0.4, 0.6]


def test_heatmap_suffixes_in_any_case_and_refused_formats_touch_no_file(tmp_path):
    dmap = np.linspace(0, 0.3, 32 * 40, dtype=np.float32).reshape(32, 40)
    heatmap.save_map(tmp_path / "m.NPY", dmap)  # np.save on the name wrote m.NPY.npy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.NPY"]
    np.testing.assert_array_equal(np.load(tmp_path / "m.NPY"), dmap)
    heatmap.save_map(tmp_path / "m.PNG", dmap)
    assert Image.open(tmp_path / "m.PNG").format == "PNG"
    (tmp_path / "keep.xbm").write_bytes(b"a user's file")
    for name, needle in [("keep.xbm", "keep.xbm: cannot write a heat map as XBM"),
                         ("m.psd", "m.psd: cannot write a heat map as '.psd'"),
                         ("noext", "noext: cannot write a heat map as a name without a suffix")]:
        with pytest.raises(ValueError, match=needle):
            heatmap.save_map(tmp_path / name, dmap)
    assert (tmp_path / "keep.xbm").read_bytes() == b"a user's file"
    assert not (tmp_path / "m.psd").exists() and not (tmp_path / "noext").exists()


def test_listing_and_pairing(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d / "sub").mkdir(parents=True)
    for rel in ("a/x.png", "a/y.png", "a/sub/z.png", "a/notes.txt", "a/.hidden.png",
                "b/x.png", "b/y.jpg", "b/sub/z.png", "b/w.png"):
        (tmp_path / rel).write_bytes(b"")
    names, ignored, _ = folders.list_images(tmp_path / "a")
    assert names == ["x.png", "y.png"] and ignored == ["notes.txt"]
    names_a, _, _ = folders.list_images(tmp_path / "a", recursive=True)
    names_b, _, _ = folders.list_images(tmp_path / "b", recursive=True)
    assert names_a == ["sub/z.png", "x.png", "y.png"]
    pairs, only_a, only_b, amb = folders.match_by_name(names_a, names_b)
    assert pairs == [("sub/z.png", "sub/z.png"), ("x.png", "x.png")]
    assert only_a == ["y.png"] and only_b == ["w.png", "y.jpg"] and amb == []
    pairs, only_a, only_b, _ = folders.match_by_name(names_a, names_b, "stem")
    assert ("y.png", "y.jpg") in pairs and only_b == ["w.png"]
    assert list(folders.all_pairs(["a", "b", "c"])) == [("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(folders.UsageError, match="no such directory"):
        folders.list_images(tmp_path / "nope")


@pytest.fixture
def no_hang():
    """Fail, instead of hanging the suite, if the test blocks (opening a named pipe does)."""
    import signal

    def stuck(*_):
        raise TimeoutError("blocked: a file was opened that has no writer")
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_never_opened(tmp_path, no_hang):
    """A FIFO named like an image blocked `dirs` forever (Pillow's open waits for a writer):
    it is one failed item naming it, the other pairs are scored."""
    import os
    from lpips_fast import jobs
    d0, d1 = tmp_path / "ref", tmp_path / "dist"
    d0.mkdir(), d1.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rgb(1, 64, 64)).save(d0 / name)
    Image.fromarray(rgb(2, 64, 64)).save(d1 / "a.png")
    os.mkfifo(d1 / "b.png")
    with pytest.raises(io.ImageError, match="b.png: is a named pipe, not a regular file"):
        io.image_size(d1 / "b.png")
    with pytest.raises(io.ImageError, match="named pipe"):
        io.load_image(d1 / "b.png")
    out = jobs.run(jobs.DirsJob(d0, d1), jobs.Settings(output=tmp_path / "o.csv", device="cpu",
                                                       progress=False))
    assert out.written == 1 and len(out.failures) == 1
    assert "b.png: is a named pipe" in str(out.failures[0])


def test_float_and_16bit_files_of_8bit_values_read_as_the_8bit_picture(tmp_path, capsys):
    """A float TIFF of 0..255 values was read as [0, 1] and saturated (0.82 LPIPS against
    the same picture as PNG): the data decide the scale when they contradict the format's
    convention, and a note says it was a guess; the conventional files stay silent."""
    io._noted.clear()
    a = rgb(5)[..., 0]  # grey: Pillow writes float and 16-bit TIFF for one channel
    Image.fromarray(a).save(tmp_path / "ref.png")
    want = io.load_image(tmp_path / "ref.png")
    files = {"f255.tif": Image.fromarray(a.astype(np.float32), mode="F"),
             "f1.tif": Image.fromarray(a.astype(np.float32) / 255, mode="F"),
             "f65535.tif": Image.fromarray(a.astype(np.float32) * 257, mode="F"),
             "i16of8.png": Image.fromarray(a.astype(np.uint16)),
             "i16.png": Image.fromarray(a.astype(np.uint16) * 257)}
    for name, img in files.items():
        img.save(tmp_path / name)
        got = io.load_image(tmp_path / name)
        # 8-bit k -> k / 127.5 - 1 in float32; the same through k/scale: rounding only
        torch.testing.assert_close(got, want, rtol=0, atol=2e-7, msg=name)
    err = capsys.readouterr().err
    assert "f255.tif: a float image with values up to 25" in err and "0..255 (a guess" in err
    assert "i16of8.png: a 16-bit image with values up to" in err
    assert "f1.tif" not in err and "i16.png" not in err  # the conventions: no note
    Image.fromarray(np.full((8, 8), 1e6, np.float32), mode="F").save(tmp_path / "big.tif")
    with pytest.raises(io.ImageError, match="big.tif: a float image with values up to 1e"):
        io.load_image(tmp_path / "big.tif")
    nan = np.zeros((8, 8), np.float32)
    nan[2, 3] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(io.ImageError, match="nan.tif: .*NaN"):
        io.load_image(tmp_path / "nan.tif")
