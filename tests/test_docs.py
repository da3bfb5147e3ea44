"""The README and docs/ hold together, and the repository deploys to a Hugging Face Space.

- every relative link in README.md and docs/*.md reaches a file, and every anchor a heading
  of that file (GitHub's slugs);
- README.md stays a newcomer's page (at most 160 lines) and links every docs/ page;
- the Space front matter at the top of README.md agrees with the code (sdk, the gradio pin,
  the app file, the Python version);
- every tracked weight and image file is routed to Git LFS by .gitattributes (the Hub
  refuses binary files that LFS does not track), and docs/deploy.md's commands, run against a
  local bare repository, push every one of them as an LFS object;
- the README's `gradio_client` example runs as written against the app on the shipped
  weights and prints the output the README shows.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import io
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 160
LFS_ATTRIBUTES = ("filter=lfs", "diff=lfs", "merge=lfs", "-text")
BINARY_EXTENSIONS = (".safetensors", ".png", ".jpg", ".jpeg")

_FENCED_CODE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """Markdown without its code: links and headings inside code are not links or headings."""
    return _INLINE_CODE.sub("", _FENCED_CODE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _,
    spaces to -. Markdown around the words (`code`, **bold**, [links](...)) is text first."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a markdown file (a repeated slug gets -1, -2...)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in _HEADING.findall(_prose(page.read_text())):
        slug = _slug(heading)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(page: Path) -> list[str]:
    """The targets of `[text](target)` and `![alt](target)` that stay in the repository."""
    targets = _LINK.findall(_prose(page.read_text()))
    return [t for t in targets if not re.match(r"(https?|mailto):", t, re.IGNORECASE)]


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def broken_links(page: Path) -> list[str]:
    """One line per link of `page` whose file or heading does not exist."""
    problems = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no file {_shown(file)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading #{anchor} in {_shown(file)}")
    return problems


def front_matter(text: str) -> dict[str, str]:
    """The `key: value` lines between the first two `---` lines (a Hugging Face Space's config)."""
    lines = text.splitlines()
    assert lines and lines[0].strip() == "---", "README.md must start with the Space front matter (---)"
    end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
    fields = {}
    for line in lines[1:end]:
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip().strip("\"'")
    return fields


def test_there_are_docs_pages():
    assert {page.name for page in DOCS} >= {"training.md", "model-selection.md", "deploy.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Set up, run: test (GPU)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#set-up-run-test-gpu) [self](#page) ![img](other.md) "
        "[web](https://example.org/x) `[code](nowhere.md)`\n\n"
        "[gone](missing.md) [bad anchor](other.md#set-up) [bad self](#nowhere)\n"
    )
    assert [problem.split(":")[0] for problem in broken_links(page)] == ["missing.md", "other.md#set-up", "#nowhere"]


def test_github_slugs():
    assert _slug("What holds up at a new site") == "what-holds-up-at-a-new-site"
    assert _slug("Set up, run, test") == "set-up-run-test"
    assert _slug("`covidtl-predict` and **the API**") == "covidtl-predict-and-the-api"
    assert _slug("Speed (2-core CPU)") == "speed-2-core-cpu"


def test_the_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, f"README.md has over {MAX_README_LINES} lines: move it to docs/"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


def test_the_space_front_matter_agrees_with_the_code():
    fields = front_matter(README.read_text())
    pins = dict(
        line.split("==", 1) for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    )
    assert fields.get("sdk") == "gradio"
    assert fields.get("sdk_version") == pins["gradio"].strip(), "sdk_version must be the gradio pin of requirements.txt"
    assert (ROOT / fields.get("app_file", "")).is_file(), f"app_file {fields.get('app_file')!r} does not exist"
    python = fields.get("python_version", "")
    assert python.startswith("3."), f"python_version {python!r}"
    required = re.search(r'requires-python\s*=\s*">=\s*(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    if required:
        assert tuple(int(n) for n in python.split(".")[:2]) >= (int(required[1]), int(required[2])), (
            f"python_version {python} is below pyproject's requires-python"
        )


def _lfs_patterns() -> list[str]:
    patterns = []
    for line in (ROOT / ".gitattributes").read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and all(a in fields[1:] for a in LFS_ATTRIBUTES):
            patterns.append(fields[0])
    return patterns


def _routed_to_lfs(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name if "/" not in p else path, p) for p in patterns)


def test_tracked_weights_and_images_are_routed_to_lfs():
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    binaries = [path for path in tracked if path.lower().endswith(BINARY_EXTENSIONS)]
    assert binaries, "no tracked weights or images found"
    patterns = _lfs_patterns()
    assert [path for path in binaries if not _routed_to_lfs(path, patterns)] == []


def test_an_unrouted_binary_is_found():
    patterns = ["*.png"]
    assert _routed_to_lfs("assets/screenshot-classify.png", patterns)
    assert not _routed_to_lfs("weights/model.safetensors", patterns)


# --------------------------------------------------------------------------- the deploy steps

DEPLOY = ROOT / "docs" / "deploy.md"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"


def test_committed_weights_and_images_are_their_bytes_not_lfs_pointers():
    """This repository keeps its binaries as plain blobs (the Space gets pointers at deploy, from
    `git lfs migrate`). With Git LFS's filters installed (`git lfs install`, or Debian's package
    in /etc/gitconfig), `git add` of a weight would commit a pointer whose bytes no clone gets."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    binaries = _committed_binaries()
    paths = sorted(binaries)
    flags = _lfs_pointers([binaries[path] for path in paths], cwd=ROOT, env=dict(os.environ))
    pointers = [path for path, pointer in zip(paths, flags) if pointer]
    assert pointers == [], (f"committed as Git LFS pointers: {pointers}; run `git lfs uninstall --system` (or "
                            "without --system), then `git rm --cached` and `git add` them again")


def deploy_commands(text: str) -> list[str]:
    """The command block of docs/deploy.md: the steps that push a fresh clone to a Space."""
    block = re.search(r"\n\n((?: {4}(?:git|cd) .*\n)+)", text)
    assert block, "docs/deploy.md needs its block of commands (git clone ... git push ...)"
    return [line.strip() for line in block[1].splitlines()]


def _git(*args: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"git {' '.join(args)} failed: {proc.stderr[-2000:]}"
    return proc.stdout


def _committed_binaries() -> dict[str, str]:
    """{path: blob id} of every weight and image in this checkout's HEAD."""
    head = _git("ls-tree", "-r", "HEAD", cwd=ROOT, env=dict(os.environ))
    committed = {line.split("\t", 1)[1]: line.split()[2] for line in head.splitlines()}
    return {path: oid for path, oid in committed.items() if path.lower().endswith(BINARY_EXTENSIONS)}


def _lfs_pointers(oids: list[str], cwd: Path, env: dict) -> list[bool]:
    """Whether each blob `oids` names (in the repository at `cwd`) is a Git LFS pointer."""
    blobs = subprocess.run(["git", "cat-file", "--batch"], cwd=cwd, env=env, input="\n".join(oids).encode() + b"\n",
                           capture_output=True, check=True, timeout=600).stdout  # fmt: skip
    flags = []
    for _ in oids:
        header, blobs = blobs.split(b"\n", 1)
        size = int(header.split()[2])
        flags.append(blobs[:size].startswith(LFS_POINTER))
        blobs = blobs[size + 1 :]
    return flags


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="Git LFS is not installed (.ci/run installs it)")
def test_the_deploy_steps_push_every_weight_and_image_as_an_lfs_object(tmp_path):
    """docs/deploy.md's commands, run as written, with a local bare repository for the Space:
    every weight and image blob of every pushed commit is an LFS pointer (what the Hub asks),
    and a clone of the pushed repository gets this checkout's committed files back."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    committed = _committed_binaries()
    binaries = sorted(committed)
    # Git and Git LFS configured only here: the user's and the system's settings stay out.
    env = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
    space = tmp_path / "space.git"
    _git("init", "-q", "--bare", str(space), cwd=tmp_path, env=env)
    commands = deploy_commands(DEPLOY.read_text())
    assert commands[0].startswith("git clone <this repository> ") and commands[-1].startswith("git push")
    branch = shlex.split(commands[-1])[-1]
    cwd = tmp_path
    for command in commands:
        words = shlex.split(command.replace("<this repository>", shlex.quote(str(ROOT))))
        words = [str(space) if "<user>/<space>" in word else word for word in words]
        if words[0] == "cd":
            cwd = cwd / words[1]
            continue
        _git(*words[1:], cwd=cwd, env=env)
        if words[1] == "clone":  # on the branch the docs push, as a clone from the hosting is (CI may be detached)
            _git("checkout", "-q", "-B", branch, cwd=cwd / words[-1], env=env)

    objects = _git("rev-list", "--objects", "--all", cwd=space, env=env).splitlines()
    sent = [line.split(" ", 1)[0] for line in objects if line.lower().endswith(BINARY_EXTENSIONS)]
    assert len(sent) >= len(binaries) > 0
    not_pointers = [oid for oid, pointer in zip(sent, _lfs_pointers(sent, cwd=space, env=env)) if not pointer]
    assert not_pointers == [], f"{len(not_pointers)} weight or image blobs pushed without LFS"

    pulled = tmp_path / "pulled"
    _git("clone", "-q", "-b", branch, str(space), str(pulled), cwd=tmp_path, env=env)
    back = _git("hash-object", "--no-filters", "--", *binaries, cwd=pulled, env=env).split()
    assert back == [committed[path] for path in binaries]  # the same bytes as this checkout's HEAD


# --------------------------------------------------------------------------- the README's API example

README_URL = "http://127.0.0.1:7860/"  # `python app.py`'s address, as the example writes it


def readme_api_example(text: str) -> tuple[str, str]:
    """The python block of the README's "Use it from a script" section and the text block
    that shows its output."""
    section = text.split("## Use it from a script", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    shown = re.search(r"```text\n(.*?)```", section, re.DOTALL)
    assert code and shown, "the README's 'Use it from a script' needs a python block and a text block of its output"
    return code[1], shown[1].strip()


def test_the_readme_api_example_runs_as_written_and_prints_what_the_readme_shows(monkeypatch):
    import app
    from covidtl.answer import ModelFolder
    from synthetic_inputs import launched

    if not list(app.DEFAULT_WEIGHTS_DIR.glob("*.safetensors")):
        pytest.skip("no shipped models in weights/")
    code, shown = readme_api_example(README.read_text())
    assert len(code.strip().splitlines()) == 3 and README_URL in code
    monkeypatch.chdir(ROOT)  # the example's path is relative to the repository, as in the README
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry thread from the client
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    folder = ModelFolder(app.DEFAULT_WEIGHTS_DIR)
    folder.warm_up()  # the models loaded before the request: gradio_client's calls time out after 5 s
    printed = io.StringIO()
    with launched(app.build_demo(app.DEFAULT_WEIGHTS_DIR, folder=folder)) as url, contextlib.redirect_stdout(printed):
        exec(compile(code.replace(README_URL, url), "README.md", "exec"), {})
    got, expected = ast.literal_eval(printed.getvalue().strip().splitlines()[-1]), ast.literal_eval(shown)
    assert got.keys() == expected.keys() and {"decision", "p_covid", "threshold", "model"} <= got.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert math.isclose(got[key], value, rel_tol=1e-5), (key, got[key], value)
        else:
            assert got[key] == value, (key, got[key], value)
    assert got["model"] == folder.default_name()
