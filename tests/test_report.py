"""`instaflow-batch report`: the page's contents, and the page in a real browser (headless Chromium, which
`infra/local/dev.sh test` installs): it renders, its images decode, its shard table has a row per shard, and no
script error reaches the console."""

import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.main import main

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
