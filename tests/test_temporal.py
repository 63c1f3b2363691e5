"""Temporal LPIPS (`lpips_fast.tlp`): equal to the direct formula with the model's own forward
and with the official package, across batch boundaries and any batching of the inputs, tiled
or not, with 2 backbone passes per frame pair.

Tolerance: tlp computes each frame's features in other batches than a direct forward call
does, and a float32 convolution may round differently with another batch size (another
algorithm or blocking); each rounding is 2^-24 ~ 6e-8 relative and a conv output sums up to
3,456 products (alex's 3x3x384), whose rounding errors grow like their square root, ~60
roundings, ~4e-6 relative. We allow 1e-5 of the largest value compared (tiling's other
summation order is of the same kind). A tLP value is a difference of two LPIPS values, so
its error is measured against the size of those values, not of the (small) difference.
"""
from __future__ import annotations

import math

import pytest
import torch

import lpips_fast
from helpers import IMPLS, official_like

TOL = 1e-5


def video(t, h=64, w=64, seed=None):
    """A moving random pattern (reference) and a flickering noisy copy (distorted), [-1, 1]."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    base = torch.rand(3, h, w + 2 * t, generator=gen) * 2 - 1
    ref = torch.stack([base[:, :, 2 * k:2 * k + w] for k in range(t)])
    noise = torch.randn(t, 3, h, w, generator=gen) * (0.1 + 0.2 * torch.rand(t, 1, 1, 1,
                                                                            generator=gen))
    return ref, (ref + noise).clamp(-1, 1)


def direct(model, ref, dist):
    """The formula, one forward call per LPIPS value: (lpips, ref_change, dist_change, tlp)."""
    with torch.inference_mode():
        own = model(ref, dist).flatten().double()
        rc = model(ref[:-1], ref[1:]).flatten().double()
        dc = model(dist[:-1], dist[1:]).flatten().double()
    return own, rc, dc, (rc - dc).abs()


def check(res, own, rc, dc):
    t = len(own)
    assert len(res) == t and res.lpips.dtype == torch.float64
    assert math.isnan(res.tlp[0]) and math.isnan(res.ref_change[0])
    scale = max(own.max().item(), rc.max().item(), dc.max().item())
    assert scale > 0.01  # not a degenerate oracle
    assert (res.lpips - own).abs().max().item() <= TOL * scale
    assert (res.ref_change[1:] - rc).abs().max().item() <= TOL * scale
    assert (res.dist_change[1:] - dc).abs().max().item() <= TOL * scale
    assert (res.tlp[1:] - (rc - dc).abs()).abs().max().item() <= 2 * TOL * scale
    assert res.tlp_mean == pytest.approx(float((rc - dc).abs().mean()), abs=2 * TOL * scale)
    assert res.lpips_mean == pytest.approx(float(own.mean()), abs=TOL * scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_tlp_equals_the_direct_formula_across_batch_boundaries(impl):
    model = lpips_fast.LPIPS(verbose=False, impl=impl)
    ref, dist = video(7)
    oracle = direct(model, ref, dist)
    # 7 frames in batches of 3 (two boundaries), of 1, and all at once
    for bs in (3, 1, 7):
        check(lpips_fast.tlp(ref, dist, model=model, batch_size=bs), *oracle[:3])
    # iterables batched differently on each side: single frames against uneven batches
    uneven = iter([dist[:2], dist[2:6], dist[6:]])
    check(lpips_fast.tlp(list(ref), uneven, model=model), *oracle[:3])


def test_normalize_takes_frames_in_0_1():
    model = lpips_fast.LPIPS(verbose=False)
    ref, dist = video(4)
    a = lpips_fast.tlp(ref, dist, model=model)
    b = lpips_fast.tlp((ref + 1) / 2, (dist + 1) / 2, model=model, normalize=True)
    scale = max(a.lpips.max().item(), a.ref_change[1:].max().item())
    assert (a.lpips - b.lpips).abs().max().item() <= TOL * scale  # (x + 1) / 2 * 2 - 1 rounds
    assert (a.tlp[1:] - b.tlp[1:]).abs().max().item() <= 2 * TOL * scale


def test_tlp_equals_the_official_package():
    ours = lpips_fast.LPIPS(verbose=False)
    theirs = official_like(ours)
    ref, dist = video(4)
    with torch.no_grad():
        own = theirs(ref, dist).flatten().double()
        rc = torch.cat([theirs(ref[k - 1:k], ref[k:k + 1]).flatten() for k in range(1, 4)])
        dc = torch.cat([theirs(dist[k - 1:k], dist[k:k + 1]).flatten() for k in range(1, 4)])
    check(lpips_fast.tlp(ref, dist, model=ours, batch_size=2), own, rc.double(), dc.double())


def test_tiled_frames_give_the_same_values():
    """With tile_size set and frames larger than a tile, each value is a tiled forward."""
    model = lpips_fast.LPIPS(verbose=False)
    ref, dist = video(5, 96, 80)
    oracle = direct(model, ref, dist)
    tiled = lpips_fast.LPIPS(verbose=False, tile_size=48)
    check(lpips_fast.tlp(ref, dist, model=tiled, batch_size=2), *oracle[:3])
    # built by tlp from the same options (the model kept for a second call)
    check(lpips_fast.tlp(ref, dist, tile_size=48, batch_size=2), *oracle[:3])


def test_a_video_whose_batches_switch_between_tiled_and_untiled():
    """A memory budget tiles a large batch but not a small one: the pairs across the switch
    (tiled -> untiled: no features were kept; untiled -> tiled) are still scored."""
    model = lpips_fast.LPIPS(verbose=False)
    ref, dist = video(7, 96, 80)
    oracle = direct(model, ref, dist)
    state = lpips_fast.TemporalLPIPS(model)
    parts = []
    with torch.inference_mode():
        for lo, hi, tile in ((0, 3, 48), (3, 5, None), (5, 7, 48)):
            model.tile_size = tile
            parts.append(state.update(ref[lo:hi], dist[lo:hi]))
    check(lpips_fast.TLPResult.cat(parts), *oracle[:3])


class Passes:
    """Counts the images that enter the backbone (its first slice) and the calls."""

    def __init__(self, model):
        self.images = self.calls = 0
        model.net.slice1.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.images += args[0].shape[0]
        self.calls += 1


def test_two_backbone_passes_per_frame_pair():
    model = lpips_fast.LPIPS(verbose=False)
    count = Passes(model)
    ref, dist = video(9)
    direct(model, ref, dist)
    assert count.images == 9 * 2 + 8 * 2 * 2  # the counter sees the direct formula's 6 / pair
    count.images = count.calls = 0
    lpips_fast.tlp(ref, dist, model=model, batch_size=4)
    assert count.images == 2 * 9      # each frame of each video once
    assert count.calls == 3           # one pass per batch (ref and dist together)


def test_inputs_that_cannot_pair_are_refused_with_one_line():
    model = lpips_fast.LPIPS(verbose=False)
    ref, dist = video(4)
    with pytest.raises(ValueError, match="ref_frames has 4 frames but dist_frames has 3"):
        lpips_fast.tlp(ref, iter([dist[:2], dist[2:3]]), model=model)
    with pytest.raises(ValueError, match="T x C x H x W"):
        lpips_fast.tlp(ref[0], dist[0], model=model)
    with pytest.raises(ValueError, match="frame 2 is .* but the frames before were"):
        lpips_fast.tlp([ref[0], ref[1], ref[2, :, :48]], [dist[0], dist[1], dist[2, :, :48]],
                       model=model)
    with pytest.raises(ValueError, match="set them on that model"):
        lpips_fast.tlp(ref, dist, model=model, tile_size=32)
    with pytest.raises(ValueError, match="no frames"):
        lpips_fast.tlp(iter([]), iter([]), model=model)
    with pytest.raises(ValueError, match="spatial=False"):
        lpips_fast.tlp(ref, dist, model=lpips_fast.LPIPS(verbose=False, spatial=True))
    one = lpips_fast.tlp(ref[:1], dist[:1], model=model)
    assert len(one) == 1 and math.isnan(one.tlp_mean) and one.lpips_mean > 0


# --- lpips-fast video --tlp ---------------------------------------------------------------------

def videos(root, t=7, seed=None):
    """ref.mp4 and dist.mp4 (48 x 64, t frames, fresh random content): a pattern moving by 3
    pixels a frame, and a copy with noise whose strength changes from frame to frame."""
    from helpers import write_video
    import numpy as np
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (48, 64 + 3 * t, 3))
    ref = [base[:, 3 * k:3 * k + 64].astype(np.uint8) for k in range(t)]
    dist = [np.clip(f + rng.normal(0, rng.uniform(5, 40), f.shape), 0, 255).astype(np.uint8)
            for f in ref]
    write_video(root / "ref.mp4", ref)
    write_video(root / "dist.mp4", dist)
    return root / "ref.mp4", root / "dist.mp4"


def decoded(ref, dist):
    """Both videos' frames as the command decodes them."""
    from lpips_fast.video import VideoPairs
    v = VideoPairs(ref, dist, "alex")
    try:
        _, x0, x1 = v.read(0, v.count)
    finally:
        v.close()
    return x0, x1


