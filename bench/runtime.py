"""`knet bench runtime`: torch eager vs onnxruntime for every student block, one run.

Both engines get the same inputs (real boundary activations) and the same thread count; the
two are timed alternately, repeat by repeat, so machine noise hits both alike and the ratio
is what to read.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import command_line, console, print_table, write_json


def _time_once(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_runtime_bench(model: str = "effnet-lite0", seed: int = 0, repeats: int = 50,
                      json_path: Path | None = None, threads: int = 2,
                      batches: tuple[int, ...] = (1, 32)) -> list[dict[str, Any]]:
    import onnxruntime as ort
    import torch

    from cloud_trainer.models.export import export_partition
    from cloud_trainer.training.train import model_inputs, trained_pair

    torch.set_num_threads(threads)
    pair = trained_pair(model, seed=seed)
    student = pair.student.eval()
    x_all = model_inputs(model, max(batches), seed=seed)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_partition(student, Path(tmp), model_id=model, model_version=1)
        sessions = {
            b.index: ort.InferenceSession(str(Path(tmp) / b.file), opts,
                                          providers=["CPUExecutionProvider"])
            for b in manifest.blocks
        }
        with torch.no_grad():
            acts = student.boundaries(torch.from_numpy(x_all))
        for batch in batches:
            for i in range(1, student.num_blocks + 1):
                xin = acts[i - 1][:batch].contiguous()
                xin_np = xin.numpy()
                block = student.block(i)
                sess = sessions[i]
                torch_fn = functools.partial(block, xin)
                ort_fn = functools.partial(sess.run, None, {"input": xin_np})
                with torch.no_grad():
                    for _ in range(3):
                        torch_fn()
                        ort_fn()
                    t_torch, t_ort = [], []
                    for _ in range(repeats):
                        t_torch.append(_time_once(torch_fn))
                        t_ort.append(_time_once(ort_fn))
                tt, to = statistics.median(t_torch), statistics.median(t_ort)
                rows.append({"batch": batch, "block": i, "torch_ms": tt * 1e3,
                             "ort_ms": to * 1e3, "speedup": tt / to})
    print_table(
        f"torch eager vs onnxruntime, {model} student, {threads} threads, median of {repeats}",
        ["batch", "block", "torch ms", "onnxruntime ms", "ort speed-up ×"],
        [(r["batch"], r["block"], r["torch_ms"], r["ort_ms"], r["speedup"]) for r in rows],
    )
    for batch in batches:
        sel = [r for r in rows if r["batch"] == batch]
        tt = sum(r["torch_ms"] for r in sel)
        to = sum(r["ort_ms"] for r in sel)
        console.print(f"batch {batch}: whole chain torch {tt:.2f} ms, onnxruntime {to:.2f} ms, "
                      f"speed-up ×{tt / to:.2f}")
    write_json(json_path, "runtime", command_line(),
               {"model": model, "threads": threads, "repeats": repeats, "rows": rows})
    return rows
