"""The command line's model options (--tile-size, --memory-budget) and the heat maps of the
folder commands (dirs/allpairs --spatial-map DIR), run in-process through `cli.main`.

Tolerance of tiled against untiled values: 1e-5 relative, the tiling's own (tests/test_tiling.py:
a tile's convolutions run on smaller tensors, another summation order, ~1e-6 relative per
feature; the head's sums add in float64). The CSV's 8 significant digits (5e-9 relative) are
far below it.
"""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from lpips_fast import jobs, tiling
from lpips_fast.cli import main

SIZE = (240, 200)   # W x H: above alex's tile (112) plus its halo, so tiles really split it
TILE = 112          # a multiple of alex's stride (16), at least its halo (96)
BUDGET = "20MiB"    # picks a tile below the image size for 2 pairs (asserted below)


def save(path, seed, size=SIZE):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def rel_close(a, b, rtol=1e-5):
    assert abs(a - b) <= rtol * abs(b), f"{a} vs {b}"


def dirs(tmp_path, *extra, out="out.csv"):
    return main(["dirs", str(tmp_path / "d0"), str(tmp_path / "d1"), "-r", "--device", "cpu",
                 "--workers", "0", "--batch-size", "2", "-q", "-o", str(tmp_path / out), *extra])


def rows(path):
    with open(path, newline="") as f:
        return {r["name"]: float(r["lpips"]) for r in csv.DictReader(f)}


@pytest.fixture
def folders(tmp_path):
    for i, name in enumerate(["x.png", "sub/y.png", "z.png"]):
        save(tmp_path / "d0" / name, 2 * i)
        save(tmp_path / "d1" / name, 2 * i + 1)
    return tmp_path


PAIR_BYTES = 2 * 3 * SIZE[0] * SIZE[1] * 4  # a prepared pair, float32: counted by the budget


def test_the_budgets_used_here_tile():
    assert tiling.tile_for_budget("alex", 20 * 2**20, 4, 4, 2 * PAIR_BYTES) < max(SIZE)
    assert tiling.tile_for_budget("alex", 8 * 2**20, 4, 2, PAIR_BYTES) < max(SIZE)


def test_pair_tiled_equals_untiled(tmp_path, capsys):
    a, b = save(tmp_path / "a.png", 0), save(tmp_path / "b.png", 1)
    values = {}
    for opts in ([], ["--tile-size", str(TILE)], ["--memory-budget", "8MiB"]):
        assert main(["pair", str(a), str(b), "--json", "--device", "cpu", *opts]) == 0
        values[tuple(opts)] = json.loads(capsys.readouterr().out)["lpips"]
    untiled = values[()]
    assert untiled > 0
    for v in values.values():
        rel_close(v, untiled)


def test_dirs_tiled_equals_untiled_and_records_the_options(folders, capsys):
    assert dirs(folders) == 0
    assert dirs(folders, "--tile-size", str(TILE), out="tiled.csv") == 0
    assert dirs(folders, "--memory-budget", BUDGET, out="budget.csv") == 0
    capsys.readouterr()
    untiled = rows(folders / "out.csv")
    assert sorted(untiled) == ["sub/y.png", "x.png", "z.png"]
    for name in ("tiled.csv", "budget.csv"):
        got = rows(folders / name)
        assert got.keys() == untiled.keys()
        for k in got:
            rel_close(got[k], untiled[k])
    options = json.loads((folders / "budget.summary.json").read_text())["options"]
    assert options["memory-budget"] == 20 * 2**20 and options["tile-size"] is None


def test_resume_refuses_other_tiling(folders, capsys):
    assert dirs(folders, "--tile-size", str(TILE)) == 0
    before = (folders / "out.csv").read_bytes()
    capsys.readouterr()
    assert dirs(folders, "--tile-size", "128", "--resume") == 2
    err = capsys.readouterr().err
    assert f"--tile-size {TILE} (now 128)" in err and len(err.strip().splitlines()) == 1
    # the same budget written another way is the same option
    assert dirs(folders, "--memory-budget", "20MiB", out="b.csv") == 0
    assert dirs(folders, "--memory-budget", "20480KiB", out="b.csv", *["--resume"]) == 0
    assert (folders / "out.csv").read_bytes() == before


