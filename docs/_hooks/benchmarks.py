"""mkdocs hook: put benchmarks/results/latest.md into the page that holds the marker.

The results live outside docs/ (the benchmark suite writes them next to its code), so the page
includes the file at build time instead of copying numbers into the docs. Headings are demoted
one level and relative links become plain text (their targets are not part of the site).
Without the file, the page says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = "<!-- include: benchmarks/results/latest.md -->"
RESULTS = Path("benchmarks") / "results" / "latest.md"
_RELATIVE_LINK = re.compile(r"\[([^\]]*)\]\((?!https?://|mailto:|#)([^)\s]+)\)")


def _adapt(text: str) -> str:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "#" + line
        elif not fenced:
            line = _RELATIVE_LINK.sub(lambda m: f"{m.group(1)} (`{m.group(2)}`)", line)
        lines.append(line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    root = Path(config["config_file_path"]).resolve().parent
    path = root / RESULTS
    if path.is_file():
        body = _adapt(path.read_text(encoding="utf-8"))
    else:
        body = (
            '!!! note "No results yet"\n'
            f"    `{RESULTS.as_posix()}` is not in this checkout yet: the benchmark suite"
            " writes it. This page shows it once it is committed."
        )
    return markdown.replace(MARKER, body)
