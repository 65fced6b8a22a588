"""The README and the docs/ pages: what restates the code is checked against it, so it cannot drift (the
extras table against pyproject.toml, the backends `load` names against the backend registry, the Python
versions against requires-python and the classifiers, the Triton commands against the packages the
generated Python models import), and every relative link resolves, to a file and, with `#`, to a heading."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from clipdeploy.runtime.backends import registry as backends
from clipdeploy.triton.readme import PYTHON_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
# The pages a reader reaches from the README: itself and everything under docs/ (generated reports included).
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
README_MAX_LINES = 260  # the front door: what it is, install, quick start, the three uses, support, headline figures
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_norm(re.match(r"\s*([A-Za-z0-9_.-]+)", r)[1]) for r in reqs}


def _section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _extras_table() -> dict[str, set[str]]:
    rows = {}
    for line in _section("## Installing").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("extra", "---"):
            continue
        extra = "" if cells[0] == "*(base)*" else cells[0].strip("`")
        # "a, b (note, note), c 13": one package per comma outside parentheses, its name the first word.
        items = re.split(r",\s*(?![^()]*\))", cells[1])
        rows[extra] = {_norm(re.match(r"`?([A-Za-z0-9_.-]+)", item.strip())[1]) for item in items}
    return rows


def test_extras_table_matches_pyproject():
    table = _extras_table()
    declared = {"": _requirement_names(PROJECT["dependencies"])}
    declared |= {extra: _requirement_names(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}
    assert set(table) == set(declared), f"README extras {sorted(table)} vs pyproject.toml {sorted(declared)}"
    for extra, names in declared.items():
        assert table[extra] == names, f"extra {extra or '(base)'}: README lists {sorted(table[extra])}, " \
            f"pyproject.toml declares {sorted(names)}"


def test_load_signature_names_every_backend():
    runtime = (DOCS / "runtime.md").read_text(encoding="utf-8")
    m = re.search(r'`load\(path, backend=((?:"[^"]+"(?: \| )?)+),', runtime)
    assert m, "docs/runtime.md: no load(path, backend=...) signature"
    assert re.findall(r'"([^"]+)"', m[1]) == list(backends.choices()), m[0]


def test_python_versions_are_the_declared_ones():
    floor = re.fullmatch(r">=(\d+\.\d+)", PROJECT["requires-python"])[1]
    listed = sorted((c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if re.search(r"Python :: \d+\.\d+$", c)),
                    key=lambda v: tuple(map(int, v.split("."))))
    assert listed[0] == floor, (listed, floor)  # the oldest classifier is the floor CI installs on
    quick = _section("## Quick start")
    assert f"Python {', '.join(listed[:-1])} or {listed[-1]}" in quick
    assert f"CI installs on {floor} and {listed[-1]}" in quick
    for page in PAGES:
        assert "3.10+" not in page.read_text(encoding="utf-8"), page.relative_to(ROOT)


def test_triton_commands_build_the_image_the_python_models_need():
    triton = (DOCS / "triton.md").read_text(encoding="utf-8")
    section = triton[triton.index("\n## Start it\n") :]
    block = section[section.index("```bash") : section.index("```\n", section.index("```bash") + 7)]
    block = block.replace("\\\n", " ")  # a command continued with a backslash is one line
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\S+-py3$", block, re.M), block
    (pip,) = [line for line in block.splitlines() if line.startswith("RUN pip install")]
    assert set(PYTHON_PACKAGES) <= set(pip.split()), pip
    (run,) = [line for line in block.splitlines() if line.startswith("docker run")]
    tag = re.search(r"docker build -t (\S+)", block)[1]
    assert f" {tag} tritonserver" in run and "nvcr.io" not in run, run  # the built image, not the stock one


def test_wheel_install_line_names_this_version():
    names = set(re.findall(r"dist/clipdeploy-([0-9][^-]*)-py3-none-any\.whl", README))
    assert names == {PROJECT["version"]}, names


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (not `-` or `_`), spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading, a `](` in code no link)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def _anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets `-1`, `-2`, ... as on GitHub."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(text), re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(text: str) -> list[str]:
    """Relative link targets (`path`, `path#anchor`, `#anchor`); URLs with a scheme are not checked here."""
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)) if not re.match(r"[a-z]+:", target)]


def _broken_links(pages: list[Path], root: Path) -> list[str]:
    broken = []
    for page in pages:
        for target in _links(page.read_text(encoding="utf-8")):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}: {target}"
            if not dest.is_file():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return broken


def test_relative_links_resolve():
    broken = _broken_links(PAGES, ROOT)
    assert not broken, "\n".join(broken)


def test_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## In CI: `clipdeploy run`\n\n## A page\n")
    (tmp_path / "README.md").write_text(
        "# Top\n[ok](docs/a.md#in-ci-clipdeploy-run) [ok](docs/a.md#a-page-1) [ok](#top) [web](https://x.org/nope)\n"
        "[gone](docs/b.md) [no anchor](docs/a.md#in-ci) [here](#nowhere)\n```bash\n# [code](not/a/link.md)\n```\n"
    )
    pages = [tmp_path / "README.md", tmp_path / "docs" / "a.md"]
    assert _broken_links(pages, tmp_path) == [
        "README.md: docs/b.md: no such file",
        "README.md: docs/a.md#in-ci: no heading #in-ci in docs/a.md",
        "README.md: #nowhere: no heading #nowhere in README.md",
    ]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(README)}
    unlinked = [str(page.relative_to(ROOT)) for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link (add them to its Documentation table): {unlinked}"


def test_readme_is_a_front_door():
    lines = README.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail to docs/"
