"""lpips_fast.Trainer, the 2AFC / JND scoring functions, the BAPPS folder reader and the
`train` / `eval2afc` subcommands, against the official package.

Tolerances. Loss: the same float32 convolutions and a head summing a few hundred channel
terms (~1e-6 relative, see test_parity.py); 1e-5 relative. Weights after K Adam steps: each
step moves a weight by about lr * m / sqrt(v), a ratio of gradients, so a relative gradient
difference of ~1e-4 (test_parity.py's gradient tolerance) moves it by <= ~1e-4 * lr; with K
steps and a 10x margin: 1e-3 * lr * K absolute (plus float32 rounding of the weights, 1e-7).
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lpips_fast
from lpips_fast import calibrate
from lpips_fast.bapps import BAPPSFolder, load_bapps_image, write_synthetic_2afc as make_2afc
from lpips_fast.cli import main
from helpers import IMPLS, real_weights_available

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lpips

LR, STEPS = 1e-3, 3


def trainers(dropout, impl, net="alex"):
    """Ours and the official Trainer in the same state (random backbone, random lin and
    ranking-net weights; pnet_rand: the official pretrained path downloads)."""
    torch.manual_seed(0)
    ours = lpips_fast.Trainer()
    ours.initialize(net=net, pnet_rand=True, use_gpu=False, is_train=True, lr=LR,
                    dropout=dropout, impl=impl, verbose=False)
    with torch.no_grad():
        for lin in ours.net.lins:  # some negative: the clamp has work to do
            lin.weight.uniform_(-0.2, 1)
    theirs = lpips.Trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.initialize(net=net, pnet_rand=True, use_gpu=False, is_train=True, lr=LR)
    theirs.net.load_state_dict(ours.net.state_dict())
    theirs.rankLoss.net.load_state_dict(ours.rankLoss.net.state_dict())
    if not dropout:
        theirs.net.eval()  # the official Trainer without dropout
    return ours, theirs


def batch(gen, n=4, size=64):
    img = lambda: torch.rand(n, 3, size, size, generator=gen) * 2 - 1  # noqa: E731
    return dict(ref=img(), p0=img(), p1=img(), judge=torch.rand(n, 1, 1, 1, generator=gen))


def lin_weights(net):
    return torch.cat([lin.model[-1].weight.detach().flatten() for lin in net.lins])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout", [False, True])
def test_training_steps_match_official(dropout, impl):
    ours, theirs = trainers(dropout, impl)
    calls = []
    head_all = ours.net._head_all
    ours.net._head_all = lambda *a, **k: calls.append(1) or head_all(*a, **k)
    start = lin_weights(ours.net)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        data = batch(gen)
        for t in (ours, theirs):
            torch.manual_seed(100 + step)  # the same dropout masks
            t.set_input(data)
            t.optimize_parameters()
        e_ours, e_theirs = ours.get_current_errors(), theirs.get_current_errors()
        assert e_ours["loss_total"] == pytest.approx(float(e_theirs["loss_total"]), rel=1e-5)
        assert e_ours["acc_r"] == pytest.approx(float(e_theirs["acc_r"]), abs=1e-12)
    tol = 1e-3 * LR * STEPS + 1e-7
    w_ours, w_theirs = lin_weights(ours.net), lin_weights(theirs.net)
    assert (w_ours - start).abs().max() > 100 * tol  # the steps moved the weights
    assert (w_ours - w_theirs).abs().max() <= tol
    assert w_ours.min() >= 0 and start.min() < 0  # clamped
    for (name, a), b in zip(ours.rankLoss.net.state_dict().items(),
                            theirs.rankLoss.net.state_dict().values()):
        assert (a - b).abs().max() <= tol, name
    # no dropout: every step's 2 distances went through the all-layer (fused) head
    assert len(calls) == (0 if dropout else 2 * STEPS)
    if impl == "fused":
        assert head_all.__module__.endswith("_ops")


def test_learning_rate_decay_and_save_match_official(tmp_path):
    ours, theirs = trainers(dropout=True, impl="reference")
    for _ in range(3):
        ours.update_learning_rate(4)
        theirs.update_learning_rate(4)
        assert ours.old_lr == theirs.old_lr
        assert ([g["lr"] for g in ours.optimizer_net.param_groups]
                == [g["lr"] for g in theirs.optimizer_net.param_groups])
    ours.save(str(tmp_path), "latest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest_net_.pth", "latest_net_rank.pth"]
    path = str(tmp_path / "latest_net_.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = lpips.LPIPS(pnet_rand=True, model_path=path, verbose=False)
    again = lpips_fast.LPIPS(pnet_rand=True, model_path=path, verbose=False)
    for model in (official, again):
        assert torch.equal(lin_weights(model), lin_weights(ours.net))


def test_visuals_and_errors_match_official():
    ours, theirs = trainers(dropout=False, impl="reference")
    data = batch(torch.Generator().manual_seed(3), n=2, size=48)  # zoom 16/3: rounding matters
    for t in (ours, theirs):
        t.set_input(data)
        t.optimize_parameters()
    v_ours, v_theirs = ours.get_current_visuals(), theirs.get_current_visuals()
    assert list(v_ours) == list(v_theirs) == ["ref", "p0", "p1"]
    for k in v_ours:
        assert v_ours[k].shape == (256, 256, 3) and np.array_equal(v_ours[k], v_theirs[k]), k
    assert list(ours.get_current_errors()) == list(theirs.get_current_errors())


def test_bad_use_says_so():
    t = lpips_fast.Trainer()
    with pytest.raises(ValueError, match="model must be"):
        t.initialize(model="nope", use_gpu=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_gpu=True but CUDA"):
            t.initialize(pnet_rand=True)
    t.initialize(pnet_rand=True, use_gpu=False, is_train=True, verbose=False)
    with pytest.raises(KeyError, match="judge"):
        t.set_input({"ref": 0, "p0": 0, "p1": 0})


def test_baseline_models_forward_as_official():
    ours, theirs = lpips_fast.Trainer(), lpips.Trainer()
    for t in (ours, theirs):
        t.initialize(model="L2", colorspace="RGB", use_gpu=False)
    gen = torch.Generator().manual_seed(7)
    a, b = (torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1 for _ in range(2))
    assert ours.name() == theirs.name() == "L2"
    assert float(ours.forward(a, b)) == pytest.approx(float(theirs.forward(a, b)), rel=1e-6)


# --- scoring ----------------------------------------------------------------------------------

class OfficialLoader:
    """The official loaders' interface: load_data() gives the batches."""

    def __init__(self, batches):
        self.batches = batches

    def load_data(self):
        return self.batches


