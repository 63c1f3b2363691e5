"""dirs' batch loader (lpips_fast.batches) and the decode-into-a-slot conversion (io.pil_into):
the same values as `pair` and the Python API for every kind of file, whichever threads,
prefetch and decoder load them; the "auto" choices; torchvision's JPEG path on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from helpers import cli, make_dirs, read_csv, real_pairs
from lpips_fast import batches, folders
from lpips_fast.batches import BatchLoader, choose, plain_jpeg, to_unit_range
from lpips_fast.folders import Pair, plan_pairs
from lpips_fast.jobs import kinds
from lpips_fast.tiling import bytes_per_pixel
from lpips_fast.io import (ALPHA, SIXTEEN_BIT, load_pair, pil_to_array, read_into, read_image,
                           value_scale)


def former_pil_to_array(img, name="image"):
    """io.pil_to_array as it was before it wrote into a slot: the oracle of its values."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    had_alpha = mode in ALPHA or (mode == "P" and "transparency" in img.info)
    if mode in SIXTEEN_BIT or mode == "F":
        a = np.asarray(img).astype(np.float32)
        scale = value_scale(a, mode, name)
        a = np.clip(a, 0, scale) / np.float32(scale / 2) - 1
    else:
        if mode in ("RGBA", "RGBa"):
            img = img.convert("RGBA")
        elif mode != "RGB":
            img = img.convert("RGBA" if had_alpha else "RGB")
        a = np.asarray(img, dtype=np.float32)[..., :3] / np.float32(127.5) - 1
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a, had_alpha


def cmyk(u8):
    return Image.frombytes("CMYK", (u8.shape[1], u8.shape[0]), np.ascontiguousarray(u8))


def images_of_every_mode(seed, h=37, w=53):
    """Fresh random images in each mode the loader treats on its own."""
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    grey, alpha = Image.fromarray(u8[..., 0]), Image.fromarray(u8[..., 3])
    out = {"RGB": Image.fromarray(u8[..., :3]), "L": grey, "RGBA": Image.fromarray(u8),
           "LA": Image.merge("LA", (grey, alpha)), "CMYK": cmyk(u8),
           "1": Image.fromarray(u8[..., 0] > 127),
           "I;16": Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)),
           "I": Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32)),
           "F": Image.fromarray(rng.random((h, w), dtype=np.float32))}
    assert {k: v.mode for k, v in out.items() if k != "I;16"} == {k: k for k in out
                                                                 if k != "I;16"}
    p = Image.fromarray(u8[..., :3]).convert("P")
    p.info["transparency"] = 3
    out["P+transparency"] = p
    out["P"] = Image.fromarray(u8[..., :3]).convert("P")
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_conversion_gives_the_former_values_in_every_mode(seed):
    for mode, img in images_of_every_mode(seed).items():
        want, want_alpha = former_pil_to_array(img)
        got, alpha = pil_to_array(img)
        assert got.dtype == np.float32 and got.shape == want.shape, mode
        assert np.array_equal(got, want) and alpha == want_alpha, mode


