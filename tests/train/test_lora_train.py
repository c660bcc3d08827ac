"""LoRA training (model.lora) on a real local Ray cluster with real DeepSpeed, ZeRO 0 to 3 (2 CPU
workers, gloo): the loss falls, frozen weights stay frozen, the export is a plain merged folder
equal to the trained adapters, and a resumed run repeats the uninterrupted one."""

import pytest
import torch
from test_train import job, losses, probe_matches_export

from ms_ray.cli import main
from ms_ray.core.families import build_model
from ms_ray.core.loading import load_export

pytestmark = pytest.mark.slow
STEPS = 8
LORA = ("model.lora={rank: 4, alpha: 8}", f"optim.max_steps={STEPS}", "optim.warmup_steps=2", "checkpoint.every=4",
        "eval.examples_per_task=0")
# ZeRO-3 also decodes the held-out skill sessions at the end: its evaluation gathers the
# partitioned LoRA model into a plain copy (TrainRecipe.whole_model)
EXTRA = {3: ("eval.examples_per_task=1",)}


@pytest.fixture(scope="module")
def lora_run(data_dir, tmp_path_factory):
    """run(stage) -> (run folder, metrics, config); each stage trains once per module."""
    from ms_ray.train.run import train

    storage, done = tmp_path_factory.mktemp("lora_runs"), {}

    def run(stage: int):
        if stage not in done:
            name = f"lora_z{stage}"
            cfg = job(data_dir, storage, name, *LORA, f"deepspeed.zero_stage={stage}", *EXTRA.get(stage, ()))
            done[stage] = storage / name, train(cfg), cfg
        return done[stage]

    return run


def changed_by_at_most_rank(trained: torch.Tensor, start: torch.Tensor, rank: int) -> bool:
    delta = (trained - start).double()
    return bool(delta.abs().max() > 0) and int(torch.linalg.matrix_rank(delta, rtol=1e-3)) <= rank


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_trains_and_exports_a_merged_plain_model(lora_run, stage):
    run_dir, metrics, cfg = lora_run(stage)
    first, last = losses(run_dir, [1, STEPS])
    assert metrics["step"] == STEPS and last < first * 0.9
    assert ("skills/all/n" in metrics) == (stage == 3)
    probe_matches_export(run_dir)  # the merged export against the engine's unmerged adapters
    model, tokenizer = load_export(run_dir / "export", device="cpu")
    assert type(model.base).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name in model.state_dict())
    # the model the run started from: the base weights moved only by the merged B A (rank 4),
    # and nowhere else, except the special tokens' rows of the (tied) embedding
    start = build_model(cfg.model.model_copy(update={"lora": None}), cfg.schema_.build(), tokenizer)[0]
    trained, before = model.state_dict(), start.state_dict()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"base.model.layers.1.self_attn.{name}.weight"
        assert changed_by_at_most_rank(trained[key], before[key], 4), key
    for name in ("gate_proj", "up_proj", "down_proj"):
        key = f"base.model.layers.0.mlp.{name}.weight"
        assert changed_by_at_most_rank(trained[key], before[key], 4), key
    for key in ("base.model.layers.0.input_layernorm.weight", "base.model.norm.weight"):
        assert torch.equal(trained[key], before[key]), key
    embed, embed0 = trained["base.model.embed_tokens.weight"], before["base.model.embed_tokens.weight"]
    special = sorted(set(model.schema.token_ids.values()))
    rows = torch.ones(len(embed), dtype=torch.bool)
    rows[special] = False
    assert torch.equal(embed[rows], embed0[rows]) and not torch.equal(embed[special], embed0[special])
    assert model.stream_embed.weight.abs().sum() > 0


def test_every_stage_trains_alike(lora_run):
    """The same steps on the same data: ZeRO only changes where the (few) trainable states live."""
    first = losses(lora_run(0)[0], range(1, STEPS + 1))
    for stage in (1, 2, 3):
        assert losses(lora_run(stage)[0], range(1, STEPS + 1)) == pytest.approx(first, rel=1e-6), stage


@pytest.mark.parametrize("stage", [1, 3])
def test_offline_export_of_a_lora_checkpoint_matches_the_run_s_export(lora_run, data_dir, stage, tmp_path):
    """`ms-ray export` consolidates the saved checkpoint with zero_to_fp32, which leaves the frozen
    weights out under ZeRO-1 (the fresh model supplies them), and merges the adapters."""
    run_dir, _, _ = lora_run(stage)
    out = tmp_path / "offline"
    assert main(["export", "jobs/tiny.yaml", f"data.path={data_dir}", f"run.storage={run_dir.parent}",
                 f"run.name={run_dir.name}", LORA[0], f"out={out}"]) == 0
    a, b = load_export(out, device="cpu")[0].state_dict(), load_export(run_dir / "export", device="cpu")[0].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)


def test_a_resumed_lora_run_matches_the_uninterrupted_one(lora_run, data_dir, tmp_path):
    """ZeRO-3 (frozen weights partitioned as well): a worker fails at step 6 once; the run resumes
    from the checkpoint of step 4 and its losses are bit-identical to the uninterrupted run's."""
    from ms_ray.train.run import train

    whole_dir, _, _ = lora_run(3)
    cfg = job(data_dir, tmp_path, "lora_z3", *LORA, "deepspeed.zero_stage=3", "run.fail_at_step=6",
              "run.max_failures=1")
    assert train(cfg)["step"] == STEPS and (tmp_path / "lora_z3" / ".fault_injected").exists()
    steps = list(range(5, STEPS + 1))
    assert losses(tmp_path / "lora_z3", steps) == losses(whole_dir, steps)
    probe_matches_export(tmp_path / "lora_z3")
