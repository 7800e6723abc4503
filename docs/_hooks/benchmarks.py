"""mkdocs hook: put a benchmarks/results/*.md file into the page where its marker stands
(``<!-- include: benchmarks/results/latest.md -->``).

The results live outside docs/ (the benchmark suite writes them next to its code), so the page
includes the file at build time instead of copying numbers into the docs. Headings are demoted
one level and relative links and images become plain text naming the file (their targets are
not part of the site).
Without the file, the page says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = re.compile(r"<!-- include: (benchmarks/results/[\w.-]+\.md) -->")
_RELATIVE_LINK = re.compile(r"\[([^\]]*)\]\((?!https?://|mailto:|#)([^)\s]+)\)")
_RELATIVE_IMAGE = re.compile(r"!\[([^\]]*)\]\((?!https?://)([^)\s]+)\)")


def _adapt(text: str) -> str:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "#" + line
        elif not fenced:
            line = _RELATIVE_IMAGE.sub(
                lambda m: (
                    f"*{m.group(1)}: the image `benchmarks/results/{m.group(2)}` in the repository*"
                ),
                line,
            )
            line = _RELATIVE_LINK.sub(lambda m: f"{m.group(1)} (`{m.group(2)}`)", line)
        lines.append(line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    root = Path(config["config_file_path"]).resolve().parent

    def include(match: re.Match[str]) -> str:
        path = root / match.group(1)
        if path.is_file():
            return _adapt(path.read_text(encoding="utf-8"))
        return (
            '!!! note "No results yet"\n'
            f"    `{match.group(1)}` is not in this checkout yet: the benchmark suite"
            " writes it. This page shows it once it is committed."
        )

    return MARKER.sub(include, markdown)
