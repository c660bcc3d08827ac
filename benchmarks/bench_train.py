"""Training-step benchmark: tokens/s and peak memory of one step, ours vs the reference release.

Run:  .venv/bin/python benchmarks/bench_train.py            (S = 1024, 2048, 4096; < 6 min)
      .venv/bin/python benchmarks/bench_train.py --quick    (S = 1024, 2048 only; < 90 s)
CPU, 2 threads, fp32. One tiny Llama (hidden 128, 2 layers, 4 heads, vocab 512) with C = 4 streams
(user: input; think, tool, output: output). Batch: one packed sequence of S cells (R = S/4 rows)
holding 3 documents (50 %, 30 %, 20 % of the rows, via doc_ids). A step is forward + loss +
backward + AdamW step + zero_grad. Every variant gets its own copy of the same seeded weights,
its own AdamW (lr 1e-4) and the same batch; loss = `model.weighted_loss` on next-row labels.

Table rows, per S cells:
  ours           `model(tokens, doc_ids, loss=True)` as shipped: the mask (`dense_mask`, vectorised
                 additive fp32 [B,1,S,S]) and positions (`row_positions`) are built inside forward.
  ours, bool     the same attention path (transformers sdpa through our attention hook), but fed a
                 boolean [B,1,S,S] mask (`allowed(...)`, built inside the timed step):
                 `model.base(inputs_embeds=model.embed(...), attention_mask=bool_mask, position_ids=...)`.
                 Its logits and loss are asserted equal to ours before timing; if the check fails
                 (or the call raises) the row is dropped and a line says why. Note: on CPU, torch's
                 sdpa turns a bool mask into a new float mask on every layer call, and each layer
                 saves its copy for backward, so this row's memory grows with the number of layers.
  release        the release's collator: `torch.full(MIN)` then a Python double loop over all S x S
                 cell pairs setting visible cells to 0.0 (same rule: same doc and earlier row or
                 itself); the step then calls `model.base` with that mask. Its mask is asserted equal
                 to `dense_mask` and its logits to ours. The collator is timed apart from the step
                 ("collator s"); row cost varies with i (one tensor store per visible cell), so when
                 the whole loop would run too long, k evenly spaced rows are looped and the total is
                 extrapolated (alloc + mean row cost x S): such values read "~..." and the footnote
                 gives k. The other rows are then filled with per-row slices (untimed) so that the
                 step gets the full, correct mask.
Columns:
  step s         best of N steps (after one warm-up step), round-robin across variants.
  collator s     release only: time to build its mask on the host ("-" for ours: built in step).
  tokens/s       S / (collator s + step s), for this one process (= one training worker).
  peak MB        peak RSS increase of the step over the RSS just before it, measured in a fresh
                 process per (S, variant) (multiprocessing forkserver, one task per child): the
                 child builds the model, runs one warm-up step at S = 256 (optimizer state, lazy
                 library init), resets the kernel's peak-RSS counter (/proc/self/clear_refs = 5),
                 runs the measured work and reads ru_maxrss. For ours this covers the mask build
                 inside forward, activations, gradients and the AdamW update. For the release it
                 covers collator + step (its mask is alive during the step, as in a data loader
                 batch); the collator's own share is listed below the table. RSS includes what the
                 allocator keeps, so values carry a few MB of noise (about +-5 % at S = 4096); the
                 full run takes the lowest of 2 fresh processes, --quick a single one.
  vs release     tokens/s ratio (higher is better) and peak-memory ratio (lower is better).
Goal (CPU): at S = 4096, ours >= 1.2x the release's tokens/s and <= 0.6x its peak memory.
On CUDA (not on a CPU-only machine) a second table compares ours with FlexAttention
(`model.attention = "flex"`, BlockMask) against ours with sdpa + dense mask at S = 4096; memory there
is torch.cuda.max_memory_allocated over the step. Goal: flex >= 2x tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import resource
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

# On small VMs (2 vCPUs) OpenMP's default busy-wait made many forward passes stall ~256 ms each
# with 2 threads; passive waiting keeps the timings stable. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

from ms_ray.core.families import tiny_base_model  # noqa: E402
from ms_ray.core.model import MultiStreamLM, allowed, dense_mask, row_positions  # noqa: E402
from ms_ray.core.streams import StreamSchema, StreamSpec, next_row_labels  # noqa: E402

MIN = torch.finfo(torch.float32).min
C, VOCAB = 4, 512
DOC_SPLIT = (0.5, 0.3, 0.2)  # share of rows of each packed document
VARIANTS = ("ours", "ours, checkpointed", "ours, bool", "release")


def setup() -> None:
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- model, batch, steps -----------------------------------------------------------------
def make_model() -> MultiStreamLM:
    streams = (StreamSpec("user", "input"), StreamSpec("think", "output"), StreamSpec("tool", "output"),
               StreamSpec("output", "output"))
    schema = StreamSchema(streams, token_ids={"<|silence|>": 0, "<|pad|>": 1})
    base = tiny_base_model("llama", VOCAB, hidden_size=128, num_layers=2, num_heads=4, seed=0)
    model = MultiStreamLM(base, schema, attention="sdpa").train()
    with torch.no_grad():  # non-zero stream embeddings, so the equality checks cover them too
        model.stream_embed.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    return model


def make_batch(S: int, device="cpu"):
    """tokens [1, R, C] and doc_ids [1, R] for one packed sequence of 3 documents."""
    R = S // C
    g = torch.Generator().manual_seed(S)
    tokens = torch.randint(2, VOCAB, (1, R, C), generator=g)
    sizes = [int(R * f) for f in DOC_SPLIT[:-1]]
    sizes.append(R - sum(sizes))
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])[None]
    return tokens.to(device), doc_ids.to(device)


def bool_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The visibility rule as a boolean [B, 1, S, S] mask (True = attend), vectorised."""
    S = doc_ids.shape[1] * C
    idx = torch.arange(S, device=doc_ids.device)
    doc = doc_ids.repeat_interleave(C, dim=1)
    return allowed(idx[:, None], idx[None, :], doc[:, :, None], doc[:, None, :], C)[:, None]