def test_video_tlp_column_and_summary_equal_the_formula(tmp_path):
    pytest.importorskip("av")
    import json
    from helpers import cli, read_csv
    ref, dist = videos(tmp_path)
    out = cli("video", ref, dist, "--tlp", "-o", tmp_path / "v.csv", "--batch-size", "3",
              "--json", "--device", "cpu", "-q")
    assert out.returncode == 0, out.stderr
    rows = read_csv(tmp_path / "v.csv")
    assert rows[0] == ["frame", "time", "tlp", "lpips"] and len(rows) == 8
    assert rows[1][2] == "" and all(r[2] != "" for r in rows[2:])
    own, rc, dc, tl = direct(lpips_fast.LPIPS(verbose=False), *decoded(ref, dist))
    scale = max(rc.max().item(), dc.max().item(), own.max().item())
    got_tlp = torch.tensor([float(r[2]) for r in rows[2:]], dtype=torch.float64)
    got_own = torch.tensor([float(r[3]) for r in rows[1:]], dtype=torch.float64)
    # the CSV's 8 significant digits add 5e-9 relative
    assert (got_tlp - tl).abs().max().item() <= 2 * TOL * scale
    assert (got_own - own).abs().max().item() <= TOL * scale
    summary = json.loads(out.stdout)
    assert summary["tlp"]["count"] == 6 and summary["count"] == 7
    assert summary["tlp"]["mean"] == pytest.approx(float(got_tlp.mean()), rel=1e-12)
    assert summary["options"]["tlp"] is True
    text = cli("video", ref, dist, "--tlp", "-o", tmp_path / "w.csv", "--batch-size", "3", "-q")
    assert f"x100: {100 * summary['tlp']['mean']:.4f}" in text.stdout