def scoring_batches(gen, n_batches=5, n=7):
    """Random distances (stored in the 'ref'/'p0'/'p1' slots, func picks them), some tied."""
    out = []
    for _ in range(n_batches):
        d = torch.rand(3, n, generator=gen).round(decimals=1)  # ties are common
        out.append(dict(ref=d[0], p0=d[1], p1=d[2], judge=torch.rand(n, 1, 1, 1, generator=gen),
                        same=(torch.rand(n, 1, 1, 1, generator=gen) > 0.5).float()))
    return out


def test_scores_match_official():
    batches = scoring_batches(torch.Generator().manual_seed(4))
    afc = lambda a, b: (a - b).abs().view(-1, 1, 1, 1)  # noqa: E731 - an N x 1 x 1 x 1 distance
    jnd = lambda a, b: (a - b).abs()  # noqa: E731 - upstream's JND wants N distances
    for ours_fn, theirs_fn, func in ((lpips_fast.score_2afc_dataset, lpips.score_2afc_dataset, afc),
                                     (lpips_fast.score_jnd_dataset, lpips.score_jnd_dataset, jnd)):
        s_ours, i_ours = ours_fn(batches, func, progress=False)
        s_theirs, i_theirs = theirs_fn(OfficialLoader(batches), func)
        assert 0 < s_theirs < 1 and s_ours == s_theirs
        assert i_ours.keys() == i_theirs.keys()
        for k in i_ours:
            assert np.array_equal(i_ours[k], i_theirs[k]), k
    # an official loader works with ours too
    assert lpips_fast.score_2afc_dataset(OfficialLoader(batches), afc)[0] == \
        lpips.score_2afc_dataset(OfficialLoader(batches), afc)[0]


# --- BAPPS folders ----------------------------------------------------------------------------

