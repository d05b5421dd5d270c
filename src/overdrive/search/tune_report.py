"""What `overdrive tune` leaves behind: tune.md, tune.json, tune.png and best.yaml (all written atomically)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from overdrive.atomic import write_bytes, write_json, write_text

MIB = 2**20


def trial_dict(t: Any, seq: int, global_batch: int, world: int) -> dict[str, Any]:
    """One trial: the point, the strategy it ran, the plan's prediction and the measurement."""
    from overdrive.search.tune import predicted_tokens_per_sec, spec_for

    c, r = t.candidate, t.result
    return {
        "number": t.number + 1,
        "source": t.source,
        "params": t.point.params(),
        "strategy": spec_for(c, world).strategy.to_dict(),
        "describe": c.strategy.describe(),
        "precision": c.precision,
        "micro_batch_size": c.micro,
        "grad_accumulation": c.accum,
        "status": r.status,
        "error": r.error,
        "tokens_per_sec": r.tokens_per_sec,
        "step_tokens_per_sec": r.step_rates,
        "peak_memory_bytes": r.peak_memory_bytes,
        "predicted_tokens_per_sec": predicted_tokens_per_sec(c, seq, global_batch, world),
        "predicted_peak_bytes": c.memory.live,
        "predicted_reserved_bytes": c.memory.reserved,
        "seconds": r.seconds,
        "run_dir": r.run_dir,
    }


