"""The README and docs/ as a user meets them: every command runs as written, every link resolves.

Each fenced ```bash or ```python block of README.md and docs/*.md runs here: Python in this
process (exec with a fresh namespace), shell through bash with this interpreter's bin folder
(its `lpips-fast`) first on PATH, each in a fresh folder holding the small generated inputs the
blocks name (ref.png, dist.jpg, ref/, dist/, samples/, ref.mp4, dist.mkv). A block that must not
run here (a GPU, the network, several processes, minutes) carries, on the line right above its
opening fence, `<!-- skip-test: the reason -->`; it is reported as a skipped test with that
reason (pytest -ra lists them), so no block is silently left out.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import image, make_dirs, noisy, write_video

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"bash", "python"}
TEXT_LANGS = {"", "text"}          # fenced text that is not a command (a layout, an output)
SKIP_MARK = re.compile(r"^<!--\s*skip-test:(.*?)-->\s*$")
FENCE = re.compile(r"^\s*```(.*)$")   # also indented, in a list item


@dataclass
class Block:
    page: Path
    line: int           # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None    # the marker's reason

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page: Path) -> list[Block]:
    """The fenced blocks of a page; raises ValueError on a marker that is not right above an
    opening fence, a marker without a reason, a fence left open or a language not handled."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        mark = SKIP_MARK.match(lines[i].strip())
        if mark:
            if not mark.group(1).strip():
                raise ValueError(f"{page.name}:{i + 1}: skip-test marker without a reason")
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                raise ValueError(f"{page.name}:{i + 1}: skip-test marker not right above a fence")
        fence = FENCE.match(lines[i])
        if fence:
            lang = fence.group(1).strip()
            if lang not in RUN_LANGS | TEXT_LANGS:
                raise ValueError(f"{page.name}:{i + 1}: fence language {lang!r} is neither run "
                                 f"({sorted(RUN_LANGS)}) nor text")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{page.name}:{i + 1}: fence never closed")
            prev = SKIP_MARK.match(lines[i - 1].strip()) if i else None
            if lang in RUN_LANGS:
                code = textwrap.dedent("\n".join(lines[i + 1:end]) + "\n")
                blocks.append(Block(page, i + 1, lang, code,
                                    prev.group(1).strip() if prev else None))
            i = end
        i += 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in parse(page)]


def test_pages_hold_blocks_to_run_and_markers_name_their_reason():
    # parse() above already refused stray or empty markers; here: the pages exist and the
    # pages of commands do run some (a marker on everything would pass the per-block tests).
    names = {p.name for p in PAGES}
    assert {"README.md", "python.md", "cli.md", "performance.md", "reliability.md",
            "development.md"} <= names
    ran = [b for b in ALL_BLOCKS if b.skip is None]
    skipped = [b for b in ALL_BLOCKS if b.skip is not None]
    print(f"{len(ran)} blocks run, {len(skipped)} skipped:")
    for b in skipped:
        print(f"  {b.name} ({b.lang}): {b.skip}")
    assert {b.lang for b in ran} == RUN_LANGS
    assert {b.page.name for b in ran} >= {"README.md", "python.md", "cli.md"}


