"""Every code block of README.md and docs/guide.md runs as written, in a scratch directory (with
the repository's bench/ beside it): Python blocks as a script (a guide block together with the
blocks before it, as one session), shell blocks with `bash -e`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


PY_CASES = [(p, i) for p in DOCS for i in range(len(blocks(p, "python")))]
SH_CASES = [(p, i) for p in DOCS for i in range(len(blocks(p, "bash")))]


def case_id(case):
    return f"{case[0].name}[{case[1]}]"


def test_docs_have_examples():
    assert len(PY_CASES) >= 6 and len(SH_CASES) >= 4


def run(cmd, cwd, what):
    (cwd / "bench").symlink_to(ROOT / "bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("case", PY_CASES, ids=case_id)
def test_python_block_runs(case, tmp_path):
    path, index = case
    code = blocks(path, "python")[index]
    if path.name == "guide.md":
        code = "\n".join(blocks(path, "python")[:index + 1])
    script = tmp_path / "example.py"  # a file, so spawned workers can import its functions
    script.write_text(code)
    run([sys.executable, str(script)], tmp_path, f"{path.name} python block {index}")


@pytest.mark.parametrize("case", SH_CASES, ids=case_id)
def test_shell_block_runs(case, tmp_path):
    path, index = case
    script = blocks(path, "bash")[index]
    if re.search(r"^\s*(pip install|python -m pytest)", script, flags=re.M):
        pytest.skip("install / test-suite block: CI runs these itself")
    run(["bash", "-e", "-c", script], tmp_path, f"{path.name} bash block {index}")


def test_layer_demo_example_runs():
    code = (ROOT / "examples" / "layer_demo.py").read_text()
    exec(compile(code, "examples/layer_demo.py", "exec"), {"__name__": "__main__"})
