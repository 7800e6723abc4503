"""Generate ``kitium_pg/_sync/`` from ``kitium_pg/_async/`` (the httpcore / psycopg approach).

The async modules are the only hand-written I/O code. This script rewrites each one into its
sync twin by a fixed list of token substitutions, formats it with ruff, and writes it with a
"generated" header. ``python tools/unasync.py --check`` exits 1 (listing the stale files) when a
generated file differs from what the script would write; CI runs it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "kitium_pg" / "_async"
TARGET = ROOT / "kitium_pg" / "_sync"

# Order matters: specific names before the generic Async-prefix rule.
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\basynccontextmanager\b", "contextmanager"),
    (r"^import asyncio\n", ""),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"\btask_caller\b", "thread_caller"),
    (r"\bAwaitable\[(\w+)\]", r"\1"),
    (r"\bAsync([A-Z]\w*)", r"\1"),
    (r"\b_async\b", "_sync"),
    (r"\bthe async adapter\b", "the sync adapter"),
    (
        r"\(async\s+source;\s+the\s+sync\s+copy\s+is\s+generated\)",
        "(generated from the async source)",
    ),
    (
        r"\bthe async public adapter \(source of the generated sync one\)",
        "the sync public adapter (generated from the async one)",
    ),
    (r"^(\s*)\"\"\"Async storage for auth data", r'\1"""Storage for auth data'),
    (
        r"^\"\"\"Async I/O code: the single hand-written source of both adapters",
        '"""Sync I/O code, generated from ``kitium_pg/_async``',
    ),
]

HEADER = (
    "# WARNING: generated from kitium_pg/_async/{name} by tools/unasync.py; do not edit.\n"
    "# Change the async source and run `python tools/unasync.py`.\n"
)


def convert(source: str) -> str:
    """The sync version of one async module's text."""
    for pattern, replacement in SUBSTITUTIONS:
        source = re.sub(pattern, replacement, source, flags=re.MULTILINE)
    return source


def ruff_format(text: str, filename: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(filename), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return result.stdout


def expected() -> dict[Path, str]:
    """Every generated file and the text it should have."""
    files = {}
    for path in sorted(SOURCE.glob("*.py")):
        target = TARGET / path.name
        text = HEADER.format(name=path.name) + convert(path.read_text())
        files[target] = ruff_format(text, target)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if _sync/ is stale")
    args = parser.parse_args(argv)
    files = expected()
    extra = {p for p in TARGET.glob("*.py")} - set(files)
    if args.check:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        stale += sorted(extra)
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}")
        if stale:
            print("run: python tools/unasync.py")
            return 1
        print(f"unasync: {len(files)} generated files are current")
        return 0
    TARGET.mkdir(exist_ok=True)
    for path in extra:
        path.unlink()
    for path, text in files.items():
        path.write_text(text)
    print(f"unasync: wrote {len(files)} files to {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
