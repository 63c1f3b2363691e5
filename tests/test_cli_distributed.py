"""`dirs`, `allpairs` and `video` under torchrun: two gloo ranks on loopback write the file of one
plain process, byte for byte; a failed rank stops the run with one line naming it.

Both runs use one thread (torchrun's default for its workers, OMP_NUM_THREADS=1; the plain
run sets it in the test's process): byte identity needs the same thread count in every
process, because the CPU kernels' float sums are split by thread. The plain run
(lpips_fast.cli.main in the test's process) is the single-process reference: it goes through
the same `run_sharded` code with a world of one and chunks that do not depend on the number
of ranks (torchrun --nproc_per_node 1 is the same code path: a launch of one process is not a
distributed one).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli, free_port


def env():
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    e.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")
    return e


def plain(*args):
    """The single-process reference run: in this process, on one thread like each rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli(*args)
    finally:
        torch.set_num_threads(threads)


def two_ranks(*args, extra_env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
           "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "lpips_fast", *map(str, args)]
    return subprocess.run(cmd, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=120)


def done(p):
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def image(path, rng, size=(64, 64)):
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_dist")
    rng = np.random.default_rng()  # fresh inputs every run
    ref, dist, pool = root / "ref", root / "dist", root / "pool"
    for d in (ref, dist, pool):
        d.mkdir()
    for i in range(7):
        a = image(ref / f"im{i}.png", rng)
        noise = rng.integers(-40, 41, a.shape)
        Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8)).save(dist / f"im{i}.png")
    for i in range(8):
        image(pool / f"p{i}.png", rng)
    image(pool / "wide.png", rng, size=(80, 64))  # its pairs fail (size mismatch), in any run
    return root


def write_video(path, frames):
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for a in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode())


def test_two_ranks_write_the_single_process_csv(data):
    pytest.importorskip("av")
    rng = np.random.default_rng()
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(7)]
    write_video(data / "ref.mp4", frames)
    write_video(data / "dist.mp4", [np.clip(f + rng.integers(-30, 31, f.shape), 0, 255)
                                    .astype(np.uint8) for f in frames])
    # batches of 2: 4 chunks each (dirs: 7 pairs; video: 7 frames; allpairs: 4 row blocks of
    # the 8 images of 64x64, plus the 8 failing pairs of wide.png)
    jobs = {
        "dirs": ("dirs", data / "ref", data / "dist", "--batch-size", "2", "--workers", "1"),
        "allpairs": ("allpairs", data / "pool", "--batch-size", "2", "--workers", "0"),
        "video": ("video", data / "ref.mp4", data / "dist.mp4", "--batch-size", "2"),
        # tLP: each rank's chunks start from their previous frame, which the other rank scored
        "video-tlp": ("video", data / "ref.mp4", data / "dist.mp4", "--batch-size", "2",
                      "--tlp"),
    }
    singles = {k: plain(*job, "-o", data / f"{k}1.csv", "-q") for k, job in jobs.items()}
    for name, job in jobs.items():
        one = singles[name]
        assert one.returncode == (1 if name == "allpairs" else 0), one.stderr
        two = two_ranks(*job, "-o", data / f"{name}2.csv")
        assert two.returncode == one.returncode, two.stderr[-3000:]
        a, b = (data / f"{name}1.csv").read_bytes(), (data / f"{name}2.csv").read_bytes()
        assert a == b, name
        lines = a.decode().splitlines()
        assert len(lines) == 1 + {"dirs": 7, "allpairs": 28, "video": 7, "video-tlp": 7}[name]
        assert ("7 frames" if name.startswith("video") else "on 2 ranks") in two.stdout
        assert two.stdout.count("LPIPS mean") == 1  # rank 0 alone reports
        if name == "allpairs":
            assert "failed: 8 of 36 pairs" in one.stderr and "failed: 8 of 36" in two.stderr


