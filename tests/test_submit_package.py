"""What `ms-ray submit` uploads, built by Ray's own packaging code: the job's working directory must
be a complete ms_ray (a cluster without the project installed imports it from there), without
outputs, environments, history or weights."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ms_ray.submit import EXCLUDES, SubmitError, check_package, include_gitignore, package_files

ROOT = Path(__file__).resolve().parents[1]


def ray_zip(root: Path, out: Path) -> set[str]:
    """The package JobSubmissionClient would upload for runtime_env {working_dir: root, excludes:
    EXCLUDES}: Ray's working_dir upload path (its default excludes added) down to create_package,
    minus only the HTTP PUT. Returns the files in it."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    def upload(working_dir, excludes, is_file=False):
        assert not is_file
        create_package(working_dir, out, include_gitignore=include_gitignore(), excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(root), "excludes": EXCLUDES},
                                 include_gitignore=include_gitignore(), upload_fn=upload)
    return {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}


def test_excludes_are_anchored_at_the_root_and_package_files_lists_the_zip(tmp_path):
    root = tmp_path / "wd"
    keep = ["ms_ray/__init__.py", "ms_ray/data/__init__.py", "ms_ray/data/skills.py", "tests/data/test_x.py",
            "jobs/tiny.yaml", "jobs/runs/a.yaml", "ms_ray/wandb/x.py", "docs/checkpoints.md"]
    drop = ["data/shard.jsonl", "runs/tiny/metrics.jsonl", "wandb/run/x", "checkpoints/c/x", ".venv/bin/python",
            ".git/HEAD", "ms_ray/__pycache__/m.cpython-311.pyc", "model.safetensors", "ms_ray/data/w.safetensors",
            "data/sub/ms_ray.py", ".cache/torch_extensions/x", "export/model.pt", "shards/a.parquet"]
    for rel in keep + drop:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    zipped = ray_zip(root, tmp_path / "pkg.zip")
    assert zipped == set(keep)
    assert {rel for _, rel in package_files(root)} == zipped  # our size check sees exactly what Ray zips

    (root / ".gitignore").write_text("/jobs/runs/\n")  # Ray honours .gitignore, and so does the size check
    assert {rel for _, rel in package_files(root)} == ray_zip(root, tmp_path / "pkg2.zip") == \
        set(keep) - {"jobs/runs/a.yaml"} | {".gitignore"}
    assert check_package(root, 2**20) > 0
    (root / ".rayignore").write_text("data\n")  # the old unanchored pattern: submit refuses, naming the files
    with pytest.raises(SubmitError, match=r"leave out 2 ms_ray source file\(s\), e.g. ms_ray/data/__init__.py"):
        check_package(root, 2**20)


IMPORT_ALL = r"""
import importlib, os, pkgutil, sys
here = os.getcwd()
# the project is NOT installed on the cluster: drop the editable install's finder and any path to
# the checkout, so only the unzipped working directory (where `python -m ms_ray.cli` runs) is left
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
sys.path = [here] + [p for p in sys.path if p and os.path.abspath(p) != sys.argv[1] and "__editable__" not in p]
sys.path_importer_cache.clear()
import ms_ray
assert ms_ray.__file__.startswith(here + os.sep), ms_ray.__file__
names, failed = [], []
for m in pkgutil.walk_packages(ms_ray.__path__, "ms_ray."):
    try:
        mod = importlib.import_module(m.name)
        assert mod.__file__.startswith(here + os.sep), (m.name, mod.__file__)
        names.append(m.name)
    except BaseException as e:
        failed.append(f"{m.name}: {type(e).__name__}: {e}")
print("IMPORTED", len(names), " ".join(sorted(names)))
print(f"FAILED {len(failed)}", *failed, sep="\n")
"""


@pytest.mark.slow
def test_the_repo_package_imports_every_ms_ray_module_without_the_project_installed(tmp_path):
    zipped = ray_zip(ROOT, tmp_path / "pkg.zip")
    assert zipped == {rel for _, rel in package_files(ROOT)}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ms_ray").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= zipped, sorted(sources - zipped)  # ms_ray/data/*.py included
    assert {"ms_ray/data/__init__.py", "ms_ray/data/pipeline.py", "jobs/tiny.yaml"} <= zipped
    top = {rel.split("/")[0] for rel in zipped}
    assert not top & {".git", ".venv", "runs", "wandb", "checkpoints", "data", ".cache"}, top
    assert not [rel for rel in zipped if rel.endswith((".safetensors", ".pt", ".parquet", ".pyc"))]

    wd = tmp_path / "wd"
    zipfile.ZipFile(tmp_path / "pkg.zip").extractall(wd)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    run = subprocess.run([sys.executable, "-I", "-c", IMPORT_ALL, str(ROOT)], cwd=wd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FAILED 0\n" in run.stdout, run.stdout[-3000:]
    imported = run.stdout.split("IMPORTED ", 1)[1].split("\n", 1)[0].split()
    assert int(imported[0]) > 20 and "ms_ray.data.pipeline" in imported and "ms_ray.cli" in imported
