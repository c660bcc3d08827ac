"""Bad input, fed to the real command line as a user would: every case must end with exit code
2 and one line naming the file, field, override, stream or address (and the fix), with no
traceback, before any expensive work, and must touch nothing in the folder it runs in.

Each case runs `python -m ms_ray.cli ...` in its own process, in a scratch copy of jobs/ and
serve/, and the scratch folder is compared file by file before and after.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEAD = "127.0.0.1:1"  # nothing listens on port 1
TINY = ["data.prepare=null", "data.path=DATA"]  # a prepared data set of 40 examples (fixture)

CASES = [  # (id, argv, text the one line must hold)
    # config files
    ("yaml-syntax", ["train", "BROKEN.yaml"], "BROKEN.yaml:3:1: not valid YAML"),
    ("binary-config", ["train", "BINARY.yaml"], "not a text (UTF-8) file"),
    ("config-is-a-folder", ["train", "jobs"], "jobs is a folder"),
    ("missing-config", ["train", "nope.yaml"], "nope.yaml does not exist"),
    ("config-not-a-mapping", ["demo", "LIST.yaml"], "top level must be a mapping"),
    # overrides
    ("override-bad-yaml", ["train", "jobs/tiny.yaml", "optim.max_steps=[1"], "override 'optim.max_steps=[1'"),
    ("override-no-value", ["train", "jobs/tiny.yaml", "optim.max_steps"],
     "override 'optim.max_steps': expected dotted.key=value"),
    ("unknown-option", ["train", "jobs/tiny.yaml", "--adress", DEAD], "unrecognized arguments: --adress"),
    ("override-unknown-key", ["train", "jobs/tiny.yaml", "optim.lrr=0.1"], "optim.lrr: Extra inputs"),
    ("override-wrong-type", ["train", "jobs/tiny.yaml", "optim.max_steps=many"], "optim.max_steps"),
    ("heads-do-not-divide", ["train", "jobs/tiny.yaml", "model.hidden_size=130"], "multiple of num_heads"),
    ("absurd-lr", ["train", "jobs/tiny.yaml", "optim.lr=1e10"], "optim.lr"),
    ("nan-lr", ["train", "jobs/tiny.yaml", "optim.lr=.nan"], "optim.lr: Input should be a finite number"),
    ("warmup-longer-than-run", ["train", "jobs/tiny.yaml", "optim.max_steps=50"], "warmup_steps (100) must be shorter"),
    ("beta-out-of-range", ["train", "jobs/tiny.yaml", "optim.betas=[0.9,1.0]"], "each beta must be in [0, 1)"),
    ("run-name-escapes-storage", ["train", "jobs/tiny.yaml", "run.name=../../x"],
     "run.name: '../../x' must be a plain"),
    ("too-many-local-workers", ["train", "jobs/tiny.yaml", "scaling.num_workers=64"],
     "scaling.num_workers: 64 workers"),
    ("fewer-packs-than-batch", ["train", "jobs/tiny.yaml", *TINY, "data.batch_size=64"],
     "fewer than scaling.num_workers"),
    ("no-manifest", ["train", "jobs/tiny.yaml", "data.prepare=null", "data.path=jobs"], "has no manifest.json"),
    # data files
    ("jsonl-path-is-a-folder", ["prepare", "jobs/data-chat.yaml", "sources=[{kind: jsonl, path: jobs}]"],
     "are not files"),
    ("jsonl-missing", ["prepare", "jobs/data-chat.yaml", "sources=[{kind: jsonl, path: no.jsonl}]"], "no.jsonl"),
    ("jsonl-empty", ["prepare", "jobs/data-skills.yaml", "sources=[{kind: jsonl, path: EMPTY.jsonl}]", "output=out"],
     "EMPTY.jsonl"),
    ("unknown-policy", ["prepare", "jobs/data-skills.yaml", "sources=[{kind: skills, policy: wait_k(1)}]"],
     "k must be >= 2"),
    # checkpoints
    ("serve-missing-checkpoint", ["serve", "checkpoint=no/such/export"], "no/such/export does not exist"),
    ("serve-empty-checkpoint", ["serve", "checkpoint=EMPTYDIR"], "is not a multi-stream export"),
    ("serve-corrupt-checkpoint", ["serve", "checkpoint=CORRUPT"], "is corrupt"),
    ("eval-corrupt-checkpoint", ["eval", "checkpoint=CORRUPT"], "is corrupt"),
    ("eval-incomplete-checkpoint", ["eval", "checkpoint=INCOMPLETE"],
     "is incomplete: stream_embeddings.safetensors is missing"),
    ("export-missing-checkpoint", ["export", "jobs/tiny.yaml", *TINY, "checkpoint=no/such/checkpoint_1"],
     "no/such/checkpoint_1 does not exist"),
    # the previous release's forms: refused, showing the form the command takes now
    ("serve-checkpoint-where-config-goes", ["serve", "GOOD"], "ms-ray serve checkpoint=GOOD"),
    ("eval-config-option", ["eval", "GOOD", "--config", "jobs/eval.yaml"],
     "ms-ray eval jobs/eval.yaml checkpoint=GOOD"),
    ("train-address-option", ["train", "jobs/tiny.yaml", "--address", DEAD],
     f"ms-ray train jobs/tiny.yaml address={DEAD}"),
    ("tokenizer-action-word", ["tokenizer", "train", "jobs/tokenizer.yaml"], "ms-ray tokenizer jobs/tokenizer.yaml"),
    # addresses
    ("train-dead-address", ["train", "jobs/tiny.yaml", f"address={DEAD}"], f"no Ray cluster answers at {DEAD}"),
    ("prepare-dead-address", ["prepare", "jobs/data-skills.yaml", f"address={DEAD}"],
     f"no Ray cluster answers at {DEAD}"),
    ("preflight-dead-address", ["preflight", "jobs/tiny.yaml", "--address", DEAD], f"no Ray cluster answers at {DEAD}"),
    ("submit-dead-dashboard", ["submit", "jobs/tiny.yaml", "--address", f"http://{DEAD}"], f"http://{DEAD}"),
]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, ray_local):
    """A working folder: the shipped configs, broken files, checkpoints and a tiny data set."""
    from ms_ray.config import PrepareConfig, load_config
    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM
    from ms_ray.data.pipeline import prepare
    from ms_ray.data.skills import SKILL_STREAMS
    from ms_ray.data.tokenizer import skill_tokenizer

    work = tmp_path_factory.mktemp("bad_input")
    for folder in ("jobs", "serve"):
        shutil.copytree(ROOT / folder, work / folder)
    (work / "BROKEN.yaml").write_text("model:\n  hidden_size: [64\n")
    (work / "BINARY.yaml").write_bytes(bytes(range(256)) * 4)
    (work / "LIST.yaml").write_text("- model\n- data\n")
    (work / "EMPTY.jsonl").write_text("\n  \n")
    (work / "EMPTYDIR").mkdir()
    tok = skill_tokenizer()
    good = work / "GOOD"
    MultiStreamLM(tiny_base_model("llama", len(tok)), SKILL_STREAMS.bind(tok)).save_pretrained(good, tok)
    shutil.copytree(good, work / "CORRUPT")
    weights = work / "CORRUPT" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    shutil.copytree(good, work / "INCOMPLETE")
    (work / "INCOMPLETE" / "stream_embeddings.safetensors").unlink()
    prepare(load_config(PrepareConfig, ROOT / "jobs/data-skills.yaml",
                        [f"output={work / 'DATA'}", "sources=[{kind: skills, examples: 40}]"]))
    return work


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_named_line(scratch, argv, needle):
    argv = [a.replace("DATA", str(scratch / "DATA")) for a in argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    before = snapshot(scratch)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ms_ray.cli", *argv], cwd=scratch, env=env, capture_output=True,
                          text=True, timeout=120)
    seconds = time.perf_counter() - started
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(lines) == 1 or needle.startswith("unrecognized arguments"), lines  # argparse adds its usage
    assert needle in lines[-1], lines[-1]
    after = snapshot(scratch)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the refused command changed files: {changed}"
    # refused before Ray or a model starts (they take 10-50 s here); a loose bound, not a benchmark
    assert seconds < 30, f"{argv}: {seconds:.0f} s"