def test_bapps_folder_reads_the_official_layout(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "jnd"
    for d in ("p0", "p1", "same"):
        (root / d).mkdir(parents=True)
    for i in (2, 0, 1):  # files are paired by sorted path, not by creation order
        for d in ("p0", "p1"):
            Image.fromarray((rng.random((80, 64, 3)) * 255).astype(np.uint8)).save(
                root / d / f"{i}.png")
        np.save(root / "same" / f"{i}.npy", np.array([i / 4]))
    ds = BAPPSFolder(root, "jnd", load_size=32)
    assert len(ds) == 3
    s = ds[1]
    assert s["same"].shape == (1, 1, 1) and s["same"].item() == 0.25
    assert s["p0"].shape == (3, 40, 32) and s["p0_path"].endswith("1.png")
    raw = torch.tensor(np.asarray(Image.open(root / "p1" / "1.png").resize((32, 40), Image.BILINEAR)),
                       dtype=torch.float32).permute(2, 0, 1) / 255 * 2 - 1
    assert torch.allclose(s["p1"], raw, atol=1e-6)
    # the shorter side already at load_size: no resampling, exactly (x / 255 - 0.5) / 0.5
    exact = torch.tensor(np.asarray(Image.open(root / "p0" / "0.png")), dtype=torch.float32)
    assert torch.equal(load_bapps_image(root / "p0" / "0.png", 64),
                       (exact.permute(2, 0, 1) / 255 - 0.5) / 0.5)
    (root / "same" / "0.npy").unlink()
    with pytest.raises(ValueError, match="different numbers of files"):
        BAPPSFolder(root, "jnd")
    with pytest.raises(ValueError, match="no such folder"):
        BAPPSFolder(root, "2afc")


@pytest.mark.skipif(not real_weights_available("alex"), reason="AlexNet weights not available")
def test_cli_train_recovers_a_known_weighting(tmp_path, capsys):
    # The teacher weighs only layer 5's channels (random non-negative weights); the trainer
    # starts from upstream's random lin initialisation.
    teacher = lpips_fast.LPIPS(pretrained=False, verbose=False)
    with torch.no_grad():
        for lin in teacher.lins:
            lin.weight.zero_()
        teacher.lins[4].weight.uniform_(0, 1, generator=torch.Generator().manual_seed(6))
    train, test = make_2afc(tmp_path / "train", 100, teacher, 1), make_2afc(tmp_path / "test", 80, teacher, 2)
    out, init = tmp_path / "w.pth", tmp_path / "w0.pth"
    args = ["--device", "cpu", "-q", "--batch-size", "25", "--decay-epochs", "0", "--lr", "1e-2",
            "--no-dropout"]
    assert main(["train", str(train), "-o", str(init), "--epochs", "0", *args]) == 0
    assert main(["train", str(train), "-o", str(out), "--epochs", "3", *args]) == 0
    capsys.readouterr()
    scores = {}
    for name, path in (("init", init), ("trained", out)):
        assert main(["eval2afc", str(test), "--model-path", str(path), "--json", "-q",
                     "--device", "cpu"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["triplets"] == 80
        scores[name] = res["2afc"]
    # chance on 80 held-out binary triplets: 0.5 +- 0.056 (one std); 0.75 is 4.5 std above it
    assert scores["trained"] >= 0.75 and scores["trained"] > scores["init"], scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = lpips.LPIPS(pnet_rand=True, model_path=str(out), verbose=False)
    assert torch.equal(lin_weights(official), lin_weights(
        lpips_fast.LPIPS(pnet_rand=True, model_path=str(out), verbose=False)))
    assert lin_weights(official).min() >= 0


@pytest.mark.skipif(not real_weights_available("alex"), reason="AlexNet weights not available")
def test_resume_ends_with_the_uninterrupted_weights(tmp_path, capsys):
    teacher = lpips_fast.LPIPS(verbose=False)
    data = make_2afc(tmp_path / "d", 12, teacher, 3)
    settings = calibrate.TrainSettings(epochs=1, decay_epochs=1, batch_size=5, lr=1e-2)
    calibrate.train(data, tmp_path / "full.pth", settings, progress=False, log=lambda m: None)

    def stop(msg):
        if msg.startswith("epoch 1/"):
            raise KeyboardInterrupt  # after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        calibrate.train(data, tmp_path / "cut.pth", settings, progress=False, log=stop)
    assert not (tmp_path / "cut.pth").exists()
    argv = ["train", str(data), "-o", str(tmp_path / "cut.pth"), "--epochs", "1",
            "--decay-epochs", "1", "--batch-size", "5", "--lr", "1e-2", "--device", "cpu", "-q"]
    assert main(argv + ["--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().err
    full, cut = torch.load(tmp_path / "full.pth"), torch.load(tmp_path / "cut.pth")
    assert full.keys() == cut.keys() == {f"lin{k}.model.1.weight" for k in range(5)}
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    # other settings cannot resume that checkpoint: one line, exit 2
    argv[argv.index("1e-2")] = "1e-3"
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (lr 0.01 != 0.001)" in err


def test_cli_input_errors(tmp_path, capsys):
    assert main(["eval2afc", str(tmp_path / "none"), "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err
    assert main(["train", str(tmp_path), "-o", str(tmp_path / "x" / "w.pth"), "-q"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_bench_train_runs(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_train
    bench_train.main(["--triplets", "2", "--batch-size", "2", "--size", "32", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    # a header and 5 variants, 3 of them compared with their official counterpart
    assert len(rows) == 6 and sum(r.endswith("x |") for r in rows) == 3