def test_a_failed_rank_is_named_rows_stay_and_resume_finishes(data):
    job = ("allpairs", data / "pool", "--batch-size", "2", "--workers", "0", "-q")
    full = data / "full.csv"
    one = plain(*job, "-o", full)
    assert one.returncode == 1, one.stderr  # the pairs of wide.png fail
    part = data / "part.csv"
    # rank 1 raises on its second chunk (row block 3: p6, p7): row blocks 0, 1, 2 are written
    bad = two_ranks(*job, "-o", part, extra_env={"LPIPS_FAST_FAIL_RANK": "1"})
    assert bad.returncode == 1
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, bad.stderr[-3000:]
    assert errors[0].startswith("error: rank 1 of 2 failed on pair (p6.png, p7.png): "), errors
    assert "RuntimeError: injected failure" in errors[0] and "--resume" in errors[0]
    kept = part.read_text().splitlines()
    expect = full.read_text().splitlines()
    # the rows of p0..p5 (the pairs of wide.png are failures, not rows): 7+6+5+4+3+2 = 27
    assert kept == expect[:1 + 27]
    resumed = two_ranks(*job, "-o", part, "--resume")
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # wide.png's pairs still fail
    assert "27 of 36 pairs already" in resumed.stderr
    assert part.read_bytes() == full.read_bytes()


def two_processes(args0, args1, cwd1=None):
    """Rank 0 and rank 1 of a launch started by hand (as on two machines), with their own
    arguments (and rank 1 in its own folder)."""
    port = str(free_port())
    procs = []
    for rank, args in enumerate((args0, args1)):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        e["PYTHONPATH"] = os.pathsep.join([root, e.get("PYTHONPATH", "")])  # from any folder
        procs.append(subprocess.Popen([sys.executable, "-m", "lpips_fast", *map(str, args)],
                                      env=e, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, cwd=cwd1 if rank else None))
    return [done(p) for p in procs]


def test_ranks_started_with_other_arguments_are_refused(data, tmp_path):
    """Rank 0 plans the work, but every rank scored it with its own --net (or resize, videos,
    ...): a typo on one machine mixed vgg values into an alex CSV, silently, exit 0."""
    job = ("dirs", data / "ref", data / "dist", "--batch-size", "2", "--workers", "0", "-q",
           "-o", tmp_path / "out.csv")
    r0, r1 = two_processes(job, (*job, "--net", "vgg"))
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr, r1.stderr)
    assert r0.stderr.strip().splitlines() == [
        "error: rank 1 of 2 was started with other arguments than rank 0 (net 'vgg', rank 0: "
        "'alex'): every rank must run the same command"], r0.stderr
    assert r1.stderr == "" and list(tmp_path.iterdir()) == []  # nothing written


def test_a_rank_that_fails_before_joining_says_why(data, tmp_path):
    """A rank other than 0 that cannot join (its --device is unusable on its machine) exited
    with status 2 and printed nothing: rank 0 never hears of it, and its own output is
    silenced. It says it now, itself, in one line naming its rank."""
    e = {**env(), "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for device, problem in (("cuda", "CUDA is not available here"),
                            ("cuda:1", "under a distributed launch each rank uses")):
        out = subprocess.run([sys.executable, "-m", "lpips_fast", "dirs", data / "ref",
                              data / "dist", "-o", tmp_path / "out.csv", "--device", device],
                             env=e, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: rank 1 of 2: --device {device}: ")
        assert problem in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_cannot_open_its_inputs_is_named_with_its_error(data, tmp_path):
    """Every video rank decodes the videos itself. Rank 1 could not open them (a path not
    visible on its machine; here: relative paths, rank 1 in another folder): it exited with
    its error unsaid, and rank 0 reported only "a rank died without reporting", after
    creating the CSV. Now rank 0 names rank 1 and its error, and nothing is written."""
    pytest.importorskip("av")
    rng = np.random.default_rng()
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    here = tmp_path / "videos"
    here.mkdir()
    write_video(here / "a.mp4", frames)
    write_video(here / "b.mp4", frames[::-1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = ("video", "a.mp4", "b.mp4", "-q", "-o", tmp_path / "out.csv")
    cwd = os.getcwd()
    os.chdir(here)  # rank 0 starts here (Popen inherits it)
    try:
        r0, r1 = two_processes(job, job, cwd1=elsewhere)
    finally:
        os.chdir(cwd)
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr, r1.stderr)
    assert r0.stderr.strip().splitlines() == ["error: rank 1 of 2: a.mp4: no such file"], r0.stderr
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.summary.json").exists()
