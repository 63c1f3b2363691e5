"""--model-path on the scoring commands (pair, dirs, allpairs, video): the lin weights of
`LPIPS(model_path=...)`, a bad file said in one line naming it before any work, and a resumed
run that refuses other weights. Run in-process (helpers.cli).

Tolerance: the command's values against the module's forward on the same images: 1e-5 relative
(other batch compositions round the float32 convolutions differently, ~4e-6 relative; see
tests/test_temporal.py), plus the CSV's 8 significant digits (5e-9).
"""
import json

import numpy as np
import pytest
import torch

import lpips_fast
from helpers import cli, cli_many, image, load, noisy, one_line_error, randomize_lins, read_csv

from PIL import Image


@pytest.fixture
def lins(tmp_path):
    """A lin weight file unlike the released one (fresh random non-negative weights), in the
    format `lpips-fast train` writes (`linK.model.1.weight`)."""
    model = randomize_lins(lpips_fast.LPIPS(verbose=False), seed=int(np.random.randint(2**31)))
    path = tmp_path / "lins.pth"
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("lin")
                and not k.startswith("lins")}, path)
    return path


def folders(root, n):
    """d0/ and d1/: n fresh random images im<i>.png and noisy copies."""
    d0, d1 = root / "d0", root / "d1"
    d0.mkdir(), d1.mkdir()
    for i in range(n):
        a = image(d0 / f"im{i}.png", None)
        Image.fromarray(noisy(a, None)).save(d1 / f"im{i}.png")
    return d0, d1


def scored(model_path, a, b):
    model = lpips_fast.LPIPS(verbose=False, model_path=model_path)
    with torch.no_grad():
        return model(load(a), load(b)).item()


def test_pair_and_dirs_use_the_weights(tmp_path, lins):
    d0, d1 = folders(tmp_path, 3)
    pair, dirs, released = cli_many(
        ("pair", d0 / "im0.png", d1 / "im0.png", "--model-path", lins, "--json"),
        ("dirs", d0, d1, "--model-path", lins, "-o", tmp_path / "o.csv", "-q", "--workers", "0"),
        ("pair", d0 / "im0.png", d1 / "im0.png"))
    assert pair.returncode == dirs.returncode == 0, (pair.stderr, dirs.stderr)
    want = [scored(lins, d0 / f"im{i}.png", d1 / f"im{i}.png") for i in range(3)]
    got = json.loads(pair.stdout)["lpips"]
    assert got == pytest.approx(want[0], rel=1e-5)
    assert abs(float(released.stdout) - got) > 1e-3 * got  # other weights, another value
    assert [float(r[1]) for r in read_csv(tmp_path / "o.csv")[1:]] == pytest.approx(want,
                                                                                      rel=1e-5)


def test_allpairs_and_video_use_the_weights(tmp_path, lins):
    pytest.importorskip("av")
    from helpers import write_video
    folder = tmp_path / "pool"
    folder.mkdir()
    frames = [image(folder / f"p{i}.png", None) for i in range(3)]
    write_video(tmp_path / "r.mp4", frames)
    write_video(tmp_path / "d.mp4", [noisy(f, None) for f in frames])
    ap, video = cli_many(("allpairs", folder, "--model-path", lins, "-o", tmp_path / "a.csv",
                          "-q", "--workers", "0"),
                         ("video", tmp_path / "r.mp4", tmp_path / "d.mp4", "--tlp",
                          "--model-path", lins, "-o", tmp_path / "v.csv", "-q"))
    assert ap.returncode == video.returncode == 0, (ap.stderr, video.stderr)
    got = {(r[0], r[1]): float(r[2]) for r in read_csv(tmp_path / "a.csv")[1:]}
    for (a, b), v in got.items():
        assert v == pytest.approx(scored(lins, folder / a, folder / b), rel=1e-5)
    from lpips_fast.video import VideoPairs
    v = VideoPairs(tmp_path / "r.mp4", tmp_path / "d.mp4", "alex")
    _, x0, x1 = v.read(0, 3)
    v.close()
    want = lpips_fast.tlp(x0, x1, model_path=lins)
    rows = read_csv(tmp_path / "v.csv")[1:]
    assert [float(r[3]) for r in rows] == pytest.approx(want.lpips.tolist(), rel=1e-5)
    scale = max(want.ref_change[1:].max().item(), want.dist_change[1:].max().item())
    assert [float(r[2]) for r in rows[1:]] == pytest.approx(want.tlp[1:].tolist(),
                                                             abs=2e-5 * scale)


def test_a_bad_file_is_one_line_naming_it_and_nothing_is_written(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    image(a, None)
    image(b, None)
    (tmp_path / "text.pth").write_text("not weights\n")
    torch.save({"foo": torch.rand(3)}, tmp_path / "foreign.pth")
    vgg = lpips_fast.weights.lin_weights_path("vgg", "0.1")
    cases = [("text.pth", "not a readable lin weight file"),
             ("foreign.pth", "not a lin weight file of LPIPS"),
             ("missing.pth", "No such file"),
             (vgg, "lin1 has 128 channel weights, but alex's layer 2 has 192")]
    for name, problem in cases:
        path = tmp_path / name
        outs = cli_many(("pair", a, b, "--model-path", path),
                        ("dirs", tmp_path, tmp_path, "--model-path", path, "-o",
                         tmp_path / "o.csv", "--workers", "0"),
                        ("allpairs", tmp_path, "--model-path", path, "-o", tmp_path / "o.csv"))
        for out in outs:
            one_line_error(out, 2, f"--model-path {path}", problem)
        assert not (tmp_path / "o.csv").exists()


def test_resume_refuses_other_weights(tmp_path, lins):
    d0, d1 = folders(tmp_path, 4)
    common = ("dirs", d0, d1, "-q", "--workers", "0", "--batch-size", "2")
    other = tmp_path / "other.pth"
    torch.save({k: v * 2 for k, v in torch.load(lins).items()}, other)
    full, stopped = cli_many((*common, "--model-path", lins, "-o", tmp_path / "full.csv"),
                             (*common, "--model-path", lins, "-o", tmp_path / "part.csv",
                              {"LPIPS_FAST_STOP_AFTER": "2"}))
    assert full.returncode == 0 and stopped.returncode == 130, stopped.stderr
    part = tmp_path / "part.csv"
    before = part.read_bytes()
    refused = cli_many((*common, "--model-path", other, "-o", part, "--resume"),
                       (*common, "-o", part, "--resume"))
    for out in refused:
        one_line_error(out, 2, "was started with --model-path")
    first = lins.read_bytes()
    lins.write_bytes(other.read_bytes())  # the same file, trained again: other weights
    one_line_error(cli(*common, "--model-path", lins, "-o", part, "--resume"), 2,
                   "--model-sha256")
    assert part.read_bytes() == before
    lins.write_bytes(first)
    ok = cli(*common, "--model-path", lins, "-o", part, "--resume")
    assert ok.returncode == 0, ok.stderr
    assert part.read_bytes() == (tmp_path / "full.csv").read_bytes()
