"""The README's examples run, so they never rot."""

from __future__ import annotations

import re
from pathlib import Path

from support import REPO


def _python_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_embedding_example_runs_and_prints_the_history(capsys):
    (block,) = _python_blocks("Embedding ChatSession in your ZODB app")
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "['helpdesk: Have you tried turning it off?', 'alice: It is off. Still burning.']",
        "[]",
        "['It is off. Still burning.']",
    ]


def test_embedding_example_runs_beside_a_folder_named_chatzeo(tmp_path):
    # A clone of the repository in the working directory once shadowed the install.
    import subprocess
    import sys

    (block,) = _python_blocks("Embedding ChatSession in your ZODB app")
    (tmp_path / "chatzeo").mkdir()
    (tmp_path / "example.py").write_text(block)
    # `python -P`, as the README says, works whatever the kind of install ...
    done = subprocess.run([sys.executable, "-P", "example.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "['It is off. Still burning.']"
    # A plain run works with the install scripts/test and scripts/chat make (a path
    # entry for the repository); with only the editable install's import hook it
    # fails exactly as the README says.
    import sysconfig

    packages = Path(sysconfig.get_paths()["purelib"])
    hooked = any(packages.glob("__editable___chatzeo*_finder.py")) and not (
        packages / "chatzeo-repo.pth"
    ).exists()
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    if hooked:
        assert done.returncode == 1
        assert "cannot import name 'ChatSession' from 'chatzeo' (unknown location)" in done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_documents_point_only_at_files_that_exist_and_hold_no_draft_notes():
    sources = [REPO / "README.md", REPO / "zeo.conf", REPO / "chatzeo" / "zeo.conf",
               *sorted((REPO / "docs").glob("*.md"))]
    for source in sources:
        text = source.read_text()
        paths = re.findall(r"\b((?:docs|chatzeo|tests|bench)/[\w/-]*\.(?:md|py|conf|png))", text)
        for target in paths:
            assert (REPO / target).exists(), f"{source.name} points at missing {target}"
        assert "To be merged" not in text and "tested on branch" not in text, source.name