def test_video_tlp_resumed_and_tiled_runs(tmp_path):
    """An interrupted run resumed after any number of rows writes the uninterrupted run's
    bytes (the chunk after the interruption needs the frame before it); a file started
    without --tlp is not continued with it (nor the other way); --tile-size keeps working."""
    pytest.importorskip("av")
    import json
    from helpers import cli, cli_many, one_line_error, read_csv
    ref, dist = videos(tmp_path)
    common = ("video", ref, dist, "--tlp", "--batch-size", "3", "--device", "cpu", "-q")
    full = tmp_path / "full.csv"
    assert cli(*common, "-o", full).returncode == 0
    stops = (3, 6)  # rows are written a chunk at a time: stopped after chunks 0 and 1
    stopped = cli_many(*[(*common, "-o", tmp_path / f"p{n}.csv",
                          {"LPIPS_FAST_STOP_AFTER": str(n)}) for n in stops])
    assert all(s.returncode == 130 for s in stopped), [s.stderr for s in stopped]
    resumed = cli_many(*[(*common, "-o", tmp_path / f"p{n}.csv", "--resume") for n in stops])
    for n, r in zip(stops, resumed):
        assert r.returncode == 0, r.stderr
        assert (tmp_path / f"p{n}.csv").read_bytes() == full.read_bytes(), n
        summary = json.loads((tmp_path / f"p{n}.summary.json").read_text())
        assert summary["tlp"] == json.loads((tmp_path / "full.summary.json").read_text())["tlp"]
    edited = tmp_path / "edited.csv"  # a tLP on frame 0: not a row this command writes
    lines = (tmp_path / "p3.csv").read_text().splitlines(keepends=True)
    edited.write_text("".join([lines[0], lines[1].replace("0,0,,", "0,0,0.5,")] + lines[2:4]))
    (tmp_path / "edited.summary.json").write_bytes((tmp_path / "p3.summary.json").read_bytes())
    one_line_error(cli(*common, "-o", edited, "--resume"), 2, "row 2", "empty for frame 0 only")
    plain = tmp_path / "plain.csv"
    cli("video", ref, dist, "--batch-size", "3", "-q", "-o", plain,
        env={"LPIPS_FAST_STOP_AFTER": "3"})
    mixed = cli(*common, "-o", plain, "--resume")
    one_line_error(mixed, 2, "cannot resume", "frame,time,tlp,lpips")
    back = cli("video", ref, dist, "--batch-size", "3", "-q", "-o", tmp_path / "p3.csv",
               "--resume")
    one_line_error(back, 2, "cannot resume")
    tiled = cli(*common, "--tile-size", "32", "-o", tmp_path / "tiled.csv")
    assert tiled.returncode == 0, tiled.stderr
    a, b = read_csv(full)[1:], read_csv(tmp_path / "tiled.csv")[1:]
    terms = lpips_fast.tlp(*decoded(ref, dist))  # the sizes of the values the errors scale with
    scale = max(terms.lpips.max().item(), terms.ref_change[1:].max().item(),
                terms.dist_change[1:].max().item())
    for x, y in zip(a, b):
        assert x[:2] == y[:2] and (x[2] == "") == (y[2] == "")
        assert float(y[3]) == pytest.approx(float(x[3]), abs=TOL * scale)
        if x[2]:
            assert float(y[2]) == pytest.approx(float(x[2]), abs=2 * TOL * scale)