def test_read_into_writes_the_files_values_into_a_channels_last_slot(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    x = torch.full((2, 3, 30, 40), 7.0).contiguous(memory_format=torch.channels_last)
    done, alpha = read_into(path, x[1].permute(1, 2, 0).numpy())
    assert done and alpha is False
    assert torch.equal(x[1], torch.from_numpy(read_image(path)[0]).permute(2, 0, 1))
    assert (x[0] == 7).all()  # the other slot is untouched
    done, (a, _) = read_into(path, np.empty((31, 40, 3), np.float32))  # another size
    assert not done and np.array_equal(a, read_image(path)[0])


def test_device_conversion_is_numpys_for_all_256_values():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    want = np.divide(u8.numpy(), np.float32(127.5), dtype=np.float32) - np.float32(1)
    assert np.array_equal(to_unit_range(u8, torch.empty(1, 16, 16)).numpy(), want)


# --- the loader ---------------------------------------------------------------------------------

def save_jpeg(path, a, **kw):
    Image.fromarray(a).save(path, quality=85, **kw)


def mixed_folders(root, seed=0):
    """ref/ and dist/ with every kind of file the loader routes differently, and a broken one."""
    rng = np.random.default_rng(seed)
    d0, d1 = root / "ref", root / "dist"
    d0.mkdir()
    d1.mkdir()

    def rgb(h=48, w=64):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for d in (d0, d1):
        for i in range(3):
            save_jpeg(d / f"plain{i}.jpg", rgb())
        save_jpeg(d / "grey.jpg", rgb()[..., 0])
        exif = Image.Exif()
        exif[0x0112] = 6  # stored 64 x 48, shown upright as 48 x 64 (W x H): rotated
        save_jpeg(d / "rotated.jpg", rgb(64, 48), exif=exif)
        save_jpeg(d / "progressive.jpg", rgb(), progressive=True)
        cmyk(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)).save(d / "cmyk.jpg", quality=85)
        Image.fromarray(rgb()).save(d / "png_named.jpg", format="PNG")
        Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)).save(d / "alpha.png")
        Image.fromarray(rng.integers(0, 65536, (48, 64), dtype=np.uint16)).save(d / "deep.png")
    save_jpeg(d0 / "small.jpg", rgb(40, 56))  # another size than dist's: --resize only
    save_jpeg(d1 / "small.jpg", rgb())
    data = (d0 / "plain0.jpg").read_bytes()
    (d1 / "broken.jpg").write_bytes(data[:len(data) // 2])  # truncated
    save_jpeg(d0 / "broken.jpg", rgb())
    names = sorted(p.name for p in d0.iterdir())
    return d0, d1, names


def loaded_pairs(d0, d1, names, policy, **loader):
    pairs = [Pair((n,), d0 / n, d1 / n) for n in names]
    bad, ordered, batch_list = plan_pairs(pairs, "alex", 4, policy)
    it = BatchLoader(ordered, batch_list, device="cpu", **loader)
    got, failed, alphas = {}, {}, []
    for idx, x0, x1, fails, alpha in it:
        for k, i in enumerate(idx):
            got[ordered[i][0].key[0]] = (x0[k].clone(), x1[k].clone())
        failed.update({ordered[i][0].key[0]: msg for i, msg in fails})
        alphas += alpha
    it.close()
    return got, failed, alphas, {r.pair.key[0] for r in bad}


@pytest.mark.parametrize("policy", ["none", "to-first"])
@pytest.mark.parametrize("workers, prefetch, decoder", [
    (0, 0, "pillow"), (2, 0, "pillow"), (2, 2, "pillow"), (0, 1, "torchvision"),
    (3, 2, "torchvision")])
def test_every_pair_has_the_values_of_load_pair(tmp_path, policy, workers, prefetch, decoder):
    d0, d1, names = mixed_folders(tmp_path)
    got, failed, alphas, planned_bad = loaded_pairs(d0, d1, names, policy, workers=workers,
                                                    prefetch=prefetch, decoder=decoder)
    assert set(failed) == {"broken.jpg"} and str(d1 / "broken.jpg") in failed["broken.jpg"]
    assert planned_bad == (set() if policy == "to-first" else {"small.jpg"})
    assert set(got) == set(names) - set(failed) - planned_bad
    assert alphas == [d0 / "alpha.png"]
    for name, (x0, x1) in got.items():
        w0, w1, _ = load_pair(d0 / name, d1 / name, policy)
        # Pillow and torchvision's CPU decode_jpeg are the same libjpeg-turbo (islow IDCT,
        # fancy upsampling): the same bytes, so no tolerance (a GPU's decode is measured
        # apart: lpips-fast bench dirs --decode-check)
        assert torch.equal(x0, w0[0]) and torch.equal(x1, w1[0]), name


def test_torchvision_decodes_the_plain_jpegs_in_one_call_per_batch(tmp_path, monkeypatch):
    import torchvision.io
    d0, d1, names = mixed_folders(tmp_path)
    calls = []
    real = torchvision.io.decode_jpeg

    def counting(data, **kw):
        calls.append(len(data))
        return real(data, **kw)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", counting)
    plain = [n for n in names if n.startswith(("plain", "grey"))]
    loaded_pairs(d0, d1, plain, "none", workers=0, prefetch=0, decoder="torchvision")
    assert calls == [8]  # 4 pairs, one batch of 4: both images of each, one call
    calls.clear()
    others = ["rotated.jpg", "progressive.jpg", "cmyk.jpg", "png_named.jpg", "alpha.png"]
    loaded_pairs(d0, d1, others, "none", workers=0, prefetch=0, decoder="torchvision")
    assert calls == []  # Pillow's: what torchvision would not decode as Pillow does


def test_plain_jpeg_is_whole_baseline_rgb_or_grey_and_upright(tmp_path):
    _, d1, _ = mixed_folders(tmp_path)
    verdict = {p.name: plain_jpeg(p.read_bytes()) for p in d1.iterdir()}
    assert verdict == {"plain0.jpg": True, "plain1.jpg": True, "plain2.jpg": True,
                       "grey.jpg": True, "small.jpg": True, "broken.jpg": False,
                       "rotated.jpg": False, "progressive.jpg": False, "cmyk.jpg": False,
                       "png_named.jpg": False, "alpha.png": False, "deep.png": False}


def test_auto_choices_follow_the_cores_and_the_device(monkeypatch):
    for n, cpu, gpu in [(1, (1, 0), (1, 2)), (2, (2, 0), (2, 2)), (8, (2, 2), (8, 2)),
                        (64, (16, 2), (8, 2))]:
        monkeypatch.setattr(batches, "cores", lambda n=n: n)
        assert choose("auto", "auto", "cpu") == cpu, n
        assert choose("auto", "auto", "cuda") == gpu, n
        assert choose(3, 1, "cpu") == (3, 1) and choose(0, "auto", "cuda") == (0, 2)
    assert batches.resolve_decoder("auto", "cpu") == "pillow"
    with pytest.raises(ValueError, match="decoder must be one of"):
        batches.resolve_decoder("nvjpeg", "cpu")


def test_cli_values_do_not_depend_on_threads_prefetch_or_decoder(tmp_path):
    d0, d1 = make_dirs(tmp_path, n=5, size=(48, 64))
    for d in (d0, d1):  # JPEG copies, so that torchvision's path is taken
        for p in d.glob("*.png"):
            Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=90)
            p.unlink()
    rows = []
    for extra in (("--workers", "0"), ("--workers", "2", "--prefetch", "1"),
                  ("--decoder", "torchvision", "--workers", "2", "--prefetch", "0"), ()):
        out = tmp_path / f"o{len(rows)}.csv"
        ran = cli("dirs", d0, d1, "-o", out, "-q", "--batch-size", "2", "--device", "cpu",
                  *extra)
        assert ran.returncode == 0, ran.stderr
        rows.append(read_csv(out))
    assert all(r == rows[0] for r in rows) and len(rows[0]) == 1 + 5
    one = cli("pair", d0 / "im3.jpg", d1 / "im3.jpg", "--device", "cpu")
    assert float(one.stdout) == pytest.approx(float(dict(rows[0])["im3.jpg"]), abs=1e-6)


def test_decode_check_measures_torchvision_against_pillow(tmp_path):
    from lpips_fast.bench.dirs import decode_check
    pairs = real_pairs()[:2]
    if not pairs:  # fresh random images then: the check must still run end to end
        d0, d1 = make_dirs(tmp_path, n=2, size=(48, 64))
        pairs = [(d0 / "im0.png", d1 / "im0.png"), (d0 / "im1.png", d1 / "im1.png")]
    rows = decode_check(pairs, "cpu", tmp_path / "work", quality=90)
    assert len(rows) == len(pairs)
    for r in rows:  # the CPU decodes agree (see above); the check reports what it found
        assert r["max_levels"] == 0 and r["lpips_diff"] == 0 and r["lpips"] > 0


# --- --batch-size auto: pairs per batch from the backbone's activation bytes -------------------

@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
def test_auto_pairs_keep_a_batch_within_the_device_budget(net, device_type):
    budget = folders.BATCH_BYTES.get(device_type, folders.BATCH_BYTES["cpu"])
    last = folders.AUTO_PAIRS
    for h, w in [(64, 64), (384, 512), (1080, 1920), (4000, 6000)]:
        n = folders.auto_pairs(net, (h, w), device_type)
        pair = 1.5 * bytes_per_pixel(net, 4, 2) * h * w
        assert 1 <= n <= last  # larger images never get more pairs
        # the largest count whose activations fit, unless 32 or a single pair already caps it
        assert n == folders.AUTO_PAIRS or n == 1 or n * pair <= budget < (n + 1) * pair
        last = n
    assert folders.auto_pairs(net, (20000, 30000), device_type) == 1


def test_auto_pairs_stay_within_a_memory_budget():
    pair = 1.5 * bytes_per_pixel("vgg", 4, 2) * 384 * 512
    assert folders.auto_pairs("vgg", (384, 512), "cuda", int(2.5 * pair)) == 2
    assert folders.auto_pairs("vgg", (384, 512), "cuda", int(0.5 * pair)) == 1  # then tiled
    assert folders.auto_pairs("vgg", (384, 512), "cpu", 1 << 40) == 3  # the device's is smaller


def test_auto_pairs_where_measured():
    # alex 512x384 keeps 32 pairs (16 MiB a pair); vgg's 288 MiB a pair gives 3 on a CPU
    assert folders.auto_pairs("alex", (384, 512), "cpu") == 32
    assert folders.auto_pairs("vgg", (384, 512), "cpu") == 3
    assert folders.auto_pairs("vgg", (1080, 1920), "cuda") == 2


def test_plan_cuts_each_size_group_by_its_own_auto_count(tmp_path, monkeypatch):
    big, small = (72, 96), (36, 48)  # (width, height) as make_dirs takes them
    d0, d1 = make_dirs(tmp_path / "a", n=7, size=big)
    s0, s1 = make_dirs(tmp_path / "b", n=5, size=small)
    pairs = ([Pair((f"a{i}",), d0 / f"im{i}.png", d1 / f"im{i}.png") for i in range(7)]
             + [Pair((f"b{i}",), s0 / f"im{i}.png", s1 / f"im{i}.png") for i in range(5)])
    per_pair = 1.5 * bytes_per_pixel("alex", 4, 2) * big[0] * big[1]
    # the big images' budget fits 3 pairs (so the small ones' 4x fewer bytes fit 12, cut at 5)
    monkeypatch.setitem(folders.BATCH_BYTES, "cpu", 3.5 * per_pair)
    bad, ordered, batch_list = plan_pairs(pairs, "alex", "auto")
    assert not bad and [len(b) for b in batch_list] == [3, 3, 1, 5]
    assert [ordered[i][1] for i in batch_list[3]] == [small[::-1]] * 5  # (h, w)
    _, _, fixed = plan_pairs(pairs, "alex", 2)  # an explicit count is kept
    assert [len(b) for b in fixed] == [2, 2, 2, 1, 2, 2, 1]


def test_cli_dirs_batch_size_defaults_to_auto(tmp_path, monkeypatch):
    d0, d1 = make_dirs(tmp_path, n=5, size=(48, 64))
    seen = []

    def plan(*args, **kw):
        seen.append(args[2])
        return plan_pairs(*args, **kw)
    monkeypatch.setattr(kinds, "plan_pairs", plan)
    monkeypatch.setitem(folders.BATCH_BYTES, "cpu",
                        2.5 * 1.5 * bytes_per_pixel("alex", 4, 2) * 48 * 64)  # 2 pairs
    rows = []
    for extra in ((), ("--batch-size", "5")):
        out = tmp_path / f"o{len(rows)}.csv"
        ran = cli("dirs", d0, d1, "-o", out, "-q", "--device", "cpu", *extra)
        assert ran.returncode == 0, ran.stderr
        rows.append(read_csv(out))
    assert seen == ["auto", 5] and rows[0] == rows[1] and len(rows[0]) == 1 + 5
    for bad in ("0", "many"):
        ran = cli("dirs", d0, d1, "--batch-size", bad)
        assert ran.returncode == 2 and "--batch-size" in ran.stderr
    ran = cli("allpairs", d0, "--batch-size", "auto")  # auto is dirs' only
    assert ran.returncode == 2 and "--batch-size" in ran.stderr


def test_cli_dirs_auto_batch_fits_the_memory_budget(tmp_path):
    # alex: 64 MiB holds one pair's activations (about 16 MiB for any tile), not the 32 pairs a
    # fixed batch is checked for (128-256 MiB): auto is checked for its smallest batch
    d0, d1 = make_dirs(tmp_path, n=2)
    out = tmp_path / "o.csv"
    ran = cli("dirs", d0, d1, "-o", out, "-q", "--device", "cpu", "--memory-budget", "64MiB")
    assert ran.returncode == 0, ran.stderr
    assert len(read_csv(out)) == 1 + 2
    ran = cli("dirs", d0, d1, "-q", "--device", "cpu", "--memory-budget", "64MiB",
              "--batch-size", "32")
    assert ran.returncode == 2 and "too small for net 'alex' with 64 images" in ran.stderr