def tune_result(winner: Any, rate: float, meta: dict[str, Any]) -> dict[str, Any]:
    """What the cache stores and `--strategy auto` reads; `rate`: the winner's median over its runs."""
    from overdrive.search.tune import predicted_tokens_per_sec, spec_for

    seq, gb, world = meta["seq"], meta["global_batch_size"], meta["world"]
    c = winner.candidate
    return {
        "strategy": spec_for(c, world).strategy.to_dict(),
        "precision": c.precision,
        "micro_batch_size": c.micro,
        "tokens_per_sec": rate,
        "peak_memory_bytes": winner.result.peak_memory_bytes,
        "predicted_tokens_per_sec": predicted_tokens_per_sec(c, seq, gb, world),
        "describe": winner.point.describe(),
        "params": winner.point.params(),
        "verified": any(v["verdict"] == "pass" for v in meta["verify"]) if meta["verify"] else None,
        "seq": seq,
        "global_batch_size": gb,
        "world": world,
        "device": meta["device"],
        "model_shape": meta["model_shape"],
        "trials": meta.get("trials_run"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": "overdrive tune",
    }


def write_outputs(out: Path, history: list[Any], winner: Any, meta: dict[str, Any]) -> dict[str, Any] | None:
    """All four files (best.yaml only with a winner); returns the cache record, or None without a winner."""
    meta = {**meta, "trials_run": len(history)}
    seq, gb, world = meta["seq"], meta["global_batch_size"], meta["world"]
    trials = [trial_dict(t, seq, gb, world) for t in history]
    from overdrive.search.tune import point_rate

    result = tune_result(winner, point_rate(history, winner.point), meta) if winner is not None else None
    write_json(out / "tune.json", {**meta, "best": result, "trials": trials})
    write_text(out / "tune.md", markdown(trials, result, meta))
    try:
        plot(trials, out / "tune.png")
    except Exception as exc:  # noqa: BLE001 - a plot must never cost the tune result
        print(f"overdrive: warning: tune.png not written ({type(exc).__name__}: {exc})")
    if result is not None:
        write_text(out / "best.yaml", best_yaml(winner, result))
    return result


def best_yaml(winner: Any, result: dict[str, Any]) -> str:
    """A strategy file `overdrive train --strategy best.yaml` accepts; precision is a run flag, noted on top."""
    from overdrive.parallel.strategy import Strategy

    strategy = Strategy.from_dict(result["strategy"])
    verified = {True: "passed overdrive verify", False: "FAILED overdrive verify", None: "not verified"}
    header = [
        f"# overdrive tune {result['created']}: {winner.point.describe()}",
        f"# measured {result['tokens_per_sec']:,.0f} tokens/s on {result['world']} × {result['device']} "
        f"(seq {result['seq']}, global batch {result['global_batch_size']}); {verified[result['verified']]}",
        f"# train with: overdrive train --strategy best.yaml --precision {result['precision']} "
        f"--global-batch-size {result['global_batch_size']}"
        + (f" (torchrun --nproc-per-node {result['world']})" if result["world"] > 1 else ""),
        f"# micro_batch_size {result['micro_batch_size']} is pinned below",
    ]
    return "\n".join(header) + "\n" + strategy.to_yaml()


def _fmt(value: float | None, scale: float = 1.0, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value / scale, spec)


def markdown(trials: list[dict[str, Any]], result: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    cpu = meta["device"] == "cpu"
    lines = [
        f"# overdrive tune: {meta['model']}, seq {meta['seq']}, global batch {meta['global_batch_size']}, "
        f"{meta['world']} × {meta['device']}",
        "",
        f"{meta['trials_run']} trials of {meta['trials_requested']} requested (sampler seed "
        f"{meta['sampler_seed']}); {meta['feasible_points']} of {meta['space_points']} points fit by the plan; "
        f"{meta['elapsed_sec']:.0f} s.",
        "",
        "Throughput: median per-step tokens/s after warm-up (all ranks); rows from `confirm` re-measure the "
        "leading points in turn, and a point's rate is the median of its runs. "
        "Memory: predicted live peak per rank vs "
        + (
            "the measured process RSS high-water mark (rank 0; RSS also holds the Python/torch runtime)."
            if cpu
            else "the measured `max_memory_allocated` (rank 0)."
        ),
        "Status other than ok is infeasible (never scored as 0 tokens/s).",
        "",
        "| # | from | strategy | prec | micro×acc | pred MiB | meas MiB | pred tok/s | meas tok/s | status | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        status = t["status"] if t["status"] == "ok" else f"**{t['status']}**: {t['error']}"
        lines.append(
            f"| {t['number']} | {t['source']} | {t['describe']} | {t['precision']} | "
            f"{t['micro_batch_size']}×{t['grad_accumulation']} | {_fmt(t['predicted_peak_bytes'], MIB)} | "
            f"{_fmt(t['peak_memory_bytes'], MIB)} | {_fmt(t['predicted_tokens_per_sec'])} | "
            f"{_fmt(t['tokens_per_sec'])} | {status} | {t['seconds']:.0f} |"
        )
    lines.append("")
    if result is None:
        lines.append("**No winner**: no trial finished, or none of the fastest passed `overdrive verify`.")
    else:
        lines.append(
            f"**Best**: {result['describe']} — {result['tokens_per_sec']:,.0f} tokens/s (median of its runs), written to `best.yaml`; "
            f"train with `--precision {result['precision']}`."
        )
    for check in meta["verify"]:
        lines.append(f"- verify trial {check['trial'] + 1}: {check['verdict']} — {check['line']}")
    if not meta["verify"]:
        lines.append("- the winner was not verified (`--no-verify`)" if result else "")
    return "\n".join(lines).rstrip() + "\n"


def plot(trials: list[dict[str, Any]], path: Path) -> None:
    """Throughput per trial (infeasible ones as red crosses on the axis) and the best-so-far line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ok = [t for t in trials if t["tokens_per_sec"]]
    ax.scatter([t["number"] for t in ok], [t["tokens_per_sec"] for t in ok], label="trial", zorder=3)
    bad = [t for t in trials if not t["tokens_per_sec"]]
    if bad:
        ax.scatter([t["number"] for t in bad], [0] * len(bad), marker="x", color="red", label="infeasible")
    best, line = 0.0, []
    for t in trials:
        best = max(best, t["tokens_per_sec"] or 0.0)
        line.append(best if best else None)
    ax.step([t["number"] for t in trials], line, where="post", color="tab:green", label="best so far")
    ax.set(xlabel="trial", ylabel="tokens/s", title="overdrive tune")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
