"""Peak memory of per-token log-probs: naive log-softmax-then-gather vs ``grpo.token_logprobs``.

    python benchmarks/logprob_memory.py                       # 64 x 128 x 32000, float32 and bf16 logits
    python benchmarks/logprob_memory.py --batch 16 --length 64 --vocab 8000 --dtypes float32

Each measurement runs in a fresh subprocess that allocates the logits in place (no temporaries), then records
the peak *extra* memory of one call: on CPU the peak resident set size during the call (Linux ``VmHWM``, reset
just before the call through ``/proc/self/clear_refs``) minus the resident set size before it, with glibc's
``MALLOC_MMAP_THRESHOLD_`` at 1 MiB so that freed tensors leave the resident set at once; on CUDA ``max_memory_allocated`` minus ``memory_allocated``. ``--grad`` makes the logits require grad,
so what autograd saves for backward counts too (as in a training forward). Values of both methods are
compared in the parent process (max absolute difference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("naive", "ours")


def naive_logprobs(logits: Any, targets: Any) -> Any:
    """The naive version: a float32 ``[B, L, V]`` log-softmax, then gather."""
    import torch

    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L]


def run_method(method: str, logits: Any, targets: Any, chunk_size: int = 8) -> Any:
    """``[B, L]`` log-probs by ``method`` (``naive`` or ``ours``)."""
    from rerule_lightning.primitives.logprobs import token_logprobs

    if method == "naive":
        return naive_logprobs(logits, targets)
    return token_logprobs(logits, targets, chunk_size=chunk_size)


def _child(args: dict[str, Any]) -> dict[str, Any]:
    """Inside the fresh process: allocate, measure one call, return bytes."""
    import torch

    torch.set_num_threads(1)
    device = args["device"]
    dtype = getattr(torch, args["dtype"])
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(args["batch"], args["length"], args["vocab"], dtype=dtype, device=device)  # [B, L, V]
    logits.normal_(generator=gen)
    targets = torch.randint(0, args["vocab"], (args["batch"], args["length"]), generator=gen, device=device)  # [B, L]
    logits.requires_grad_(args["grad"])
    run_method(args["method"], logits[:1, :1], targets[:1, :1], args["chunk_size"])  # lazy imports / kernel init
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run_method(args["method"], logits, targets, args["chunk_size"])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = _reset_peak_rss()
        out = run_method(args["method"], logits, targets, args["chunk_size"])
        peak = _peak_rss()
    assert out.shape == targets.shape
    return {"extra_bytes": max(peak - base, 0), "logits_bytes": logits.numel() * logits.element_size()}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> int:
    """Current RSS in bytes, with the kernel's peak-RSS mark (VmHWM) reset to it where Linux allows."""
    import psutil

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """Peak RSS in bytes since :func:`_reset_peak_rss` (VmHWM), else ``ru_maxrss`` (which a child inherits
    from its parent's RSS at fork, hence VmHWM first)."""
    import resource

    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(method: str, batch: int, length: int, vocab: int, dtype: str = "float32", grad: bool = False,
            chunk_size: int = 8, device: str = "cpu", wait: bool = True) -> Any:
    """Peak extra bytes of one call of ``method`` on fresh ``[batch, length, vocab]`` logits, in a subprocess.

    Returns:
        The result dict (``extra_bytes``, ``logits_bytes``), or the ``Popen`` when ``wait`` is false
        (pass it to :func:`collect`).
    """
    spec = json.dumps({"method": method, "batch": batch, "length": length, "vocab": vocab, "dtype": dtype,
                       "grad": grad, "chunk_size": chunk_size, "device": device})
    # glibc: serve every allocation >= 1 MiB by mmap, so freed tensors leave the resident set at once and the
    # peak RSS tracks live tensors (as CUDA's max_memory_allocated does), not heap fragmentation
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return collect(proc) if wait else proc


def collect(proc: subprocess.Popen) -> dict[str, Any]:
    """The result of a :func:`measure` subprocess."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({proc.returncode}): {err.strip()[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def compare(batch: int, length: int, vocab: int, dtype: str = "float32", grad: bool = False, chunk_size: int = 8,
            device: str = "cpu") -> dict[str, Any]:
    """Both methods measured concurrently in two fresh processes; ``ratio`` = ours / naive."""
    procs = {m: measure(m, batch, length, vocab, dtype, grad, chunk_size, device, wait=False) for m in METHODS}
    res = {m: collect(p) for m, p in procs.items()}
    return {"naive": res["naive"]["extra_bytes"], "ours": res["ours"]["extra_bytes"],
            "logits": res["ours"]["logits_bytes"], "ratio": res["ours"]["extra_bytes"] / max(res["naive"]["extra_bytes"], 1)}


def max_abs_diff(batch: int, length: int, vocab: int, dtype: str = "float32", device: str = "cpu") -> float:
    """Largest |naive − ours| over the same random logits (seed 0)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(batch, length, vocab, dtype=getattr(torch, dtype), device=device)  # [B, L, V]
    logits.normal_(generator=gen)
    targets = torch.randint(0, vocab, (batch, length), generator=gen, device=device)  # [B, L]
    with torch.no_grad():
        ours = run_method("ours", logits, targets)  # [B, L]
        naive = run_method("naive", logits, targets)  # [B, L]
    return float((ours - naive).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--chunk_size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--output", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    gb = 1e9
    lines = ["| logits dtype | autograd | naive extra (GB) | ours extra (GB) | ours / naive | max abs diff |",
             "|---|---|---|---|---|---|"]
    results = []
    for dtype in args.dtypes:
        diff = max_abs_diff(args.batch, args.length, args.vocab, dtype, args.device)
        for grad in (False, True):
            r = compare(args.batch, args.length, args.vocab, dtype, grad, args.chunk_size, args.device)
            results.append({"dtype": dtype, "grad": grad, "max_abs_diff": diff, **r})
            lines.append(f"| {dtype} | {'yes' if grad else 'no'} | {r['naive'] / gb:.3f} | {r['ours'] / gb:.3f} | "
                         f"{r['ratio']:.3f} | {diff:.1e} |")
    print(f"{args.batch} x {args.length} x {args.vocab} logits on {args.device}, chunk_size {args.chunk_size}; "
          f"float32 logits = {args.batch * args.length * args.vocab * 4 / gb:.3f} GB")
    print("\n".join(lines))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"shape": [args.batch, args.length, args.vocab], "device": args.device, "results": results}, f,
                      indent=2)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    sys.exit(main())
