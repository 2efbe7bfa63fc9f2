"""Every Python code block in README.md runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path):
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks(ROOT / "README.md"))))
def test_readme_python_block_runs(index):
    code = python_blocks(ROOT / "README.md")[index]
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_layer_demo_example_runs():
    code = (ROOT / "examples" / "layer_demo.py").read_text()
    exec(compile(code, "examples/layer_demo.py", "exec"), {"__name__": "__main__"})
