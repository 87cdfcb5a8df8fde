"""Terminal rendering of reports and listings with rich (no logic, no measurement)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deploykit.harness.evaluate import decisive_note
from deploykit.harness.intervals import interval_text
from deploykit.harness.report import Report
from deploykit.models.contract import InputContract


def human_size(size: int | None) -> str:
    """Bytes as a short human string."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def latency_cells(latency: dict[str, Any]) -> list[str]:
    """p50, p90, p99, mean±std and throughput cells."""
    return [
        f"{latency['p50_ms']:.2f}",
        f"{latency['p90_ms']:.2f}",
        f"{latency['p99_ms']:.2f}",
        f"{latency['mean_ms']:.2f} ± {latency['std_ms']:.2f}",
        f"{latency['throughput_ips']:.1f}",
    ]


def render_report(console: Console, report: Report, run_dir: str) -> None:
    """One table for a run: stage rows, then latency and fidelity rows, then the verdict."""
    threads = report.latency["threads"] if report.latency else "?"
    title = (
        f"{report.model} → {report.target} {report.precision}"
        f" (runs in {report.effective_precision}) · batch {report.input['batch']}"
        f" · {threads} threads · {report.device.get('name', report.device.get('kind'))}"
    )
    table = Table(
        title=title, title_justify="left", caption=f"run folder: {run_dir}", caption_justify="left"
    )
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("artifact")
    table.add_column("size", justify="right")
    table.add_column("details")
    for stage in report.stages:
        if stage.name in ("fidelity", "latency", "accuracy"):
            continue
        table.add_row(
            stage.name,
            f"{stage.seconds:.2f}",
            stage.artifact or "",
            human_size(stage.size_bytes),
            _stage_details(stage.name, stage.details),
        )
    seconds = {s.name: s.seconds for s in report.stages}
    table.add_section()
    if report.latency:
        lat = report.latency
        table.add_row(
            "latency",
            f"{seconds.get('latency', 0):.2f}",
            "",
            "",
            f"p50 {lat['p50_ms']:.2f} · p90 {lat['p90_ms']:.2f} · p99 {lat['p99_ms']:.2f} ms · "
            f"mean {lat['mean_ms']:.2f} ± {lat['std_ms']:.2f} · {lat['throughput_ips']:.1f} img/s"
            f" · {lat['runs']} runs",
        )
    if report.fidelity:
        fid = report.fidelity
        table.add_row(
            "fidelity",
            f"{seconds.get('fidelity', 0):.2f}",
            "",
            "",
            f"vs {report.fidelity_reference}: cosine {fid['cosine']:.6f} · rel err "
            f"{fid['rel_err']:.1e} · max abs {fid['max_abs_err']:.2g} · top-1 "
            f"{fid['top1_agreement'] * 100:.1f}% · top-5 {fid['top5_overlap'] * 100:.1f}%"
            f" · {fid['samples']} inputs",
        )
    for result in (report.accuracy or {}).values():
        table.add_row("accuracy", f"{result.get('seconds', 0):.2f}", "", "", accuracy_line(result))
    console.print(table)
    for gate in report.gates:
        console.print(_gate_line(gate.name, gate.passed, gate.detail))
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    style = "green" if report.status == "ok" else "red"
    console.print(f"status: [{style}]{report.status}[/{style}] · {run_dir}/report.json")


def accuracy_line(result: dict[str, Any]) -> str:
    """One evaluation as text: accuracy against labels and agreement with the reference."""
    reference = str(result.get("reference", "fp32"))
    ref = "fp32" if "fp32" in reference else "reference"
    text = f"{result['dataset']} ({result['samples']}): "
    if result.get("top1") is not None:
        text += (
            f"top-1 {result['top1']:.2f}% vs {ref} {result['fp32_top1']:.2f}% "
            f"(drop {result['drop']:+.2f} pt) · top-5 {result['top5']:.2f}% vs "
            f"{result['fp32_top5']:.2f}% · "
        )
    note = decisive_note(
        result.get("decisive_samples"),
        result.get("decisive_agreement"),
        int(result["samples"]),
        "fp32" if ref == "fp32" else "the reference",
    )
    text += (
        f"agrees with {reference}: top-1 {result['top1_agreement']:.1f}%{note}, "
        f"top-5 overlap {result['top5_overlap']:.1f}%, cosine ≥ {result['cosine_min']:.4f}"
    )
    text += interval_text(result.get("intervals"), result.get("interval_groups"))
    stability = result.get("stability")
    if stability:
        text += (
            f" · with itself, one grey level moved ({stability['draws']} draws): "
            f"top-1 {stability['top1_agreement']:.1f}% (worst draw "
            f"{stability['top1_agreement_min']:.1f}%), top-5 overlap "
            f"{stability['top5_overlap']:.1f}%, cosine ≥ {stability['cosine_min']:.4f}"
        )
    return text


