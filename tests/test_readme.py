"""The README's Python snippets run as pasted (in a fresh folder, one after the other)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index + 1}", "exec"), namespace)
    if "logits" in namespace and "labels" not in namespace:
        assert tuple(namespace["logits"].shape) == (2, 10)
    if "labels" in namespace:
        assert namespace["logits"].shape == (100, 16) and 0.0 <= namespace["result"]["test_accuracy"] <= 1.0
