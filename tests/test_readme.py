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


def test_readme_commands_parse():
    """Every `rnnlab ...` line in the README's shell blocks is a valid command line: the command,
    its flags and their values parse (the commands themselves are run by other tests)."""
    import importlib
    import shlex

    from rnnlab.cli import build_parser
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("rnnlab ") or line.startswith("torchrun "):
                lines.append(line[line.index("rnnlab "):] if line.startswith("torchrun ") else line)
    assert len(lines) >= 15
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv == ["--version"] or "--help" in argv:
            continue
        a, rest = build_parser().parse_known_args(argv)
        if a.cmd == "bench":
            importlib.import_module(f"rnnlab.bench.{a.what}").build_parser().parse_args(rest)
        else:
            assert not rest, f"{line}: unknown {rest}"
