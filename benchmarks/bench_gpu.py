"""Training and decoding at real sizes: what a GPU session measures in one call of a few minutes.

    python benchmarks/bench_gpu.py               # on a GPU: the tables below (a few minutes)
    python benchmarks/bench_gpu.py --quick       # CPU, tiny sizes, the same code paths (the tests run it)
    python benchmarks/bench_gpu.py --cpu-loss    # CPU: the loss's memory and speed, chunked vs today's

(a) Training step of a Qwen3-0.6B-shaped model (its config, random weights: no download), C = 4
    streams, bf16, one packed document per sequence of 2k / 4k / 8k cells, FlexAttention vs the
    dense-mask sdpa path: tokens/s, MFU, peak memory. A step = forward + backward + AdamW.
    MFU = achieved FLOP/s / the device's peak bf16 FLOP/s, with FLOPs per step =
        6 * P * S  +  12 * L * n_heads * head_dim * S * S_vis
    P: the weights a token meets (layers + the output layer; the input embedding is a lookup),
    S: cells, S_vis: keys a cell sees on average (our rule: its earlier rows and itself, ~S/2),
    the second term the attention's QK^T and AV, forward and backward (x3).
(b) Row decoding (RowDecoder, the server's decoder) of N = 1 / 64 / 256 / 512 sessions, each with
    a 128-row prefill, greedy: rows/s per session and aggregate; the largest N at >= 20 rows/s.
(c) --cpu-loss: one training step (forward + backward) of a small model (hidden 256, 2 layers,
    C = 4) with a 49k and a 152k vocabulary at 1k-4k cells, in a fresh process each, today's loss
    (whole [B, R, C, V] logits, model.loss_chunk_mb: null) beside the chunked one: peak memory
    (the process's peak RSS during the step over its RSS before it) and tokens/s; then eager vs
    model.compile at 152k / 2k cells.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a busy CPU: spinning threads would be measured

import torch  # noqa: E402

from ms_ray.core.decode import RowDecoder, StopRules  # noqa: E402
from ms_ray.core.model import MultiStreamLM  # noqa: E402
from ms_ray.core.streams import StreamSchema, StreamSpec  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                 rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=4096)
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121}  # dense


def schema(vocab: int) -> StreamSchema:
    streams = (StreamSpec("system", "input"), StreamSpec("user", "input"), StreamSpec("think", "output"),
               StreamSpec("output", "output", end_token="<|end|>"))
    return StreamSchema(streams, token_ids={"<|silence|>": vocab - 1, "<|pad|>": vocab - 2, "<|end|>": vocab - 3})


def build(sizes: dict, device, dtype, attention: str = "auto") -> MultiStreamLM:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", **sizes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    return MultiStreamLM(base, schema(sizes["vocab_size"]), attention=attention)


def batch(cells: int, vocab: int, device, C: int = 4):
    rows = cells // C
    tokens = torch.randint(0, vocab - 3, (1, rows, C), device=device)
    return tokens, torch.zeros(1, rows, dtype=torch.long, device=device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(model: MultiStreamLM, cells: int) -> float:
    cfg = model.base.config
    params = sum(p.numel() for n, p in model.base.named_parameters() if "embed_tokens" not in n)
    params += cfg.vocab_size * cfg.hidden_size  # the output layer (tied: the embedding, met as a matmul)
    visible = cells / 2
    return 6 * params * cells + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * cells * visible


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_row(model, cells: int, steps: int, device) -> dict:
    tokens, docs = batch(cells, model.vocab_size, device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    layout = docs.cpu().numpy().tobytes()

    def step():
        model(tokens, docs, loss=True, check=False, layout_key=layout).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, the BlockMask, AdamW's state
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
    return {"cells": cells, "tok_s": cells / seconds, "flops": step_flops(model, cells) / seconds, "peak_gib": peak}


def training(sizes, device, dtype, cells_list, steps, peak) -> None:
    attentions = ["flex", "sdpa"] if device.type == "cuda" else ["sdpa"]  # flex has no CPU backward
    print(f"## (a) Training step: Qwen3 {'0.6B' if sizes is QWEN3_06B else 'tiny'} shape, C = 4, {dtype}, "
          f"{device.type}\n")
    print("| attention | cells | tokens/s | TFLOP/s | MFU | peak memory GiB |\n|---|---:|---:|---:|---:|---:|")
    for attention in attentions:
        model = build(sizes, device, dtype, attention).train()
        for cells in cells_list:
            try:
                r = train_row(model, cells, steps, device)
            except torch.OutOfMemoryError:
                print(f"| {attention} | {cells:,} | out of memory | | | |")
                torch.cuda.empty_cache()
                continue
            mfu = f"{100 * r['flops'] / (peak * 1e12):.1f} %" if peak else "-"
            print(f"| {attention} | {cells:,} | {r['tok_s']:,.0f} | {r['flops'] / 1e12:.1f} | {mfu} | "
                  f"{r['peak_gib']} |", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()


@torch.no_grad()
def decoding(sizes, device, dtype, counts, prefill_rows, steps) -> None:
    model = build(sizes, device, dtype).eval()
    print(f"## (b) Row decoding: {prefill_rows}-row prefill, then {steps} rows, greedy, C = 4\n")
    print("| sessions | rows/s per session | rows/s aggregate | ms per step |\n|---:|---:|---:|---:|")
    best = None
    for n in counts:
        decoder = RowDecoder(model, max_sessions=n, initial_rows=prefill_rows + steps + 8)
        try:
            for i in range(n):
                decoder.open(prefill=torch.randint(0, model.vocab_size - 3, (prefill_rows, 4)),
                             stop=StopRules(steps + 8))
            decoder.step()  # warm-up
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                decoder.step()
            sync(device)
        except torch.OutOfMemoryError:
            print(f"| {n} | out of memory | | |")
            break
        per_session = steps / (time.perf_counter() - started)
        best = n if per_session >= 20 else best
        print(f"| {n} | {per_session:,.1f} | {n * per_session:,.0f} | {1000 / per_session:.2f} |", flush=True)
        del decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nLargest N at >= 20 rows/s per session: {best if best is not None else 'none measured'}\n")


# ---- (c) the loss on CPU: each configuration in a fresh process -------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_step(vocab: int, cells: int, chunked: bool, compiled: bool, steps: int) -> dict:
    sizes = dict(TINY, hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                 intermediate_size=1024, vocab_size=vocab)
    model = build(sizes, torch.device("cpu"), torch.float32).train()
    model.loss_chunk_mb = 256 if chunked else None
    if compiled:
        model.compile()
    tokens, docs = batch(cells, vocab, torch.device("cpu"))

    def step():
        model(tokens, docs, loss=True, check=False).loss.backward()
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: only the step's own peak moves

    if compiled:
        step()  # the compile happens here, outside the measurement
    step_before = rss_bytes()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - step_before
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return {"peak_mib": max(peak, 0) / 2**20, "tok_s": cells * steps / (time.perf_counter() - started)}


def cpu_loss(vocabs, cells_list, steps, compile_at) -> None:
    def run(*args) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one-loss-step", json.dumps(args)], capture_output=True,
                             text=True, timeout=1800)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"## (c) Training-step memory and speed on CPU (hidden 256, 2 layers, C = 4, fp32, "
          f"{torch.get_num_threads()} threads)\n")
    print("| vocabulary | cells | today's loss: peak MiB | tokens/s | chunked: peak MiB | tokens/s | memory ratio "
          "| speed ratio |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in vocabs:
        for cells in cells_list:
            full, chunked = run(vocab, cells, False, False, steps), run(vocab, cells, True, False, steps)
            print(f"| {vocab:,} | {cells:,} | {full['peak_mib']:,.0f} | {full['tok_s']:,.0f} | "
                  f"{chunked['peak_mib']:,.0f} | {chunked['tok_s']:,.0f} | "
                  f"{chunked['peak_mib'] / full['peak_mib']:.2f}x | {chunked['tok_s'] / full['tok_s']:.2f}x |",
                  flush=True)
    if compile_at:
        vocab, cells = compile_at
        eager, compiled = run(vocab, cells, True, False, steps), run(vocab, cells, True, True, steps)
        print(f"\nvocabulary {vocab:,}, {cells:,} cells, chunked loss: eager {eager['tok_s']:,.0f} tokens/s, "
              f"compiled (inductor) {compiled['tok_s']:,.0f} tokens/s ({compiled['tok_s'] / eager['tok_s']:.2f}x)")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU: the code paths, not the numbers")
    parser.add_argument("--cpu-loss", action="store_true", help="only (c): the loss on CPU, today's vs chunked")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s, for MFU (else by name)")
    parser.add_argument("--one-loss-step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_loss_step:  # (c)'s child process
        print(json.dumps(loss_step(*json.loads(args.one_loss_step))))
        return
    if args.cpu_loss:
        return cpu_loss((49152, 151936), (1024, 2048, 4096), 3, (151936, 2048))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        training(TINY, device, torch.float32, (64, 128), 2, None)
        decoding(TINY, device, torch.float32, (1, 4), 16, 8)
        cpu_loss((1000,), (256,), 1, None)
        return
    if device.type != "cuda":
        sys.exit("no GPU here: run with --quick (the code paths) or --cpu-loss (the CPU loss table)")
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    training(QWEN3_06B, device, torch.bfloat16, (2048, 4096, 8192), 5, peak_tflops(device, args.peak_tflops))
    decoding(QWEN3_06B, device, torch.bfloat16, (1, 64, 256, 512), 128, 50)


if __name__ == "__main__":
    main()
