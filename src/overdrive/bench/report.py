"""bench.json, bench.md (the seed tables' shape: rows = global batch size, columns = systems) and bench.png.

Every number shown is computed from the rows of bench.json by the functions here, so the three files always
agree; failed cells are shown by status (OOM, timeout, error), never as zero.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from overdrive.atomic import write_bytes, write_json, write_text

BASELINE = "hf-trainer"
STATUS_LABEL = {"oom": "OOM", "timeout": "timeout", "error": "error", "skipped": "skipped"}


def ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and bool(row.get("tokens_per_sec_per_device"))


def systems_of(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["system"] for r in rows))


def batch_sizes_of(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({r["global_batch_size"] for r in rows})


def cell(rows: list[dict[str, Any]], system: str, g: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["system"] == system and r["global_batch_size"] == g), None)


def best(rows: list[dict[str, Any]], pred: Any) -> dict[str, Any] | None:
    good = [r for r in rows if pred(r) and ok(r)]
    return max(good, key=lambda r: r["tokens_per_sec_per_device"]) if good else None


def summarize(bench: dict[str, Any]) -> dict[str, Any]:
    """Per-row ratios to HF Trainer at the same batch, best-vs-best ratios, first-loss agreement."""
    rows = bench["rows"]
    for r in rows:
        base = cell(rows, BASELINE, r["global_batch_size"])
        both = ok(r) and base is not None and ok(base)
        r["ratio_vs_hf_trainer"] = (
            r["tokens_per_sec_per_device"] / base["tokens_per_sec_per_device"] if both else None
        )
    hf = best(rows, lambda r: r["system"] == BASELINE)
    ds = best(rows, lambda r: r["system"] == "hf-deepspeed")
    od = best(rows, lambda r: r.get("kind", r["system"]) == "overdrive")

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        return a["tokens_per_sec_per_device"] / b["tokens_per_sec_per_device"] if a and b else None

    def brief(r: dict[str, Any] | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {k: r[k] for k in ("system", "global_batch_size", "tokens_per_sec_per_device")}

    agreement = {}
    for g in batch_sizes_of(rows):
        base = cell(rows, BASELINE, g)
        if base is None or not base.get("first_losses"):
            continue
        diffs = {}
        for r in rows:
            if r["global_batch_size"] == g and r["system"] != BASELINE and r.get("first_losses"):
                pairs = list(zip(r["first_losses"], base["first_losses"], strict=False))
                diffs[r["system"]] = max(abs(a - b) for a, b in pairs) if pairs else None
        agreement[str(g)] = diffs
    return {
        "best": {"hf-trainer": brief(hf), "hf-deepspeed": brief(ds), "overdrive": brief(od)},
        "overdrive_best_over_hf_trainer_best": ratio(od, hf),
        "overdrive_best_over_hf_deepspeed_best": ratio(od, ds),
        "max_first_loss_diff_vs_hf_trainer": agreement,
    }


# ---------------------------------------------------------------------------------------------- markdown
def fmt_status(row: dict[str, Any] | None) -> str | None:
    if row is None:
        return "—"
    if not ok(row):
        return STATUS_LABEL.get(row.get("status", "error"), row.get("status", "error"))
    return None


def fmt_num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], render: Any, header: str = "Global Batch Size") -> list[str]:
    systems = systems_of(rows)
    out = [f"| {header} | " + " | ".join(systems) + " |", "| --- |" + " --- |" * len(systems)]
    for g in batch_sizes_of(rows):
        cells = []
        for s in systems:
            r = cell(rows, s, g)
            cells.append(fmt_status(r) or render(r))
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    return out


def closeness_note(precision: str) -> str:
    if precision == "auto":
        return (
            "precision auto: each system runs the precision it chose (see Precision above), so losses agree to "
            "about 1e-2 between systems on different precisions and to about 1e-5 between fp32 ones."
        )
    if precision == "fp32":
        return (
            "fp32: same rows, same initial weights and the same optimizer settings, so the losses should agree to "
            "about 1e-5 (only reduction order and fused-vs-foreach AdamW differ)."
        )
    return (
        f"{precision} autocast: the same computation with bf16/fp16 matmuls whose rounding differs between "
        "eager, fused and compiled kernels, so expect agreement to about 1e-2 (step 1 closest). DeepSpeed's "
        "bf16 mode keeps bf16 weights (not autocast over fp32 weights) and its AdamW also decays norm weights, so "
        "it drifts more."
    )


def render_markdown(bench: dict[str, Any]) -> str:
    rows, w, env = bench["rows"], bench["workload"], bench["environment"]
    model, summary = bench["model"], bench.get("summary") or summarize(bench)
    title = w.get("preset") or w["model_config"]
    lines = [
        f"# overdrive bench: {title}",
        "",
        f"Model `{w['model_config']}` ({model['num_params'] / 1e6:.1f}M params, vocab {model['vocab_size']}), "
        f"sequence {w['seq_len']}, precision {w['precision']}, attention {w['attn_implementation']}; "
        f"{w['warmup_steps']} warm-up + {w['steps']} measured optimizer steps per cell; --nproc {w['nproc']} "
        f"(each cell's processes: Runs table) on {env['device_name']} ({env['device']}); "
        f"data: {bench['data']['source']}.",
        "",
        "## Throughput (tokens/s/device)",
        "",
        *table(rows, lambda r: f"{r['tokens_per_sec_per_device']:,.1f}"),
        "",
    ]
    ratio = summary.get("overdrive_best_over_hf_trainer_best")
    b = summary["best"]
    if ratio is not None:
        lines.append(
            f"**overdrive best / HF Trainer best = {ratio:.2f}×** ({b['overdrive']['system']} at global batch "
            f"{b['overdrive']['global_batch_size']}: {b['overdrive']['tokens_per_sec_per_device']:,.1f} vs "
            f"hf-trainer at {b['hf-trainer']['global_batch_size']}: "
            f"{b['hf-trainer']['tokens_per_sec_per_device']:,.1f} tokens/s/device)"
        )
    else:
        lines.append("overdrive best / HF Trainer best = n/a (a side has no successful cell)")
    ds_ratio = summary.get("overdrive_best_over_hf_deepspeed_best")
    if ds_ratio is not None:
        lines.append(f"\noverdrive best / HF DeepSpeed ZeRO-3 best = {ds_ratio:.2f}×")
    lines += precision_lines(rows, w["precision"])
    lines += ["", *seed_table(rows, w)]
    lines += [
        "",
        "## Ratio to HF Trainer at the same global batch",
        "",
        *table(
            rows,
            lambda r: (
                fmt_num(r.get("ratio_vs_hf_trainer"), ".2f") + ("×" if r.get("ratio_vs_hf_trainer") else "")
            ),
        ),
        "",
        "## TFLOPs/device (6·N + 12·L·d·S FLOPs per token) and MFU",
        "",
        *table(
            rows,
            lambda r: (
                fmt_num(r.get("tflops_per_device"), ".3f")
                + (f" ({r['mfu'] * 100:.1f}% MFU)" if r.get("mfu") is not None else "")
            ),
        ),
        "",
    ]
    if model.get("peak_tflops_per_device") is None:
        lines += ["MFU: n/a (no known bf16 peak for this device).", ""]
    mem_kind = (
        "CUDA allocator high-water mark" if w["device"] == "cuda" else "peak RSS of the (rank 0) process"
    )
    lines += [
        f"## Peak memory (GiB, {mem_kind})",
        "",
        *table(
            rows,
            lambda r: fmt_num(
                (r["peak_memory_bytes"] or 0) / 2**30 if r.get("peak_memory_bytes") else None, ".2f"
            ),
        ),
        "",
        "## First losses (same rows in the same order, same initial weights)",
        "",
        closeness_note(w["precision"]),
        "",
    ]
    lines += first_loss_tables(rows, summary)
    lines += [
        "## Cells",
        "",
        "| system | global batch | micro × accum × procs | status | measured s | wall s | CPU s | load | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        shape = " × ".join(str(r.get(k) or "—") for k in ("micro_batch_size", "accumulation_steps", "nproc"))
        note = (r.get("message") or "").replace("|", "\\|")[:160]
        if r.get("distributed_type"):
            note = f"accelerate: {r['distributed_type']}" + (f"; {note}" if note else "")
        lines.append(
            f"| {r['system']} | {r['global_batch_size']} | {shape} | {r['status']} | "
            f"{fmt_num(r.get('measured_sec'), '.2f')} | {fmt_num(r.get('wall_sec'), '.1f')} | "
            f"{fmt_num(r.get('cpu_sec'), '.1f')} | {fmt_num(r.get('load_avg_before'), '.1f')} | {note} |"
        )
    v = env["versions"]
    lines += [
        "",
        "## Environment",
        "",
        f"- device: {env['device_name']}; CPU: {env['cpu']}, {env['cpu_cores']} cores; threads per process "
        f"(OMP/MKL, all systems): {w.get('threads') or 'library default'}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- python {env['python']} on {env['platform']}; started {bench.get('started')}, bench wall "
        f"{bench.get('wall_sec', '—')} s",
        f"- bench command: `{env['argv']}`",
        "- load average (1 min) around each cell is in bench.json (`load_avg_before/after`): on a shared machine "
        "it tells how noisy a number is.",
        "",
        "<details><summary>Exact cell commands</summary>",
        "",
        *[f"- {r['system']} @ {r['global_batch_size']}: `{r['command']}`" for r in rows if r.get("command")],
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def precision_lines(rows: list[dict[str, Any]], precision: str) -> list[str]:
    """With precision auto: which precision won each HF cell (both were run) and what overdrive's auto chose."""
    if precision != "auto":
        return []
    out = [
        "",
        "## Precision (auto)",
        "",
        "HF systems: best of fp32/bf16 — every HF cell ran at both and shows the faster; overdrive: "
        "`--precision auto` (and `--strategy auto` unless the column names a strategy).",
        "",
    ]
    for r in rows:
        where = f"- {r['system']} @ {r['global_batch_size']}"
        if r.get("precision_runs"):
            rates = ", ".join(f"{p} {precision_rate(v)}" for p, v in r["precision_runs"].items())
            won = r.get("precision") if ok(r) else "neither"
            out.append(f"{where}: best of fp32/bf16 = {won} ({rates})")
        elif r.get("strategy_choice"):
            c = r["strategy_choice"]
            out.append(f"{where}: auto chose {c['describe']}, {c['precision']} ({c['reason']})")
    return out


