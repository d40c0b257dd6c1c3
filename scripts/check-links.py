#!/usr/bin/env python3
"""Checks the relative links of the project's Markdown: README.md, CONTRIBUTING.md, CHANGELOG.md,
results/README.md and the book (docs/src/**/*.md).

Every inline link or image, `[text](target)` or `![alt](target)`, and every reference
definition, `[id]: target`, outside code blocks and code spans, whose target is a relative path
must name a file or folder that exists, resolved against the folder of the file that holds the
link. With `#anchor` after a Markdown file (or alone, for the same file) the anchor must be a
heading of that file, as GitHub and mdBook name them. http(s), mailto and other URL schemes are
not checked.

    python3 scripts/check-links.py            # the files above, from the repository root
    python3 scripts/check-links.py FILE...    # these files only
    python3 scripts/check-links.py --no-anchors

Prints every broken link as `file:line: target (reason)` and exits 1 if there is one, else
prints how many links it checked and exits 0. Python 3 standard library only.
"""

import re
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
TOP_FILES = ["README.md", "CONTRIBUTING.md", "CHANGELOG.md", "results/README.md"]
BOOK_SRC = "docs/src"

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# `[text](target)` and `![alt](target)`; the text may hold one level of brackets.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def strip_code_spans(line):
    """The line with every code span replaced by spaces (same length, so columns stay)."""
    out, i = [], 0
    while i < len(line):
        if line[i] == "`":
            j = i
            while j < len(line) and line[j] == "`":
                j += 1
            ticks = line[i:j]
            end = line.find(ticks, j)
            if end == -1:
                out.append(line[i:j])
                i = j
                continue
            out.append(" " * (end + len(ticks) - i))
            i = end + len(ticks)
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def prose_lines(text):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            continue
        yield number, line


def slug(heading):
    """The anchor GitHub and mdBook give a heading: lower case, markup and punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "").replace("*", "").strip().lower()
    out = []
    for ch in text:
        if ch in "-_" or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            out.append(ch)
        elif ch.isspace():
            out.append("-")
    return "".join(out)


_anchor_cache = {}


def anchors(path):
    """The heading anchors of a Markdown file (duplicates get -1, -2, ... as on GitHub)."""
    if path not in _anchor_cache:
        seen, found = {}, set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            m = HEADING.match(line)
            if not m:
                continue
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        _anchor_cache[path] = found
    return _anchor_cache[path]


def targets(path):
    """(line number, target) of every link in a Markdown file."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = strip_code_spans(line)
        for m in INLINE.finditer(line):
            yield number, m.group(1)
        m = REFERENCE.match(line)
        if m:
            yield number, m.group(1)


def check(path, check_anchors):
    """Broken links of one file as (line, target, reason), and how many links were checked."""
    broken, count = [], 0
    for number, target in targets(path):
        target = target.strip()
        if target.startswith("<") and target.endswith(">"):
            target = target[1:-1]
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        count += 1
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not resolved.exists():
            broken.append((number, target, "no such file or folder"))
            continue
        if (
            check_anchors
            and anchor
            and resolved.is_file()
            and resolved.suffix.lower() == ".md"
            and unquote(anchor).lower() not in anchors(resolved)
        ):
            broken.append((number, target, f"no heading #{anchor} in {display(resolved)}"))
    return broken, count


def display(path):
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def default_files():
    files = [ROOT / name for name in TOP_FILES]
    files += sorted((ROOT / BOOK_SRC).rglob("*.md"))
    return files


def main(argv):
    check_anchors = "--no-anchors" not in argv
    args = [a for a in argv if a != "--no-anchors"]
    if any(a.startswith("-") for a in args):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    files = [Path(a).resolve() for a in args] if args else default_files()
    missing = [f for f in files if not f.is_file()]
    for f in missing:
        print(f"{display(f)}: the file to check does not exist", file=sys.stderr)
    total, failures = 0, 0
    for f in files:
        if not f.is_file():
            continue
        broken, count = check(f, check_anchors)
        total += count
        for number, target, reason in broken:
            print(f"{display(f)}:{number}: {target} ({reason})")
        failures += len(broken)
    if failures or missing:
        print(
            f"{failures} broken link(s) of {total} relative links in {len(files)} files",
            file=sys.stderr,
        )
        return 1
    print(f"{total} relative links in {len(files)} files: all resolve")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
