"""The README's Python snippets run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code):
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)


def test_readme_has_a_snippet():
    assert SNIPPETS