def precision_rate(run: dict[str, Any]) -> str:
    if run.get("status") != "ok":
        return str(run.get("status"))
    return f"{fmt_num(run.get('tokens_per_sec_per_device'), ',.1f')} tokens/s/device"


def method(row: dict[str, Any]) -> str:
    """The row's name in the seed-shaped table: the column, with its strategy when the name does not say it."""
    strategy = row.get("strategy")
    label = (
        Path(strategy).stem
        if strategy and ("/" in strategy or strategy.endswith((".yaml", ".yml")))
        else strategy
    )
    return row["system"] if not label or row["system"].endswith(label) else f"{row['system']} ({label})"


def sec_per_iter(row: dict[str, Any]) -> float | None:
    """Seconds per optimizer step over the measured steps (older bench.json rows: from measured_sec)."""
    if row.get("sec_per_iter") is not None:
        return row["sec_per_iter"]
    if row.get("measured_sec") and row.get("measured_steps"):
        return row["measured_sec"] / row["measured_steps"]
    return None


SEED_HEADER = (
    "Method",
    "tp",
    "pp",
    "micro batch",
    "grad accumulation",
    "global batch",
    "seq",
    "processes",
    "pipeline bubble (schedule model)",
    "memory (peak per device, GiB)",
    "sec/iter",
    "tokens/s/device",
)


