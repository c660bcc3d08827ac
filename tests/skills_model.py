"""A short-trained skills model for the tests that talk to a live server (conftest.skills_export),
trained in one process with a plain torch loop instead of `ms-ray train`.

Those tests need a model that has learned the tasks, not a test of training (tests/train/ runs
`ms-ray train` through Ray Train + DeepSpeed). On 2 cores a step of this tiny model through Ray
Train + DeepSpeed ZeRO-2 on 2 workers costs ~166 ms, nearly all of it DeepSpeed's and the gradient
all-reduce's; the same step in one process costs a fraction of that. What the loop keeps from a
train run, so the model is the one `ms-ray train` would give:
  - the config: jobs/tiny.yaml (model, optimiser, schedule, seed) with the same overrides
  - the model: build_model under torch.manual_seed(cfg.seed), as TrainRecipe.make_model
  - the data: the prepared packs (ms_ray.data.pipeline.prepare), in the seeded epoch order of
    ms_ray.train.packs.batches, a step being num_workers x data.batch_size packs (the global batch)
  - the loss: next-row labels, weighted per stream, divided by the step's supervised cells (what the
    ranks' all-reduced normaliser plus data-parallel averaging amount to)
  - the optimiser: AdamW over param_groups with lr_lambda's schedule and gradient clipping, as
    optim.deepspeed_config asks DeepSpeed for (torch_adam, fp32)
  - the export: train.checkpoint.export_model, the function a train run's export goes through
    (the same folder layout, the finite-weights check), so `ms-ray serve` loads it as it loads any.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_packs(data_dir: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All packs of a split in pack-id order: tokens [N, R, C], doc_ids [N, R]."""
    ids, tokens, docs = [], [], []
    for f in manifest["splits"][split]["files"]:
        table = pq.read_table(data_dir / f, columns=["pack_id", "tokens", "doc_ids"])
        ids += table.column("pack_id").to_pylist()
        tokens += [np.asarray(t, dtype=np.int32) for t in table.column("tokens").to_pylist()]
        docs += [np.asarray(d, dtype=np.int32) for d in table.column("doc_ids").to_pylist()]
    order = np.argsort(np.array(ids, dtype=object).astype(str), kind="stable")
    R = len(docs[0])
    return (np.stack([tokens[i] for i in order]).reshape(len(order), R, -1),
            np.stack([docs[i] for i in order]))


def train_skills_model(out: Path, overrides: list[str], data_overrides: dict, log=print) -> Path:
    """Prepare the data (jobs/data-skills.yaml updated with `data_overrides`, on the Ray already
    started), train jobs/tiny.yaml + `overrides` in this process, export to out/export."""
    import time

    import yaml

    from ms_ray.config import PrepareConfig, TrainConfig, load_config
    from ms_ray.core.families import build_model
    from ms_ray.core.loading import load_tokenizer
    from ms_ray.data.pipeline import prepare
    from ms_ray.manifest import load_manifest
    from ms_ray.train.checkpoint import export_model

    started = time.perf_counter()
    data = yaml.safe_load((ROOT / "jobs/data-skills.yaml").read_text())
    data["sources"][0].update(data_overrides)
    (out / "data.yaml").write_text(yaml.safe_dump(data))
    data_dir = out / "data"
    prepare(load_config(PrepareConfig, out / "data.yaml", [f"output={data_dir}"]), log=lambda _: None)
    cfg = load_config(TrainConfig, ROOT / "jobs/tiny.yaml", [f"data.path={data_dir}", *overrides])
    manifest = load_manifest(data_dir, cfg.schema_.build(), "skills_export")
    schema = cfg.schema_.build()
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["path"], schema)
    prepared = time.perf_counter()

    def make_model():  # as TrainRecipe.make_model: the same start, and the frame of the export
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, schema, tokenizer)[0]

    with torch.random.fork_rng():  # the rest of the session's RNG stays as it was
        model = train_loop(cfg, make_model(), load_packs(data_dir, manifest, "train"), log)
        val = validation_loss(model, *load_packs(data_dir, manifest, "validation"))
        log(f"skills_export: validation loss {val:.2e}")
        export = export_model({k: v.detach() for k, v in model.state_dict().items()}, make_model, tokenizer,
                              out / "export")
    log(f"skills_export: data {prepared - started:.0f} s, {cfg.optim.max_steps} steps "
        f"{time.perf_counter() - prepared:.0f} s")
    return export


def train_loop(cfg, model, packs: tuple[np.ndarray, np.ndarray], log):
    """optim.max_steps steps of num_workers x data.batch_size packs; returns the model in eval mode."""
    from ms_ray.core.model import IGNORE
    from ms_ray.core.streams import next_row_labels
    from ms_ray.train.optim import lr_lambda, param_groups
    from ms_ray.train.packs import micro_batches

    o, ds = cfg.optim, cfg.deepspeed
    assert ds.precision == "fp32" and ds.grad_accum == 1 and cfg.model.lora is None, "the loop below does none of these"
    model.train()
    weights = torch.tensor(model.schema.loss_weights)
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=1e-8,
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, o))
    batch = cfg.scaling.num_workers * cfg.data.batch_size  # the global batch of a train run's step
    stream = micro_batches(*packs, batch, cfg.seed, 0, 0, "cpu")
    window = []
    for step in range(1, o.max_steps + 1):
        _, _, tokens, docs = next(stream)
        labels = next_row_labels(tokens, docs, IGNORE)
        supervised = ((labels != IGNORE) & (weights > 0)).sum().item()
        loss = model(tokens, docs, labels=labels, normaliser=supervised).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ds.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ds.clip)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        assert np.isfinite(window[-1]), f"skills_export: loss {window[-1]} at step {step}"
        if step % cfg.run.log_every == 0 or step == o.max_steps:
            log(f"skills_export: step {step} loss {np.mean(window):.4f}")
            window = []
    return model.eval()


@torch.no_grad()
def validation_loss(model, tokens: np.ndarray, docs: np.ndarray) -> float:
    """The validation loss a train run reports (TrainRecipe.validation_loss), for the log."""
    weights = torch.tensor(model.schema.loss_weights) > 0
    sums, counts = 0.0, 0
    for i in range(0, len(tokens), 16):
        out = model(torch.from_numpy(tokens[i : i + 16]).long(), torch.from_numpy(docs[i : i + 16]).long(), loss=True)
        sums += float(out.stream_loss_sum[weights].sum())
        counts += int(out.stream_count[weights].sum())
    return sums / max(counts, 1)