def render_eval(console: Console, result: dict[str, Any]) -> None:
    """`deploykit eval`: one line per evaluation."""
    console.print(
        f"{result['model']} → {result['target']} {result['precision']}: "
        f"{escape(accuracy_line(result['evaluation']))}"
    )
    for gate in result.get("gates", []):
        console.print(_gate_line(gate["name"], gate["passed"], gate["detail"]))


def _gate_line(name: str, passed: bool, detail: str) -> str:
    mark = "[green]pass[/green]" if passed else "[red]FAIL[/red]"
    return f"gate {name}: {mark} ({escape(detail)})"


def render_datasets(console: Console, rows: list[dict[str, Any]]) -> None:
    """`deploykit datasets`: the shipped sets and whether their data is installed."""
    table = Table(title="calibration and evaluation sets (calibration/*.json)")
    table.add_column("name", no_wrap=True)
    for column in ("role", "inputs", "labels", "sha256", "available"):
        table.add_column(column, no_wrap=column != "available")
    for row in rows:
        table.add_row(
            row["name"],
            row["role"],
            str(row["count"]),
            row["labels"] or "-",
            row["sha256"][:12],
            "yes" if row["available"] else f"no: {escape(row['reason'])}",
        )
    console.print(table)


def _stage_details(name: str, details: dict[str, Any]) -> str:
    if name == "export":
        ok = [a for a in details.get("attempts", []) if a.get("ok")]
        failed = [a for a in details.get("attempts", []) if not a.get("ok")]
        text = f"{details.get('exporter')} opset {details.get('opset')}"
        if failed:
            text += f" (after {', '.join(a['exporter'] for a in failed)} failed)"
        if ok and details.get("checks"):
            batches = ",".join(str(c["batch"]) for c in details["checks"])
            text += f"; matches torch at batch {batches}"
        return text
    if name == "fuse":
        text = f"{details.get('nodes_before')} → {details.get('nodes_after')} nodes"
        return text if details.get("applied") else f"{text}; {details.get('note')}"
    if name == "calibrate":
        data = details.get("data", {})
        scales = "per-channel" if details.get("per_channel") else "per-tensor"
        return (
            f"{details.get('method')} {details.get('encoding')} {scales}; "
            f"{details.get('quantize_nodes')} Q/DQ pairs; {data.get('count')} inputs "
            f"from {data.get('source')}"
        )
    if name == "compile":
        return str(details.get("backend", ""))
    if name == "fidelity":
        return f"vs {details.get('reference')}"
    return ""


