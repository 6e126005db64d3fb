"""The README stays a front door that reads in ten minutes, and it and docs/ keep pointing at files that exist."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 250


def prose(page: Path) -> str:
    """The page's text without its fenced code blocks (where `](` or `#` mean something else)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in prose(page).splitlines() if re.match(r"#+ ", line)}


def local_links(page: Path) -> list[str]:
    """The targets of the page's Markdown links and pictures, web addresses left out."""
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", prose(page))
            if not re.match(r"[a-z]+:", target)]


def code_map() -> list[str]:
    """The first column of the README's code-map table."""
    section = README.read_text().split("## Code map", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def test_the_readme_reads_in_ten_minutes():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details into docs/"


def test_the_readme_names_the_full_and_the_fast_test_commands():
    text = README.read_text()
    assert "python -m pytest -q" in text
    assert 'python -m pytest -m "not slow"' in text


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_link_points_at_a_file_and_heading_that_exist(page: Path):
    links = local_links(page)
    assert links or page != README, "README.md links into docs/"
    for link in links:
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} points at a missing file"
        if fragment:
            assert fragment in anchors(target), f"{page.name}: {link} points at a missing heading"


def test_the_readme_links_every_docs_page():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in local_links(README)}
    assert set(PAGES[1:]) <= linked, "a docs/ page the README does not link to"


def test_every_file_in_the_code_map_exists():
    paths = code_map()
    assert len(paths) >= 20, "the code-map table was not found in README.md"
    missing = [path for path in paths if not (REPO / path).exists()]
    assert not missing, f"the README's code map names files that do not exist: {missing}"


def test_every_module_and_tool_is_in_the_code_map():
    """A new module gets its line in the code map (package __init__ files aside)."""
    files = [*REPO.glob("*.py"), *REPO.glob("models/*.py"), *REPO.glob("data/*.py"), *REPO.glob("tools/*.py"),
             *REPO.glob("tools/*.sh")]
    listed = set(code_map())
    unlisted = sorted(str(path.relative_to(REPO)) for path in files
                      if path.name != "__init__.py" and str(path.relative_to(REPO)) not in listed)
    assert not unlisted, f"files missing from the README's code map: {unlisted}"
