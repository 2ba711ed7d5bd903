"""README.md is a newcomer's page with docs/ behind it: short, its links (and the headings they name) resolve, its commands are CI's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


def test_every_relative_link_in_readme_and_docs_resolves():
    checked, broken = 0, []
    for page in _pages():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            checked += 1
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page  # "#x": a heading of the same page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked >= 10, "the pages should link their docs"  # precondition: links were found at all
    assert not broken, broken


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated slug numbered -1, -2, ...; lines inside code fences are not headings."""
    anchors: set[str] = set()
    repeats: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.+)", line)
        if heading and not fenced:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            n = repeats[slug] = repeats.get(slug, -1) + 1
            anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


def test_anchor_slugs_follow_github(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# The demo (`make demo`)\n## Backends: ddp, ZeRO-2/3\n```\n# not a heading\n```\n"
                    "## Notes\n## Notes\n", encoding="utf-8")
    assert _anchors(page) == {"the-demo-make-demo", "backends-ddp-zero-23", "notes", "notes-1"}


def test_the_readme_links_into_docs_by_anchor():
    # precondition of the anchor check above: at least one link it would check
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert any("#" in t and t.startswith("docs/") for t in LINK.findall(readme))


def test_every_docs_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.split("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), sorted(pages - linked)


def test_the_readmes_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^make test\b", readme, re.M) and re.search(r"^make demo\b", readme, re.M)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M)
