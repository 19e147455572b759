#!/usr/bin/env python3
"""The repository stands alone: run from anywhere inside a clone, `.ci/api.sh` runs it.

1. No tracked file refers to the workplace's shared directory (the design input and the
   data it once held) by a relative or absolute path. The one exception: a line of a
   script under `.ci/` that reads the offline advisory database snapshot (`advisory-db`),
   which falls back to a normal fetch where the snapshot is absent.
2. Every relative link in every tracked Markdown file resolves inside the repository: the
   file or directory exists, stays inside the clone, and a `#fragment` into a Markdown
   file names one of its headings (GitHub's anchors).

Exit status 1 with one line per problem, 0 when there is none.
"""
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

ROOT = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
# Spelt in pieces so that this file does not match itself.
FORBIDDEN = [".." + "/shared", "/work" + "/shared"]


def tracked():
    out = subprocess.check_output(["git", "ls-files", "-z"], cwd=ROOT)
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def shared_references(files):
    problems = []
    for rel in files:
        try:
            text = (ROOT / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not any(f in line for f in FORBIDDEN):
                continue
            if rel.startswith(".ci/") and "advisory-db" in line:
                continue
            problems.append(f"{rel}:{n}: refers outside the repository: {line.strip()}")
    return problems


def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces
    to hyphens."""
    h = re.sub(r"`([^`]*)`", r"\1", heading)
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h)
    h = h.strip().lower()
    out = []
    for ch in h:
        cat = unicodedata.category(ch)
        if ch in "-_" or ch == " " or cat[0] in "LN":
            out.append("-" if ch == " " else ch)
    return "".join(out)


def anchors(md_path, cache={}):
    if md_path not in cache:
        seen = {}
        result = set()
        in_code = False
        for line in md_path.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(1))
                n = seen.get(base, 0)
                seen[base] = n + 1
                result.add(base if n == 0 else f"{base}-{n}")
        for m in re.finditer(r'<a\s+(?:name|id)="([^"]+)"', md_path.read_text(encoding="utf-8")):
            result.add(m.group(1))
        cache[md_path] = result
    return cache[md_path]


LINK = re.compile(r"(?<!\!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|!\[[^\]]*\]\(\s*<?([^)\s>]+)>?")
REFDEF = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def strip_code(text):
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def broken_links(files):
    problems = []
    for rel in files:
        if not rel.endswith(".md"):
            continue
        src = ROOT / rel
        text = strip_code(src.read_text(encoding="utf-8"))
        targets = [m.group(1) or m.group(2) for m in LINK.finditer(text)]
        targets += REFDEF.findall(text)
        for t in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) or t.startswith("//"):
                continue  # http:, https:, mailto:: not relative
            path, _, frag = t.partition("#")
            dest = src if path == "" else (src.parent / path)
            resolved = Path(os.path.normpath(dest))
            if path.startswith("/") or not str(resolved).startswith(str(ROOT) + os.sep) and resolved != ROOT:
                problems.append(f"{rel}: link `{t}` leaves the repository")
                continue
            if not resolved.exists():
                problems.append(f"{rel}: link `{t}`: {resolved.relative_to(ROOT)} does not exist")
                continue
            if frag and resolved.suffix == ".md" and frag not in anchors(resolved):
                problems.append(f"{rel}: link `{t}`: no heading `#{frag}` in {resolved.relative_to(ROOT)}")
    return problems


def main():
    files = tracked()
    problems = shared_references(files) + broken_links(files)
    for p in problems:
        print(p)
    md = sum(1 for f in files if f.endswith(".md"))
    print(f"standalone: {len(files)} tracked files, {md} Markdown files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
