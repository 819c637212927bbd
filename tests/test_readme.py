"""The README's examples run, so they never rot."""

from __future__ import annotations

import re

from conftest import REPO


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