def test_ranks_compare_the_tiling_options(folders):
    job = jobs.DirsJob(folders / "d0", folders / "d1")
    plain = jobs.ranks._command_options(job, jobs.Settings())
    assert plain != jobs.ranks._command_options(job, jobs.Settings(tile_size=TILE))
    assert plain != jobs.ranks._command_options(job, jobs.Settings(memory_budget="1GiB"))


@pytest.mark.parametrize("opts, message", [
    (["--tile-size", "0"], "must be at least 1"),
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--memory-budget", "-1GiB"], "--memory-budget"),
])
def test_bad_values_are_usage_errors(folders, capsys, opts, message):
    with pytest.raises(SystemExit) as e:
        dirs(folders, *opts)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (folders / "out.csv").exists()


@pytest.mark.parametrize("command", ["dirs", "pair"])
def test_a_budget_too_small_is_said_before_any_work(folders, capsys, command):
    if command == "dirs":
        code = dirs(folders, "--memory-budget", "8MiB")
    else:
        code = main(["pair", str(folders / "d0/x.png"), str(folders / "d1/x.png"),
                     "--memory-budget", "2MiB", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --memory-budget: memory budget of") and "too small" in err[0]
    assert not (folders / "out.csv").exists()


def pair_map(tmp_path, capsys, a, b):
    out = tmp_path / f"pair{len(list(tmp_path.glob('pair*')))}.npy"
    assert main(["pair", str(a), str(b), "--spatial-map", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    return np.load(out)


def test_dirs_writes_one_map_per_pair(folders, capsys):
    maps = folders / "maps" / "new"
    assert dirs(folders, "--spatial-map", str(maps), "--map-format", "npy") == 0
    written = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*") if p.is_file())
    assert written == ["sub/y.png.npy", "x.png.npy", "z.png.npy"]
    for name in ("x.png", "sub/y.png"):
        got = np.load(maps / f"{name}.npy")
        assert got.shape == (SIZE[1], SIZE[0]) and got.max() > 0
        want = pair_map(folders, capsys, folders / "d0" / name, folders / "d1" / name)
        np.testing.assert_array_equal(got, want)
    png = folders / "pngs"
    assert dirs(folders, "--spatial-map", str(png), "--map-max", "1.5", out="p.csv") == 0
    with Image.open(png / "x.png.png") as im:
        assert im.format == "PNG"


def test_allpairs_maps_are_named_after_both_images(folders, capsys):
    d = folders / "d0"
    save(d / "x.png__y.png", 9)  # a name that a flat a__b scheme would confuse
    maps = folders / "maps"
    code = main(["allpairs", str(d), "-r", "--device", "cpu", "--workers", "0", "-q",
                 "-o", str(folders / "all.csv"), "--spatial-map", str(maps),
                 "--map-format", "npy"])
    assert code == 0
    with open(folders / "all.csv", newline="") as f:
        pairs = [(r["a"], r["b"]) for r in csv.DictReader(f)]
    assert len(pairs) == 6
    written = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*") if p.is_file())
    assert written == sorted(f"{a}/{b}.npy" for a, b in pairs)
    a, b = pairs[0]
    np.testing.assert_array_equal(np.load(maps / a / f"{b}.npy"),
                                  pair_map(folders, capsys, d / a, d / b))


def test_existing_map_files_are_refused_before_anything_is_written(folders, capsys):
    maps = folders / "maps"
    (maps / "sub").mkdir(parents=True)
    (maps / "sub" / "y.png.png").write_bytes(b"not ours")
    assert dirs(folders, "--spatial-map", str(maps)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sub/y.png.png" in err[0] and "refusing to overwrite" in err[0]
    assert (maps / "sub" / "y.png.png").read_bytes() == b"not ours"
    assert not (folders / "out.csv").exists() and not (maps / "x.png.png").exists()
    # the rule of every output: an earlier run's maps (marked PNGs) are replaced by a re-run
    (maps / "sub" / "y.png.png").unlink()
    assert dirs(folders, "--spatial-map", str(maps)) == 0
    first = (maps / "x.png.png").read_bytes()
    assert dirs(folders, "--spatial-map", str(maps)) == 0
    assert (maps / "x.png.png").read_bytes() == first


def test_a_map_folder_that_is_a_file_is_refused(folders, capsys):
    (folders / "maps").write_text("x")
    assert dirs(folders, "--spatial-map", str(folders / "maps")) == 2
    assert "is a file" in capsys.readouterr().err


# --- lpips-fast bench: the packaged benchmarks ---------------------------------------------------

def test_bench_model_runs_from_the_package(tmp_path, capsys, monkeypatch):
    from lpips_fast.bench import model
    for official in (True, False):
        monkeypatch.setattr(model, "official_available", lambda official=official: official)
        out = tmp_path / str(official)
        assert main(["bench", "model", "--device", "cpu", "--quick", "--no-compile",
                     "--cases", "alex:1:64:fwd", "--repeats", "1", "--min-time", "0",
                     "--out", str(out)]) == 0
        said = capsys.readouterr().out
        (result,) = out.glob("*.json")
        rows = json.loads(result.read_text())["cases"][0]["rows"]
        assert ("official" in rows) is official and "ms" in rows["lpips_fast"]
        assert ("official lpips package is not installed" in said) is not official


def test_bench_without_a_kind_runs_both_into_one_folder(tmp_path, monkeypatch):
    from lpips_fast import _ops
    from lpips_fast.bench import kernels, model
    calls = []
    monkeypatch.setattr(model, "main", lambda argv: calls.append(("model", argv))
                        or tmp_path / "r" / "cpu")
    monkeypatch.setattr(kernels, "main", lambda argv: calls.append(("kernels", argv)))
    monkeypatch.setattr(_ops, "available", lambda: True)
    assert main(["bench", "--device", "cpu", "--quick", "--out", str(tmp_path / "r")]) == 0
    assert calls == [("model", ["--device", "cpu", "--quick", "--out", str(tmp_path / "r")]),
                     ("kernels", ["--device", "cpu", "--quick",
                                  "--out", str(tmp_path / "r" / "cpu-kernels.md")])]


def test_bench_kernels_runs_from_the_package(tmp_path, capsys):
    from lpips_fast import _ops
    if not _ops.available():
        pytest.skip("extension not built")
    out = tmp_path / "k.md"
    assert main(["bench", "kernels", "--device", "cpu", "--quick", "--sizes", "64",
                 "--nets", "alex", "--out", str(out)]) == 0
    assert "fused vs reference" in out.read_text() and "fused" in capsys.readouterr().out


# --- what memory_budget counts ------------------------------------------------------------------

def test_the_budget_counts_the_prepared_images():
    budget, images = 2**30, 2
    free = tiling.tile_for_budget("alex", budget, 4, images)
    held = 2 * 3 * 4096 * 4096 * 4  # a prepared 4096x4096 pair, float32
    less = tiling.tile_for_budget("alex", budget, 4, images, held)
    assert less < free
    # the crop of the chosen tile, with its 1.5x margin, fits in what the images leave
    crop = less + 2 * tiling.halo("alex")
    assert 1.5 * tiling.bytes_per_pixel("alex", 4, images) * crop ** 2 <= budget - held
    with pytest.raises(ValueError, match="prepared images"):
        tiling.tile_for_budget("alex", held, 4, images, held)



def test_the_in_place_scaling_is_the_same_arithmetic():
    import torch
    from lpips_fast.model import ScalingLayer
    layer = ScalingLayer()
    x = (torch.rand(2, 3, 9, 7) * 2 - 1).requires_grad_(True)
    got = layer(x)
    want = (x - layer.shift) / layer.scale
    assert torch.equal(got, want)
    g = torch.rand_like(got)
    (ga,) = torch.autograd.grad(got, x, g)
    (gb,) = torch.autograd.grad(want, x, g)
    assert torch.equal(ga, gb)
