"""The shape of the code, as the contributing rules put it: short functions, modules that read in
a sitting, and a tree the linter (ruff, configured in pyproject.toml) finds clean."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 59  # "the longest function in ms_ray/ is under 60 lines"
MAX_MODULE_LINES = 500


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_every_function_is_short():
    long = [f"{p.relative_to(ROOT)}:{line} {name}: {n} lines" for p in sorted((ROOT / "ms_ray").rglob("*.py"))
            for name, line, n in functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_every_module_reads_in_a_sitting():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / "ms_ray").rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by idea):\n" + "\n".join(big)


def test_the_tree_is_lint_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: it is in the `test` extra (make install)"
    done = subprocess.run([ruff, "check", "--no-cache", "ms_ray", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
