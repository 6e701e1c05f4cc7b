"""The README's example runs as written, and its mixer table matches the registry."""
import re
from pathlib import Path

from rnnlab.models.registry import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _between(text: str, tag: str) -> str:
    m = re.search(rf"<!-- {tag}:begin -->\n(.*?)<!-- {tag}:end -->", text, re.S)
    assert m, f"README has no {tag} markers"
    return m.group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", _between(README.read_text(), "example"), re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README example", "exec"), {})
    assert capsys.readouterr().out.strip(), "the example prints a sample"


def test_readme_mixer_table_is_current():
    table = _between(README.read_text(), "mixers").strip()
    assert table == markdown_table().strip(), "README mixer table is stale: run `make readme`"