def test_parse_refuses_a_stray_marker_and_reads_a_marked_block(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("<!-- skip-test: why -->\n```bash\nfalse\n```\n"
                    "- a list item:\n  ```python\n  x = 1\n  ```\n")
    blocks = parse(page)
    assert [(b.lang, b.skip, b.code) for b in blocks] == [("bash", "why", "false\n"),
                                                          ("python", None, "x = 1\n")]
    for bad in ("<!-- skip-test: why -->\n\n```bash\nfalse\n```\n",
                "<!-- skip-test: -->\n```bash\nfalse\n```\n",
                "```sh\nfalse\n```\n", "```bash\nfalse\n"):
        page.write_text(bad)
        with pytest.raises(ValueError):
            parse(page)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """The files the blocks name, made once: 64 x 64 images (every net's minimum is below)."""
    root = tmp_path_factory.mktemp("doc_inputs")
    a = image(root / "ref.png", 0)
    Image.fromarray(noisy(a, 1)).save(root / "dist.jpg")
    make_dirs(root, n=3)
    (root / "samples").mkdir()
    for i in range(4):
        image(root / "samples" / f"s{i}.png", 10 + i)
    frames = [np.asarray(Image.open(root / "ref" / f"im{i}.png")) for i in range(3)]
    write_video(root / "ref.mp4", frames)
    write_video(root / "dist.mkv", [noisy(f, 20 + i) for i, f in enumerate(frames)])
    return root


@pytest.fixture
def workdir(inputs, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="session")
def shell_runs(inputs, tmp_path_factory):
    """Every shell block to run, started at once (each one mostly waits on imports), each in
    its own copy of the inputs; a test then waits for its block's process."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    from lpips_fast import weights
    weights.resolve_backbone("alex")  # fills this session's cache once, for every block to read
    procs = {}
    for b in ALL_BLOCKS:
        if b.lang == "bash" and b.skip is None:
            work = tmp_path_factory.mktemp("shell") / "work"
            shutil.copytree(inputs, work)
            procs[b.name] = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", b.code], cwd=work, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


# Python blocks first: they run here while the shell blocks' processes (started by the first
# test) work on the other core.
@pytest.mark.parametrize("block", sorted(ALL_BLOCKS, key=lambda b: b.lang != "python"),
                         ids=lambda b: f"{b.name}-{b.lang}")
def test_block_runs_as_written(block, request):
    if block.skip is not None:
        pytest.skip(f"{block.name}: {block.skip}")
    shell = request.getfixturevalue("shell_runs")
    if block.lang == "python":
        request.getfixturevalue("workdir")
        # Named after its page and line, so a traceback points into the document.
        exec(compile(block.code, block.name, "exec"), {"__name__": "__docs__"})
        return
    proc = shell[block.name]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, (f"{block.name} exited {proc.returncode}\n{block.code}\n"
                                  f"stdout:\n{stdout}\nstderr:\n{stderr}")


# Links: [text](target) outside code; the target's file must exist and its #anchor must be a
# heading of that file, as GitHub names them (lower case, punctuation dropped, spaces -> '-').
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    return re.sub(r"^\s*```.*?^\s*```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    seen, out = {}, set()
    for h in re.findall(r"^#{1,6}\s+(.*?)\s*$", prose(page), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchor_names_follow_github(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# The module, the function\n## Output (dirs, allpairs, video)\n"
                    "```text\n# not a heading\n```\n## A `x_y` b\n## A `x_y` b\n")
    assert anchors(page) == {"the-module-the-function", "output-dirs-allpairs-video",
                             "a-x_y-b", "a-x_y-b-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):          # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_docs_pages_are_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(prose(PAGES[0]))}
    assert set(PAGES[1:]) <= linked


def test_readme_stays_short():
    assert (ROOT / "README.md").stat().st_size < 15 * 1024


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell (header and separator rows left out)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[1:]) <= {"---", ""} and cells[0] != "case":
            rows[cells[0]] = cells[1:]
    return rows


def test_readme_performance_numbers_are_those_of_the_linked_results():
    """Every number in the README's performance tables is a cell of the same case's row in the
    results file linked in the caption above the table (a table cannot drift from what was
    measured, nor mix up devices)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Performance\n")[1].split("\n## ")[0]
    source, checked = None, 0
    for para in section.split("\n\n"):
        if not para.lstrip().startswith("|"):
            links = re.findall(r"\((benchmarks/results/[^)]+\.md)\)", para)
            source = links[-1] if links else source
            continue
        assert source, "a performance table without a results file linked above it"
        results = table_rows((ROOT / source).read_text(encoding="utf-8"))
        for case, cells in table_rows(para).items():
            assert case in results, f"{case!r} is not a case of {source}"
            for cell in cells:
                assert cell in results[case], f"{case}: {cell} not in {source}'s row"
                checked += 1
    assert checked >= 20
