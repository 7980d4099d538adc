"""The README against the repository: its install block is the one CI runs, its links resolve.

``.ci/run`` installs through ``scripts/install.sh``; the README's install
section must say exactly the same pip lines, so that a step missing from the
README fails here and not on a new user's machine.
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SCRIPT = os.path.join(ROOT, "scripts", "install.sh")
SCRIPT_PREAMBLE = ["set -euo pipefail", 'cd "$(dirname "$0")/.."']
MAX_README_LINES = 250


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def readme_install_block():
    """The lines of the first fenced block of the README's ``## Install`` section."""
    section = re.search(r"^## Install\n(.*?)(?=^## )", _read(README), re.S | re.M)
    assert section, "README.md has no '## Install' section"
    block = re.search(r"^```(?:bash|sh)?\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the README's Install section has no fenced block"
    return [line.rstrip() for line in block.group(1).splitlines() if line.strip()]


def script_commands():
    """The lines of scripts/install.sh that are not comments, blank, or the shebang."""
    lines = [line.rstrip() for line in _read(SCRIPT).splitlines()]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_install_block_is_the_install_script():
    block = readme_install_block()
    assert block and all(line.startswith("pip install ") for line in block), block
    assert script_commands() == SCRIPT_PREAMBLE + block, (
        "README.md's install block and scripts/install.sh differ: change both (CI installs through the script)")
    assert os.access(SCRIPT, os.X_OK), "scripts/install.sh must be executable"


def test_readme_install_covers_the_main_job_and_the_tests():
    block = " ".join(readme_install_block())
    for needed in ("torch", "setuptools", "wheel", "ninja", "--no-build-isolation", ".[train,test]"):
        assert needed in block, needed


def test_readme_stays_short():
    lines = _read(README).count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; the measured narrative belongs in docs/"


def _slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation and symbols dropped, spaces to '-'."""
    text = re.sub(r"`", "", heading.strip().lower())
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(text):
    out, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def _markdown_files():
    docs = os.path.join(ROOT, "docs")
    names = sorted(n for n in os.listdir(docs) if n.endswith(".md")) if os.path.isdir(docs) else []
    return [README] + [os.path.join(docs, n) for n in names]


def test_relative_links_resolve():
    bad = []
    for path in _markdown_files():
        text = _read(path)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(dest):
                bad.append(f"{os.path.relpath(path, ROOT)}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(_read(dest)):
                bad.append(f"{os.path.relpath(path, ROOT)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)