def render_bench(console: Console, result: dict[str, Any]) -> None:
    """Latency table for `deploykit bench`."""
    lat = result["latency"]
    table = Table(
        title=f"{result['model']} → {result['target']} {result['precision']} · batch {lat['batch']}"
        f" · {lat['threads']} threads · {result['device']['name']}",
        title_justify="left",
    )
    for col in ("p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "throughput (img/s)", "runs"):
        table.add_column(col, justify="right")
    table.add_row(*latency_cells(lat), str(lat["runs"]))
    console.print(table)


def render_bench_several(console: Console, result: dict[str, Any]) -> None:
    """Side-by-side latency of several run folders, as ratios to the first."""
    first = result["entries"][0]
    table = Table(
        title=f"{first['model']} · batch {first['batch']} · {first['threads']} threads · "
        f"{result['rounds']} interleaved rounds · {result['device']['name']}",
        title_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("target")
    for col in ("runs in", "p50 ms", "fastest round ms", "x first", "rounds' range"):
        table.add_column(col, justify="right")
    for i, entry in enumerate(result["entries"]):
        low, high = entry["ratio_range"]
        table.add_row(
            str(i + 1),
            entry["target"]
            if entry["model"] == first["model"]
            else f"{entry['model']} {entry['target']}",
            entry["effective_precision"] or entry["precision"],
            f"{entry['p50_ms']:.3f}",
            f"{entry['fastest_round_p50_ms']:.3f}",
            f"{entry['ratio']:.2f}x",
            f"{low:.2f}-{high:.2f}",
        )
    console.print(table)
    for i, entry in enumerate(result["entries"]):
        console.print(f"{i + 1}: {entry['run_dir']}", highlight=False, soft_wrap=True)


def render_models(console: Console, rows: list[dict[str, Any]]) -> None:
    """Catalogue table."""
    table = Table(title=f"{len(rows)} models (emphasis families first)", title_justify="left")
    for col in (
        "name",
        "family",
        "input",
        "resize",
        "normalisation",
        "classes",
        "params",
        "ref top-1",
    ):
        table.add_column(col)
    for row in rows:
        inp = row["input"]
        norm = InputContract.from_dict(inp).describe().split(" ", 2)[-1]
        params = f"{row['num_params'] / 1e6:.1f}M" if row.get("num_params") else ""
        top1 = f"{row['reference_top1']:.1f}" if row.get("reference_top1") else ""
        name = f"[bold]{row['name']}[/bold]" if row["emphasis"] else row["name"]
        table.add_row(
            name,
            row["family"],
            f"{inp['channels']}x{inp['height']}x{inp['width']} {inp['layout']}",
            str(inp["resize"]),
            norm,
            str(inp["num_classes"]),
            params,
            top1,
        )
    console.print(table)


def render_backends(console: Console, rows: list[dict[str, Any]]) -> None:
    """Backends table: installed or why not."""
    table = Table(title="backends", title_justify="left")
    for col in ("target", "runtime", "version", "status", "precisions", "devices"):
        table.add_column(col)
    for row in rows:
        status = "[green]available[/green]" if row["available"] else "[red]unavailable[/red]"
        table.add_row(
            row["name"],
            row["display_name"],
            row["version"] or "-",
            status,
            ", ".join(row.get("precisions", [])),
            ", ".join(row.get("devices", [])),
        )
    console.print(table)
    for row in rows:
        if not row["available"]:
            console.print(f"{row['name']}: {escape(row['reason'])}")


def render_compare(console: Console, result: dict[str, Any]) -> None:
    """Table of `deploykit compare`: p50s per model and target, speedup over torch eager."""
    dev = result["device"]
    opts = result["options"]
    table = Table(
        title=f"{dev['name']} · {opts['threads']} threads · batch {opts['batch']} · "
        f"{opts['rounds']} rounds (features: {', '.join(dev['features'])})",
        title_justify="left",
    )
    for col in (
        "model",
        "target",
        "runs in",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "spread",
        "vs torch",
        "vs fp32",
        "benchmark_app ms",
    ):
        table.add_column(col, justify="left" if col in ("model", "target") else "right")
    for row in result["rows"]:
        speed = f"{row['speedup_vs_torch']:.2f}x" if row["speedup_vs_torch"] else ""
        app = f"{row['benchmark_app_median_ms']:.2f}" if row["benchmark_app_median_ms"] else ""
        vs_fp32 = row.get("speedup_vs_fp32")
        table.add_row(
            row["model"],
            row.get("spec", row["target"]),
            row["precision"],
            f"{row['p50_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            f"{row['spread_pct']:.1f}%",
            speed,
            f"{vs_fp32:.2f}x" if vs_fp32 else "",
            app,
        )
    console.print(table)
    if result.get("paired"):
        pairs = Table(title="paired, run by run: A / B with 95% interval", title_justify="left")
        for col in ("model", "A", "B", "A ms", "B ms", "A / B", "95% interval"):
            pairs.add_column(col, justify="left" if col in ("model", "A", "B") else "right")
        for pair in result["paired"]:
            pairs.add_row(
                pair["model"],
                pair["a"],
                pair["b"],
                f"{pair['a_ms']:.3f}",
                f"{pair['b_ms']:.3f}",
                f"{pair['ratio']:.3f}",
                f"{pair['low']:.3f}-{pair['high']:.3f}",
            )
        console.print(pairs)


def render_regress(console: Console, result: dict[str, Any]) -> None:
    """Verdict table of `deploykit regress` (or what --update-baseline recorded)."""
    if result["kind"] == "regress-update":
        console.print(f"baseline {result['baseline']}: recorded {', '.join(result['updated'])}")
        for diff in result["environment_differences"]:
            console.print(f"[yellow]environment changed:[/] {diff}")
        return
    mode = "normalised by the reference workload" if result["normalised"] else "raw latencies"
    table = Table(
        title=f"regress vs {result['baseline']} · tolerance "
        f"{100 * result['options']['tolerance']:g}% · {result['rounds']} rounds · {mode}",
        title_justify="left",
    )
    for col in ("entry", "verdict", "baseline p50", "current p50", "ratio", "90% interval"):
        table.add_column(
            col,
            justify="left" if col in ("entry", "verdict") else "right",
            overflow="fold",
        )
    colours = {"ok": "green", "faster": "cyan", "slower": "red", "accuracy": "red"}
    for v in result["verdicts"]:
        colour = colours.get(v["verdict"], "yellow")
        table.add_row(
            v["key"],
            f"[{colour}]{v['verdict']}[/]",
            f"{v['baseline_p50_ms']:.2f} ms",
            f"{v['current_p50_ms']:.2f} ms",
            f"{v['ratio']:.3f}",
            f"{v['ci_low']:.3f}–{v['ci_high']:.3f}",
        )
    console.print(table)
    for v in result["verdicts"]:
        for line in v["accuracy"] + v["notes"]:
            console.print(f"{v['key']}: {line}")
    for diff in result["environment_differences"]:
        console.print(f"[yellow]warning: environment differs from the baseline:[/] {diff}")
    n = result["regressions"]
    console.print(f"[red]{n} regression(s)[/]" if n else "[green]no regression[/]")
