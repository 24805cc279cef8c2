"""`instaflow-batch report`: the page's contents, and the page in a real browser (headless Chromium, which
`infra/local/dev.sh test` installs): it renders, its images decode, its shard table has a row per shard, and no
script error reaches the console."""

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.main import main
from tests.jobhelpers import tar_members

HOSTILE = "<script>alert('x')</script> a red fox"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def outputs(ray_gpus, tiny_models, tmp_path_factory):
    """An images output (scores on, a failed row, a prompt with markup) and a pairs output."""
    folder = tmp_path_factory.mktemp("report")
    prompts = [HOSTILE, *(f"a lighthouse at night, number {i}" for i in range(8)), ""]
    pq.write_table(pa.table({"prompt": prompts}), folder / "prompts.parquet", row_group_size=5)
    common = ["--prompts", str(folder / "prompts.parquet"), "--height", "64", "--width", "64", "--rows-per-shard",
              "5", "--num-workers", "1", "--no-progress"]
    assert main(["run", "generate", *common, "--output", str(folder / "images"), "--model",
                 str(tiny_models["instaflow"]), "--scores", "nsfw,clip", "--safety-checker",
                 str(tiny_models["safety_checker"]), "--clip-model", str(tiny_models["clip"])]) == 0
    assert main(["run", "reflow-pairs", *common, "--output", str(folder / "pairs"), "--teacher",
                 str(tiny_models["sd15"]), "--steps", "2"]) == 0
    return folder


def report(output: Path, out: Path, *flags: str) -> str:
    assert main(["report", str(output), "--out", str(out), *flags]) == 0
    return out.read_text()


def test_the_page_holds_settings_shards_gallery_and_failed_rows(outputs, tmp_path):
    page = report(outputs / "images", tmp_path / "images.html", "--n", "6")
    assert "verify: <b class='ok'>OK</b>, 2 of 2 shards committed" in page
    shards = re.search(r"<table id='shards'>.*?</table>", page).group(0)
    assert shards.count("<tr><td>") == 2  # one row per shard
    assert page.count("<figure>") == 6 and page.count("data:image/jpeg;base64,") == 6
    assert "nsfw " in page and "clip " in page  # the scores under each image
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and HOSTILE not in page  # escaped
    assert "row 9" in page and "empty prompt" in page  # the failed row and its reason
    assert "<svg" in page and "samples/s" in page
    assert re.search(r"<th>scores</th><td>\[&quot;nsfw&quot;, &quot;clip&quot;\]</td>", page)
    assert not re.search(r"(src|href)=['\"]https?:", page)  # nothing to fetch: it opens from a file

    pairs = report(outputs / "pairs", tmp_path / "pairs.html", "--n", "3")
    assert pairs.count("<figure class='pair'>") == 3 and pairs.count("data:image/jpeg;base64,") == 6


def test_a_folder_that_is_no_output_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no _job.json" in err and len(err.splitlines()) == 1


def test_the_page_renders_in_headless_chromium(outputs, tmp_path):
    assert CHROMIUM, "chromium is not installed: `bash infra/local/dev.sh test` installs it (Debian's package)"
    page = tmp_path / "images.html"
    report(outputs / "images", page, "--n", "8")
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0"]
    shot = tmp_path / "report.png"
    done = subprocess.run([*browser, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body ([^>]*)>", dom.stdout)
    assert body, dom.stderr[-2000:]
    marks = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1)))
    assert marks == {"images": "8", "images-decoded": "8", "shard-rows": "2"}
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # the page's script ran without an error or a warning
    from PIL import Image

    with Image.open(shot) as image:  # the screenshot is the page, not a blank window
        colours = image.convert("L").getextrema()
        assert image.size == (1280, 1600) and colours[1] - colours[0] > 100


PLANTED_SEED = "<b onmouseover=alert(1)>7</b>"
PLANTED_PROMPT = "<img src=x onerror=alert(1)> \x1b[2J a planted prompt"


class Tags(HTMLParser):
    """Every start tag of a page with its attributes: what a browser would build and run."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def plant(output: Path) -> None:
    """Data no job of this tool writes, planted in a committed output: marker 00000's count is markup, and the
    first sample of shard 00001 has a seed with markup and a prompt that clears a terminal (its marker's digest
    updated, so that the shard still counts)."""
    marker = json.loads((output / "00000.stats.json").read_text())
    (output / "00000.stats.json").write_text(json.dumps(marker | {"count": "<script>alert(1)</script>\x1b[2J"}))
    tar_path, marker_path = output / "00001.tar", output / "00001.stats.json"
    members = tar_members(tar_path.read_bytes())
    first = sorted(name for name in members if name.endswith(".json"))[0]
    members[first] = json.dumps(json.loads(members[first]) | {"seed": PLANTED_SEED, "prompt": PLANTED_PROMPT}).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_path.write_bytes(buffer.getvalue())
    marker = json.loads(marker_path.read_text())
    marker["files"]["00001.tar"] = {"bytes": len(buffer.getvalue()),
                                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    marker_path.write_text(json.dumps(marker))


def test_planted_markup_and_terminal_escapes_are_shown_escaped(outputs, tmp_path, capsys):
    output = tmp_path / "planted"
    shutil.copytree(outputs / "images", output)
    plant(output)
    capsys.readouterr()
    page = report(output, tmp_path / "planted.html", "--n", "3")
    parsed = Tags()
    parsed.feed(page)
    assert [tag for tag, _ in parsed.tags].count("script") == 1  # the page's own
    assert not [(tag, attrs) for tag, attrs in parsed.tags if any(name.startswith("on") for name in attrs)]
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "seed &lt;b onmouseover=alert(1)&gt;7&lt;/b&gt;" in page
    assert "marker 00000.stats.json is damaged and does not count: field &#x27;count&#x27; is a string" in page
    assert "<script>alert" not in page and "1 of 2 shards committed" in page  # the damaged marker does not count

    assert main(["verify", str(output)]) == 1
    assert main(["preview", str(output), "--out", str(tmp_path / "planted.png"), "--n", "3"]) == 0
    printed = capsys.readouterr()
    assert "PROBLEM marker 00000.stats.json is damaged and does not count: field 'count' is a string" in printed.out
    assert "\x1b" not in printed.out + printed.err
