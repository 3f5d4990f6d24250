"""Where a training step's time goes: a profiler trace of a few steady-state
steps, summarised by category from the device kernels it ran.

A kernel is classified by its name and, where the trace carries them, the
HLO op and the JAX name scope it came from (the train step wraps the
optimizer update and the MoE routing in named scopes). XLA's fusion kernels
are named after their fusion, whose JAX op (name scope included) the
compiled module's text holds: ``hlo_op_names`` maps them, so the breakdown
attributes them even where the trace does not. Categories follow the first
matching rule; host and idle time is the steps' wall time that no device
kernel covered.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

# (category, pattern over "kernel name | hlo op | scope"), first match wins.
# Kernels kept by name in a breakdown (with their JAX ops): enough to place
# the fusions behind a category, not only the largest kernels.
TOP_KERNELS = 60
CATEGORIES = (
    ("communication", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"),
    ("optimizer update", r"optimizer"),
    ("moe routing/dispatch", r"moe_rout|moe_dispatch|routers|dispatch\.py"),
    ("moe grouped matmul", r"gmm|grouped_matmul|ragged"),
    ("attention", r"flash|fmha|sdpa|cudnn|attention|mosaic_gpu_kernel"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|\bdot\b|dot_general|matmul"),
    ("norms", r"norm"),
    ("copies", r"memcpy|memset|copy"),
    ("elementwise/other", r"."),
)


def _device_events(trace: dict) -> list[dict]:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if "/device:" in name}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in device]


# A fusion instruction of a compiled module's text: its name and JAX op.
_FUSION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\bfusion\(.*?'
                     r'metadata=\{op_name="([^"]+)"')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Fusion name -> the JAX op it came from, from Compiled.as_text(); each
    name also as GPU kernels spell it ('.' as '_')."""
    names = {}
    for line in hlo_text.splitlines():
        match = _FUSION.match(line)
        if match:
            name, op = match.groups()
            names[name] = names[name.replace(".", "_")] = op
    return names


def classify(event: dict, op: str = "") -> str:
    """The event's category; ``op``: its JAX op where known (hlo_op_names)."""
    args = event.get("args", {})
    text = " | ".join(str(v) for v in (event.get("name", ""), args.get("hlo_op", ""),
                                       args.get("long_name", ""), args.get("tf_op", ""), op))
    return next(cat for cat, rx in CATEGORIES if re.search(rx, text, re.I))


def breakdown(trace: dict, steps: int, op_names: dict[str, str] | None = None) -> dict:
    """{"per_step_ms": {category: ms}, "top_kernels": [(name, ms)],
    "kernel_ops": {name: JAX op}, ...} from a trace of `steps` steps;
    op_names: hlo_op_names of the traced module. A step's time is the device
    timeline's span (first kernel start to last kernel end) over the steps,
    so starting and stopping the profiler does not count."""
    op_names = op_names or {}
    events = _device_events(trace)
    per_cat, per_kernel, busy = {}, {}, 0.0
    span_us = (max(e["ts"] + e.get("dur", 0) for e in events) - min(e["ts"] for e in events)
               if events else 0.0)
    for e in events:
        ms = e.get("dur", 0) / 1e3 / steps
        cat = classify(e, op_names.get(e["name"], ""))
        per_cat[cat] = per_cat.get(cat, 0.0) + ms
        per_kernel[e["name"]] = per_kernel.get(e["name"], 0.0) + ms
        busy += ms
    step_ms = span_us / 1e3 / steps
    per_cat["host/idle"] = max(step_ms - busy, 0.0)
    order = sorted(per_cat.items(), key=lambda kv: -kv[1])
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"step_ms": step_ms, "device_busy_ms": busy,
            "per_step_ms": {k: round(v, 3) for k, v in order},
            "top_kernels": [(k[:100], round(v, 3)) for k, v in top],
            "kernel_ops": {k[:100]: op_names[k] for k, _ in top if k in op_names}}


def read_trace(trace_dir: Path) -> dict:
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        return json.load(f)


def format_table(result: dict) -> str:
    step = result["step_ms"]
    lines = [f"step {step:.1f} ms, device busy {result['device_busy_ms']:.1f} ms",
             f"{'category':<24}{'ms/step':>10}{'share':>8}"]
    for cat, ms in result["per_step_ms"].items():
        lines.append(f"{cat:<24}{ms:>10.2f}{100 * ms / max(step, 1e-9):>7.1f}%")
    lines.append(f"{'kernel':<44}{'ms/step':>10}  JAX op")
    ops = result.get("kernel_ops", {})
    for name, ms in result.get("top_kernels", [])[:12]:
        lines.append(f"{name[:44]:<44}{ms:>10.2f}  {ops.get(name, '')[-70:]}")
    return "\n".join(lines)
