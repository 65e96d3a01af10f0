"""The benchmark's output: an aligned table for the terminal (valid markdown), and a bar chart."""

from __future__ import annotations

import mlx.core as mx


def _fmt_ms(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_table(rows: list[dict], reference: str = "pure") -> str:
    """A markdown table with padded columns, one line per row, with each impl's time over
    ``reference``'s on the same case and mode (``x pure``)."""
    ref = {(r["case"], r["mode"]): r["median_ms"] for r in rows if r["impl"] == reference and r["median_ms"]}
    head = ["case", "problem", "mode", "impl", "pass", "median ms", "runs", f"x {reference}", "note"]
    numeric = {"median ms", "runs", f"x {reference}"}
    body = []
    for r in rows:
        base = ref.get((r["case"], r["mode"]))
        ratio = f"{r['median_ms'] / base:.2f}" if base and r["median_ms"] else "-"
        ok = {True: "yes", False: "NO", None: "-"}[r["pass"]]
        if r["max_err"] is not None:
            ok += f" ({r['max_err']:.1e})"
        body.append([r["case"], r["label"], r["mode"], r["impl"], ok, _fmt_ms(r["median_ms"]),
                     str(r["repeats"] or "-"), ratio, r["note"]])
    widths = [max(len(h), *(len(cells[i]) for cells in body)) for i, h in enumerate(head)]

    def line(cells):
        padded = [c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, head)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if h in numeric else "-" * (w + 2) for w, h in zip(widths, head)) + "|"
    return "\n".join([line(head), rule, *(line(cells) for cells in body)])


def plot(rows: list[dict], path: str) -> bool:
    """Grouped bar chart of median times (log scale) per case and mode; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r["median_ms"]]
    groups = list(dict.fromkeys((r["case"], r["mode"]) for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    value = {(r["case"], r["mode"], r["impl"]): r["median_ms"] for r in timed}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        ys = [value.get((c, m, impl), 0) for c, m in groups]
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups])
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(f"natten-mlx benchmark ({mx.default_device()}, mlx {mx.__version__})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
