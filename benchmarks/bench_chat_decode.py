"""Chat decoding benchmark: rows/s of an exported chat model, one live session vs 4 batched.

Run:  .venv/bin/python benchmarks/bench_chat_decode.py --checkpoint runs/train/smollm2-chat/export
      .venv/bin/python benchmarks/bench_chat_decode.py --tiny      (a tiny random chat model, < 30 s)
Defaults: fp32 on the CPU with 2 threads (cuda when there is one: bf16, as load_export picks), 64 rows.

Each session is what `ms-ray eval`'s chat evaluation decodes (ms_ray/evaluation/chat.decode, the
RowDecoder behind it): greedy, the user's tokens pushed one per row from row 0, nothing else given,
exactly --rows rows. The user's turn is the first held-out conversation of --data (default
runs/data/smollm2-chat; a fixed sentence when the folder is missing or with --tiny), cut to --rows.
Table rows:
  1 session    one session alone in a RowDecoder: rows/s = rows / seconds
  4 sessions   the same turn in 4 sessions of one RowDecoder, one batched forward per row:
               rows/s (aggregate) = 4 * rows / seconds; per session = rows / seconds
  vs 1 session aggregate rows/s over the 1-session rows/s measured in this run
Times are the best of --repeats round-robin runs after one warm-up run of each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

# passive OpenMP waiting keeps timings stable on small shared VMs (see bench_core.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from ms_ray.core.export import ExportError, check_export  # noqa: E402
from ms_ray.core.families import tiny_base_model  # noqa: E402
from ms_ray.core.loading import hf_bars_on_terminals_only, load_export  # noqa: E402
from ms_ray.core.model import MultiStreamLM  # noqa: E402
from ms_ray.core.streams import StreamSchema, StreamSpec  # noqa: E402
from ms_ray.data.tokenizer import word_tokenizer  # noqa: E402
from ms_ray.evaluation.chat import HeldOut, chat_streams, decode, held_out  # noqa: E402

BATCH = 4
SENTENCE = "hello there how are you today what about the weather"


def tiny_export(folder: Path) -> Path:
    """A tiny random chat model (user in, output out, both with end tokens), saved as an export."""
    schema = StreamSchema((StreamSpec("user", "input", end_token="<|end_user|>"),
                           StreamSpec("output", "output", end_token="<|end|>")))
    tokenizer = word_tokenizer(SENTENCE.split(), schema)
    torch.manual_seed(0)
    model = MultiStreamLM(tiny_base_model("llama", len(tokenizer), hidden_size=128), schema.bind(tokenizer))
    with hf_bars_on_terminals_only():
        model.save_pretrained(folder, tokenizer)
    return folder


def user_turn(model, tokenizer, data: Path | None, rows: int) -> HeldOut:
    """A table of `rows` rows whose user stream holds the turn (the rest is silence)."""
    schema = model.schema
    user, _ = chat_streams(schema)
    table = np.full((rows, schema.num_streams), schema.silence_id, dtype=np.int64)
    if data is not None and (data / "manifest.json").exists():
        conv = held_out(data, schema, 1)[0][0]
        said = [int(t) for t in conv.rows[:, user] if t != schema.silence_id]
        source = f"{conv.id} of {data}"
    else:
        said = tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
        said += [schema.end_ids()[schema.names[user]]] if schema.streams[user].end_token else []
        source = "a fixed sentence"
    said = said[:rows]
    table[: len(said), user] = said
    return HeldOut(source, table, len(said) - 1, len(said) + 1)


def measure(model, turn: HeldOut, repeats: int) -> dict[int, float]:
    """{sessions: best seconds} for 1 and BATCH sessions, round robin after a warm-up of each."""
    best = {1: float("inf"), BATCH: float("inf")}
    for run in range(repeats + 1):  # run 0 warms up and is not counted
        for n in best:
            seconds = decode(model, [turn] * n, 0, n)[1]
            if run:
                best[n] = min(best[n], seconds)
    return best


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/train/smollm2-chat/export", help="an exported chat model")
    ap.add_argument("--data", default="runs/data/smollm2-chat", help="prepared data: its first held-out user turn")
    ap.add_argument("--tiny", action="store_true", help="a tiny random chat model instead of --checkpoint")
    ap.add_argument("--rows", type=int, default=64, help="rows decoded per session")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (best counts)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_export(Path(tmp) / "tiny") if args.tiny else Path(args.checkpoint)
        try:
            check_export(checkpoint)
        except ExportError as e:
            raise SystemExit(f"{e} (or pass --tiny)") from None
        model, tokenizer = load_export(checkpoint)
        turn = user_turn(model, tokenizer, None if args.tiny else Path(args.data), args.rows)
        best = measure(model, turn, args.repeats)
    one = args.rows / best[1]
    rows = [[n, n * args.rows, f"{best[n]:.2f}", f"{n * args.rows / best[n]:.1f}", f"{args.rows / best[n]:.1f}",
             f"{n * args.rows / best[n] / one:.2f}x"] for n in best]
    params = sum(p.numel() for p in model.parameters())
    print(f"## Chat decoding: {'tiny random model' if args.tiny else checkpoint} ({params:,} parameters, "
          f"{model.device.type}, {next(model.parameters()).dtype}), streams {model.schema.names}, greedy\n")
    print(table(["sessions", "rows decoded", "seconds", "rows/s (aggregate)", "rows/s per session", "vs 1 session"],
                rows))
    print(f"\nUser turn: {turn.id} ({turn.user_end + 1} tokens, one per row from row 0); {args.rows} rows per "
          f"session; best of {args.repeats} runs after a warm-up; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}.")
    print(f"Total run time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
