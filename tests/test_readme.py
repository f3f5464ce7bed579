"""The README's Python snippet runs as written (in a fresh process, in a scratch folder)."""

import re
from pathlib import Path

import pytest
from helpers import run_python

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    assert (
        'pip install -e ".[all,test]" -c constraints.txt && python cli.py fit --config configs/quickstart.yaml' in text
    )
    assert "OMP_NUM_THREADS=1 python -m pytest" in text
    assert (README.parent / "configs" / "quickstart.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_snippet_runs(tmp_path, index):
    script = tmp_path / "snippet.py"
    script.write_text(python_blocks()[index])
    result = run_python(script, cwd=tmp_path, timeout=600)
    assert "Conv2d(3, 16" in result.stdout
