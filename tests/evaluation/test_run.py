"""`ms-ray eval`: files written, an offline W&B run, refusals."""

import math
from pathlib import Path

import pytest
from conftest import check_report_outputs as check_outputs
from conftest import make_model

from ms_ray.cli import main
from ms_ray.data.skills import SEQUENTIAL_STREAMS, TASKS
from ms_ray.evaluation.report import skill_metrics, skill_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("layout", ["streams", "sequential"])
def test_eval_scores_a_checkpoint_and_writes_the_report(layout, tmp_path, sch, tok, capsys):
    schema = sch if layout == "streams" else SEQUENTIAL_STREAMS.bind(tok)
    make_model(schema, len(tok)).save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    out = tmp_path / "eval"
    args = [f"checkpoint={tmp_path / 'ckpt'}", "eval.examples_per_task=2", f"output={out}", "wandb.mode=offline"]
    assert main(["eval", *args]) == 0
    summary = check_outputs(out, [layout], 2 * len(TASKS))
    assert summary["parameters"] > 0 and summary["streams"] == schema.names and summary["tool"] == "live"
    # one definition: the table `ms-ray train` prints from its flat metrics is the one in report.md
    per_task = {t: {k: math.nan if v is None else v for k, v in m.items()}
                for t, m in summary["summaries"][layout].items()}
    assert skill_table(skill_metrics(per_task), label=layout) in (out / "report.md").read_text()
    assert "exact match %" in capsys.readouterr().out


def test_eval_refuses_a_missing_checkpoint_or_one_that_is_not_a_skills_model(tmp_path, bound, tokenizer, capsys):
    assert main(["eval", f"checkpoint={tmp_path / 'nothing'}"]) == 2
    assert "nothing does not exist: give an exported model folder" in capsys.readouterr().err
    make_model(bound, len(tokenizer)).save_pretrained(tmp_path / "chat", tokenizer=tokenizer)  # user/think/output
    assert main(["eval", f"checkpoint={tmp_path / 'chat'}", f"output={tmp_path / 'out'}"]) == 2
    assert "not a skills model: streams ['user', 'think', 'output']" in capsys.readouterr().err