def base_forward(model, tokens, doc_ids, mask):
    """Our embedding and positions, then the HF model with a given 4D mask. Returns logits [B,R,C,V]."""
    B, R, _ = tokens.shape
    S = R * C
    x = model.embed(tokens.reshape(B, S), torch.arange(S, device=tokens.device) % C)
    positions = row_positions(doc_ids).repeat_interleave(C, dim=1)
    out = model.base(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.logits.view(B, R, C, -1)


def step_ours(model, opt, tokens, doc_ids, mask=None):
    model(tokens, doc_ids, loss=True).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_bool(model, opt, tokens, doc_ids, mask=None):
    logits = base_forward(model, tokens, doc_ids, bool_mask(doc_ids))
    model.weighted_loss(logits, next_row_labels(tokens, doc_ids)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_release(model, opt, tokens, doc_ids, mask):
    logits = base_forward(model, tokens, doc_ids, mask)
    model.weighted_loss(logits, next_row_labels(tokens, doc_ids)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


STEPS = {"ours": step_ours, "ours, checkpointed": step_ours, "ours, bool": step_bool, "release": step_release}


def for_variant(model: MultiStreamLM, variant: str) -> MultiStreamLM:
    """"ours, checkpointed": activation checkpointing per decoder layer (model.gradient_checkpointing
    in the training config): layers are recomputed in backward instead of kept."""
    if variant == "ours, checkpointed":
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---- the release's collator --------------------------------------------------------------
def release_collator(doc_ids: torch.Tensor, rows) -> tuple[torch.Tensor, float, float]:
    """The release's mask, filled by a Python double loop on the given rows only.
    Returns (mask, seconds to allocate, seconds of the loop)."""
    doc = doc_ids[0].repeat_interleave(C).tolist()
    S = len(doc)
    t0 = time.perf_counter()
    mask = torch.full((1, 1, S, S), MIN)
    t1 = time.perf_counter()
    for i in rows:
        for j in range(S):
            if doc[i] == doc[j] and (j // C < i // C or i == j):
                mask[0, 0, i, j] = 0.0
    return mask, t1 - t0, time.perf_counter() - t1


def fill_other_rows(mask: torch.Tensor, doc_ids: torch.Tensor, done) -> None:
    """Complete the rows the loop skipped, one slice per row (untimed; contiguous documents)."""
    doc = doc_ids[0].repeat_interleave(C)
    S = doc.numel()
    first = torch.zeros(S, dtype=torch.long)  # first cell of each cell's document
    starts = torch.ones(S, dtype=torch.bool)
    starts[1:] = doc[1:] != doc[:-1]
    first = torch.where(starts, torch.arange(S), first).cummax(0).values.tolist()
    done = set(done)
    for i in range(S):
        if i not in done:
            mask[0, 0, i, first[i]:(i // C) * C] = 0.0
            mask[0, 0, i, i] = 0.0


def timed_collator(doc_ids: torch.Tensor, budget_s: float):
    """Run (or sample and extrapolate) the release collator. Returns (full mask, seconds, k rows looped)."""
    S = doc_ids.shape[1] * C
    probe = [int((n + 0.5) * S / 8) for n in range(8)]  # row cost depends on the row's place in its doc
    _, _, probe_s = release_collator(doc_ids, probe)
    row_s = probe_s / len(probe)
    k = S if row_s * S <= 2 * budget_s else max(8, int(budget_s / max(row_s, 1e-9)))
    rows = range(S) if k == S else [int((n + 0.5) * S / k) for n in range(k)]
    mask, alloc_s, loop_s = release_collator(doc_ids, rows)
    if k < S:
        fill_other_rows(mask, doc_ids, rows)
    assert torch.equal(mask, dense_mask(doc_ids, C, torch.float32)), f"release mask differs from ours at S={S}"
    return mask, alloc_s + loop_s * S / k, k


# ---- peak memory, one fresh process per measurement ----------------------------------------
def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS (Linux >= 4.0)
    except OSError:
        pass  # falls back to the peak since process start (the warm-up is small)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def measure_memory(variant: str, S: int) -> dict:
    """Runs in a fresh child: peak RSS increase (MB) of one step (release: of collator + step)."""
    setup()
    torch.manual_seed(0)
    model = for_variant(make_model(), variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = STEPS[variant]
    small = make_batch(256)
    step(model, opt, *small, mask=dense_mask(small[1], C, torch.float32))  # warm-up: optimizer state, lazy init
    tokens, doc_ids = make_batch(S)
    del small
    rss0 = _rss_bytes()
    _reset_peak()
    result = {}
    mask = None
    if variant == "release":
        rows = [int((n + 0.5) * S / 8) for n in range(8)]  # memory does not depend on how many rows loop
        mask, _, _ = release_collator(doc_ids, rows)
        fill_other_rows(mask, doc_ids, rows)
        result["collator_mb"] = (_peak_bytes() - rss0) / 2**20
    step(model, opt, tokens, doc_ids, mask=mask)
    result["peak_mb"] = (_peak_bytes() - rss0) / 2**20
    return result


def bench_memory(sizes, variants, repeats: int) -> dict:
    """{(S, variant): result}, each from its own child process (forked from a preloaded server);
    with repeats > 1, the lowest of that many fresh processes (allocator noise only adds)."""
    ctx = mp.get_context("forkserver")  # children fork from a server that imported the heavy modules once
    ctx.set_forkserver_preload(["torch", "transformers", "transformers.models.llama.modeling_llama",
                                "ms_ray.core.model", "ms_ray.core.families"])
    out = {}
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        for S in sizes:
            for v in variants:
                runs = [pool.submit(measure_memory, v, S).result() for _ in range(repeats)]
                out[S, v] = {key: min(r[key] for r in runs) for key in runs[0]}
    return out


# ---- timing ------------------------------------------------------------------------------
def check_equal(models, tokens, doc_ids, release_mask) -> tuple[float, float, str | None]:
    """Logits (and loss) of the bool-mask and release paths vs ours, before any step.
    Returns (max |diff| bool, max |diff| release, why the bool path fails or None)."""
    labels = next_row_labels(tokens, doc_ids)
    with torch.no_grad():
        ref = models["ours"](tokens, doc_ids, loss=True, keep_logits=True)
        rel = base_forward(models["release"], tokens, doc_ids, release_mask)
        rel_diff = (rel - ref.logits).abs().max().item()
        assert torch.allclose(rel, ref.logits, rtol=1e-4, atol=1e-5), f"release logits differ by {rel_diff:.2e}"
        try:
            got = base_forward(models["ours, bool"], tokens, doc_ids, bool_mask(doc_ids))
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            return float("nan"), rel_diff, f"bool mask raised {type(e).__name__}: {e}"
        bool_diff = (got - ref.logits).abs().max().item()
        loss = models["ours, bool"].weighted_loss(got, labels).loss
        if not (torch.allclose(got, ref.logits, rtol=1e-4, atol=1e-5) and torch.allclose(loss, ref.loss, atol=1e-6)):
            return bool_diff, rel_diff, f"bool mask logits differ from ours by {bool_diff:.2e}"
    return bool_diff, rel_diff, None


def bench_speed(S: int, repeats: int, budget_s: float) -> dict:
    tokens, doc_ids = make_batch(S)
    torch.manual_seed(0)
    ours = make_model()
    models = {v: for_variant(copy.deepcopy(ours), v) for v in VARIANTS}
    opts = {v: torch.optim.AdamW(m.parameters(), lr=1e-4) for v, m in models.items()}
    mask, collator_s, k = timed_collator(doc_ids, budget_s)
    bool_diff, rel_diff, bool_error = check_equal(models, tokens, doc_ids, mask)
    variants = [v for v in VARIANTS if not (v == "ours, bool" and bool_error)]
    for v in variants:  # warm-up
        STEPS[v](models[v], opts[v], tokens, doc_ids, mask=mask)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):  # round-robin, so a burst of load hits every variant alike
        for v in variants:
            t0 = time.perf_counter()
            STEPS[v](models[v], opts[v], tokens, doc_ids, mask=mask)
            best[v] = min(best[v], time.perf_counter() - t0)
    return {"step": best, "collator": collator_s, "k": k, "bool_diff": bool_diff, "rel_diff": rel_diff,
            "bool_error": bool_error, "variants": variants}


# ---- CUDA: FlexAttention vs sdpa + dense mask --------------------------------------------
def bench_cuda(S: int, repeats: int) -> str:
    device = torch.device("cuda")
    tokens, doc_ids = make_batch(S, device)
    torch.manual_seed(0)
    ref = make_model().to(device)
    rows, rate, mem = [], {}, {}
    for name, attention in (("ours, sdpa + dense mask", "sdpa"), ("ours, FlexAttention", "flex")):
        model = copy.deepcopy(ref)
        model.attention = attention
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):  # warm-up (FlexAttention compiles here)
            step_ours(model, opt, tokens, doc_ids)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            step_ours(model, opt, tokens, doc_ids)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step_ours(model, opt, tokens, doc_ids)
        torch.cuda.synchronize()
        rate[attention], mem[attention] = S / best, (torch.cuda.max_memory_allocated() - before) / 2**20
        rows.append([S, name, f"{best:.4f}", f"{rate[attention]:,.0f}", f"{mem[attention]:.0f}"])
        del model, opt
    ratio = rate["flex"] / rate["sdpa"]
    return "\n".join([
        f"## CUDA: {torch.cuda.get_device_name(0)}, FlexAttention vs sdpa + dense mask (fp32, best of {repeats})\n",
        table(["S cells", "variant", "step s", "tokens/s", "peak MB (allocated)"], rows),
        f"\n- goal CUDA: flex >= 2x tokens/s at {S}: {ratio:.2f}x {'PASS' if ratio >= 2 else 'MISS'} "
        f"(peak memory {mem['flex'] / mem['sdpa']:.2f}x of sdpa)",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (S = 1024, 2048; < 90 s)")
    args = ap.parse_args()
    setup()
    start = time.perf_counter()
    sizes = (1024, 2048) if args.quick else (1024, 2048, 4096)
    repeats, budget_s, memory_repeats = (2, 0.5, 1) if args.quick else (3, 3.0, 2)

    speed = {S: bench_speed(S, repeats, budget_s) for S in sizes}
    working = [v for v in VARIANTS if all(v in speed[S]["variants"] for S in sizes)]
    memory = bench_memory(sizes, working, memory_repeats)

    rows, notes, ratios = [], [], {}
    for S in sizes:
        r = speed[S]
        rel_col = r["collator"]
        rel_rate = S / (rel_col + r["step"]["release"])
        approx = "~" if r["k"] < S else ""
        for v in r["variants"]:
            col = rel_col if v == "release" else 0.0
            rate = S / (col + r["step"][v])
            peak = memory[S, v]["peak_mb"]
            rel_peak = memory[S, "release"]["peak_mb"]
            ratios[S, v] = (rate / rel_rate, peak / rel_peak)
            mark = approx if v == "release" else ""
            rows.append([S, v, f"{r['step'][v]:.3f}", f"{mark}{col:.3f}" if v == "release" else "-",
                         f"{mark}{rate:,.0f}", f"{peak:.0f}", f"{ratios[S, v][0]:.2f}x", f"{ratios[S, v][1]:.2f}x"])
        if r["k"] < S:
            notes.append(f"- S={S}: release collator ~{rel_col:.2f} s extrapolated from {r['k']} of {S} rows "
                         "(marked ~)")
        notes.append(f"- S={S}: release collator alone raised peak RSS by {memory[S, 'release']['collator_mb']:.0f} MB "
                     f"(dense fp32 mask = {S * S * 4 / 2**20:.0f} MB)")
        if r["bool_error"]:
            notes.append(f"- S={S}: bool mask row dropped: {r['bool_error']}")
        else:
            notes.append(f"- S={S}: bool mask gives the same logits as ours (max |diff| {r['bool_diff']:.1e}); "
                         f"release logits max |diff| {r['rel_diff']:.1e}")

    print(f"## Training step, tiny Llama (hidden 128, 2 layers, 4 heads, vocab {VOCAB}), C = {C}, "
          f"batch 1 x 3 packed docs, fp32 ({'quick' if args.quick else 'full'} run)\n")
    header = ["S cells", "variant", "step s", "collator s", "tokens/s", "peak MB", "tokens/s vs release",
              "memory vs release"]
    print(table(header, rows))
    print(f"\nStep = forward + loss + backward + AdamW step, best of {repeats} after a warm-up; peak MB = peak RSS "
          f"increase in a fresh process (release: collator + step), lowest of {memory_repeats}.")
    print("\n".join(notes))

    goal_S = max(sizes)
    speed_ratio, mem_ratio = ratios[goal_S, "ours"]
    ok = speed_ratio >= 1.2 and mem_ratio <= 0.6
    where = "" if goal_S == 4096 else f" (quick run: measured at S={goal_S}, not 4k)"
    print(f"\n- goal CPU: >= 1.2x tokens/s and <= 0.6x peak memory at 4k vs the release: "
          f"{speed_ratio:.2f}x tokens/s, {mem_ratio:.2f}x memory{where} {'PASS' if ok else 'MISS'}")
    print(f"- device: cpu (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")

    if torch.cuda.is_available():
        print()
        print(bench_cuda(4096, repeats))
    print(f"\nTotal run time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