BUBBLE_NOTE = (
    "pipeline bubble: the idle share of a pipeline step in its schedule's textbook model (equal stage times), "
    "(P-1)/V / (M + (P-1)/V) for P stages, V virtual stages per rank and M micro-batches per step (the grad "
    "accumulation column) — a model value, not a measurement (an upper bound for the zero-bubble schedules); "
    "- for cells without a pipeline."
)


def fmt_bubble(row: dict[str, Any]) -> str:
    """`0.333 (1f1b)` for a pipeline cell, `-` for the others (rows of older bench.json files included)."""
    bubble = row.get("pipeline_bubble")
    if bubble is None:
        return "-"
    virtual = row.get("virtual_stages") or 1
    schedule = row.get("pipeline_schedule") or "?"
    return f"{bubble:.3f} ({schedule}" + (f", V={virtual})" if virtual > 1 else ")")


def seed_table(rows: list[dict[str, Any]], w: dict[str, Any]) -> list[str]:
    """One line per cell in the seed 004 table's shape (Method | tp | pp | mbs | grad acc | global bs | seq |
    memory | sec/iter | tokens/s/device) plus the pipeline bubble, batch-major; failed cells show their status."""
    where = "CUDA allocator high-water mark" if w["device"] == "cuda" else "peak RSS"
    out = [
        "## Runs (seed 004 columns)",
        "",
        f"memory: {where} of rank 0 (the rank that logs); sec/iter: measured seconds per optimizer step. "
        f"{BUBBLE_NOTE}",
        "",
        "| " + " | ".join(SEED_HEADER) + " |",
        "| --- |" + " ---: |" * (len(SEED_HEADER) - 1),
    ]
    order = {s: i for i, s in enumerate(systems_of(rows))}
    for r in sorted(rows, key=lambda r: (r["global_batch_size"], order[r["system"]])):
        mem = r.get("peak_memory_bytes")
        cells = [
            method(r),
            r.get("tp", 1),
            r.get("pp", 1),
            r.get("micro_batch_size", "—"),
            r.get("accumulation_steps", "—"),
            r["global_batch_size"],
            r.get("seq_len", w["seq_len"]),
            r.get("nproc", "—"),
            fmt_bubble(r),
            fmt_num(mem / 2**30 if mem and ok(r) else None, ".2f"),
            fmt_num(sec_per_iter(r) if ok(r) else None, ".3f"),
            fmt_status(r) or f"{r['tokens_per_sec_per_device']:,.1f}",
        ]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def first_loss_tables(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for g in batch_sizes_of(rows):
        here = [r for r in rows if r["global_batch_size"] == g and r.get("first_losses")]
        if not here:
            continue
        n = max(len(r["first_losses"]) for r in here)
        out += [f"Global batch {g}:", "", "| step | " + " | ".join(r["system"] for r in here) + " |"]
        out.append("| --- |" + " --- |" * len(here))
        for i in range(n):
            vals = [f"{r['first_losses'][i]:.5f}" if i < len(r["first_losses"]) else "—" for r in here]
            out.append(f"| {i + 1} | " + " | ".join(vals) + " |")
        diffs = summary.get("max_first_loss_diff_vs_hf_trainer", {}).get(str(g), {})
        if diffs:
            out.append(
                "| max abs diff vs hf-trainer | "
                + " | ".join("—" if r["system"] not in diffs else f"{diffs[r['system']]:.2e}" for r in here)
                + " |"
            )
        out.append("")
    return out


def cell_summary(row: dict[str, Any]) -> str:
    if row.get("status") == "skipped":
        return f"skipped: {row.get('message') or ''}"
    if ok(row):
        mem = row.get("peak_memory_bytes")
        mem_text = f", peak {mem / 2**30:.2f} GiB" if mem else ""
        return f"{row['tokens_per_sec_per_device']:,.1f} tokens/s/device{mem_text} (cell {row['wall_sec']:.0f} s)"
    return f"{row['status']}: {row.get('message') or ''} (cell {row['wall_sec']:.0f} s)"


# ------------------------------------------------------------------------------------------------- chart
def render_png(bench: dict[str, Any]) -> bytes:
    """Grouped bars: one group per global batch size, one bar per system; failed cells labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = bench["rows"]
    systems, sizes = systems_of(rows), batch_sizes_of(rows)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(sizes) * max(len(systems), 1) / 2), 4.5))
    top = max((r["tokens_per_sec_per_device"] for r in rows if ok(r)), default=1.0)
    for j, s in enumerate(systems):
        xs, heights = [], []
        for i, g in enumerate(sizes):
            x = i + (j - (len(systems) - 1) / 2) * width
            r = cell(rows, s, g)
            if r is not None and ok(r):
                xs.append(x)
                heights.append(r["tokens_per_sec_per_device"])
                ax.text(
                    x,
                    r["tokens_per_sec_per_device"],
                    f"{r['tokens_per_sec_per_device']:,.0f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            else:
                label = fmt_status(r) if r is not None else "—"
                ax.text(
                    x, top * 0.02, label, ha="center", va="bottom", fontsize=8, rotation=90, color="tab:red"
                )
        ax.bar(xs, heights, width=width, color=f"C{j}")
    ax.set_xticks(range(len(sizes)), [str(g) for g in sizes])
    ax.set_xlabel("global batch size")
    ax.set_ylabel("tokens/s/device")
    w, env = bench["workload"], bench["environment"]
    ax.set_title(
        f"{w.get('preset') or w['model_config']}, seq {w['seq_len']}, {w['precision']} — {env['device_name']}",
        fontsize=9,
    )
    ax.set_ylim(0, top * 1.15)
    from matplotlib.patches import Patch

    # explicit handles: a system whose every cell failed has no bars to take a legend colour from
    ax.legend(handles=[Patch(color=f"C{j}", label=s) for j, s in enumerate(systems)], fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("overdrive", "torch", "transformers", "accelerate", "deepspeed", "datasets", "flash-attn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str) -> dict[str, Any]:
    """What the numbers depend on: device, cores, versions."""
    import os
    import platform
    import shlex
    import sys

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": device,
        "device_name": gpus[0] if (device == "cuda" and gpus) else cpu,
        "gpus": gpus,
        "cpu": cpu,
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "argv": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_json_only(bench: dict[str, Any], output_dir: Path) -> None:
    write_json(output_dir / "bench.json", bench)


def write_all(bench: dict[str, Any], output_dir: Path) -> None:
    """bench.json, bench.md and bench.png, each replaced atomically."""
    if "summary" not in bench:
        bench["summary"] = summarize(bench)
    write_json(output_dir / "bench.json", bench)
    write_text(output_dir / "bench.md", render_markdown(bench))
    write_bytes(output_dir / "bench.png", render_png(bench))
