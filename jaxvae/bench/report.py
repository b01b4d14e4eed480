"""The harness report as markdown, and its JAX/torch and fused/naive ratios."""

from jaxvae.base.table import Table, cell


def ratios(rows) -> list:
    """JAX/torch per op and batch, and fused/naive per framework, from the report rows."""
    by = {(r["framework"], r["op"], r["batch_size"]): r for r in rows}
    out = []
    for (fw, op, bs), r in sorted(by.items()):
        if fw == "jax" and ("torch", op, bs) in by:
            out.append({"kind": "jax/torch", "op": op, "batch_size": bs,
                        "ratio": r["images_per_s"] / by["torch", op, bs]["images_per_s"]})
        if op == "grad_maps_fused" and (fw, "grad_maps_naive", bs) in by:
            out.append({"kind": "fused/naive", "framework": fw, "batch_size": bs,
                        "ratio": r["images_per_s"] / by[fw, "grad_maps_naive", bs]["images_per_s"]})
    return out


def markdown(report, op_order) -> str:
    """The report as a markdown table (one line per op and batch size, ops in `op_order`)."""
    rows = {(r["framework"], r["op"], r["batch_size"]): r for r in report["rows"]}
    keys = sorted({(op, bs) for _, op, bs in rows}, key=lambda k: (k[1], op_order.index(k[0])))
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['jax_backend']})"
             + (f", torch {m['torch']} ({m.get('torch_threads')} threads)" if "torch" in m
                else "")
             + f"; load avg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; "
             f"peak f32 matmul {report['peak_gflops']:.1f} GFLOP/s.", ""]
    table = []
    for op, bs in keys:
        j, t = rows.get(("jax", op, bs)), rows.get(("torch", op, bs))
        g = lambda r, k, s: cell(r[k] if r else None, spec=s)
        ratio = j["images_per_s"] / t["images_per_s"] if j and t else None
        name = op + (f" (torch: {t['variant']})" if t and t.get("variant") else "")
        table.append([name, bs, g(j, "images_per_s", ".1f"), g(t, "images_per_s", ".1f"),
                      cell(ratio, spec=".2f"), g(j, "ms_per_batch", ".1f"),
                      g(t, "ms_per_batch", ".1f"), g(j, "gflops", ".1f"),
                      g(j, "pct_peak", ".1f"), g(j, "compile_s", ".2f")])
    lines.append(Table(["op", "batch", "JAX img/s", "torch img/s", "JAX/torch", "JAX ms",
                        "torch ms", "JAX GFLOP/s", "JAX % peak", "JAX compile s"],
                       table).markdown(align="l" + "r" * 9).rstrip("\n"))
    fn = [r for r in report["ratios"] if r["kind"] == "fused/naive"]
    if fn:
        lines += ["", "fused/naive (three gradient maps): " + ", ".join(
            f"{r['framework']} b{r['batch_size']} {r['ratio']:.2f}x" for r in fn)]
    lines += [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
