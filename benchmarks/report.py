"""Tables, JSON and plots of one `python -m benchmarks` run."""
from __future__ import annotations

import json
import math
import os
import re

ISSUE_SET = ("loha-r8", "lokr-f-1-r16", "boft-b32")   # the geomean the performance targets are stated on
TIME_TARGET, SAVED_TARGET = 1.35, 1.5


def _geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _mib(n):
    return "-" if n is None else f"{n / 2**20:.2f}"


def grid(timings, mode="fwdbwd", key="median_ms"):
    """{(shape, setting): {provider: row[key]}}, the base layer's row[key] under "base" in every cell."""
    base = {r["shape"]: r.get(key) for r in timings if r["mode"] == mode and r["provider"] == "base"}
    cells: dict = {}
    for r in timings:
        if r["mode"] == mode and r["provider"] != "base":
            cells.setdefault((r["shape"], r["setting"]), {"base": base.get(r["shape"])})[r["provider"]] = r.get(key)
    return cells


def _over(cell, a, b, paired=True):
    """a/b in a cell: from paired ratios (each to base; b "base" = 1) or from plain times."""
    return _div(cell.get(a), 1.0 if paired and b == "base" else cell.get(b))


def _div(a, b):
    return a / b if a is not None and b else None


LYCORIS_MODES = ("lycoris", "lycoris-bypass")   # rebuild (LyCORIS's default) and bypass_mode=True


def faster_lycoris(cell, setting: str = ""):
    """(lyfast / the faster LyCORIS mode, that mode) of a cell of paired ratios, or (None, None). A DoRA
    setting has rebuild mode only: LyCORIS's bypass mode ignores weight_decompose (it computes plain LoHa or
    LoKr), so it is not the same function."""
    modes = ("lycoris",) if setting.endswith("-dora") else LYCORIS_MODES
    peers = {p: cell[p] for p in modes if cell.get(p)}
    if not peers or cell.get("lyfast") is None:
        return None, None
    best = min(peers, key=peers.get)
    return cell["lyfast"] / peers[best], best


def tables(info, timings, memory, skipped) -> str:
    providers = [p for p in dict.fromkeys(r["provider"] for r in timings) if p != "base"]
    mem = {(m["shape"], m["setting"], m["provider"]): m for m in memory}
    model = info.get("model", "sdxl")
    out = [f"# lyfast benchmarks, {model}: {info['device']}, {info['dtype']}, {info['threads']} threads",
           "", f"torch {info['torch']}, lyfast {info['lyfast']}, lycoris-lora {info['lycoris']}, "
           + (f"peft {info['peft']}, " if info.get("peft") else "") + f"git {info['git_sha']}, {info['date']}" + (
               f"; 1-min load average {info['load_avg_1m']} at start, {info.get('load_avg_1m_end')} at end"
               if not info["cuda"] and info.get("load_avg_1m") is not None else ""), "",
           f"Command: `{info['command']}`", ""]
    if memory:
        sizes = sorted({f"{m['shape']} -> {m['memory_shape']}" for m in memory if m["shape"] != m["memory_shape"]})
        out += [f"Memory measured at the layer's {model} 1024x1024 size: " + "; ".join(sizes) + "." if sizes else
                "Memory measured at the timed input size.", ""]
    times, paired = grid(timings), grid(timings, key="ratio_base")
    head = ["layer", "setting", "base ms"] + [f"{p} ms" for p in providers] + [f"{p}/base" for p in providers]
    lyco = "lycoris" in providers and "lyfast" in providers
    faster = lyco and "lycoris-bypass" in providers
    vs_peft = "peft" in providers and "lyfast" in providers
    head += ["lyfast/lycoris"] * lyco + ["lyfast/faster lycoris", "faster mode"] * faster + \
        ["lyfast/peft"] * vs_peft + [f"saved {p} (act)" for p in providers] + \
        [f"transient {p} (act)" for p in providers]
    out += ["## fwd+bwd per layer", "",
            "Median ms; ratios = median over rounds of t(variant)/t(base layer timed just before it); saved = "
            "bytes kept for backward beyond the base layer, transient = largest tensor created, both in "
            "activations (act = max(input, output) bytes). lycoris = LyCORIS's rebuild mode (its default), "
            "lycoris-bypass = bypass_mode=True; faster lycoris = the faster of the two in that cell (rebuild only "
            "for DoRA settings: LyCORIS's bypass mode ignores DoRA); peft = HF PEFT (LoHa/LoKr the same function, "
            "BOFT the same butterfly on the input side, no DoRA).", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, t in times.items():
        q = paired[key]
        row = [*key, _fmt(t["base"])] + [_fmt(t.get(p)) for p in providers]
        row += [_fmt(q.get(p)) for p in providers] + [_fmt(_over(q, "lyfast", "lycoris"))] * lyco
        if faster:
            r, mode = faster_lycoris(q, key[1])
            row += [_fmt(r), (mode or "-").replace("lycoris-", "").replace("lycoris", "rebuild")]
        row += [_fmt(_over(q, "lyfast", "peft"))] * vs_peft
        for m in ("saved_act", "transient_act"):
            row += [_fmt((mem.get((*key, p)) or {}).get(m)) for p in providers]
        out.append("| " + " | ".join(row) + " |")

    out += ["", "## geomean over layers (paired median ratios; ratio of min-of-rounds times in brackets)", "",
            "| setting | mode | " + " | ".join(f"{p}/base" for p in providers) + " | lyfast/lycoris |" * lyco
            + " lyfast/faster lycoris |" * faster + " lyfast/peft |" * vs_peft + " saved lyfast (act, max) |",
            "|" + "---|" * (3 + len(providers) + lyco + faster + vs_peft)]
    modes = list(dict.fromkeys(r["mode"] for r in timings))
    groups = [(s, [s]) for s in dict.fromkeys(k[1] for k in times)]
    if all(s in dict(groups) for s in ISSUE_SET):
        groups.append(("issue set: " + " + ".join(ISSUE_SET), list(ISSUE_SET)))
    for label, sets in groups:
        for mode in modes:
            cells = [(k, v) for k, v in grid(timings, mode, "ratio_base").items() if k[1] in sets]
            med = [v for _, v in cells]
            low = [v for k, v in grid(timings, mode, "min_ms").items() if k[1] in sets]

            def gm(a, b):
                return (f"{_fmt(_geomean(_over(v, a, b) for v in med))} "
                        f"({_fmt(_geomean(_over(v, a, b, paired=False) for v in low))})")
            row = [label, mode] + [gm(p, "base") for p in providers] + [gm("lyfast", "lycoris")] * lyco
            if faster:
                row.append(_fmt(_geomean(faster_lycoris(v, k[1])[0] for k, v in cells)))
            row += [gm("lyfast", "peft")] * vs_peft
            saved = [m["saved_act"] for m in memory if m["setting"] in sets and m["provider"] == "lyfast"]
            row.append(_fmt(max(saved)) if saved and mode == "fwdbwd" else "")
            out.append("| " + " | ".join(row) + " |")
    if memory:
        out += ["", "## memory per layer (MiB; saved = kept for backward beyond the frozen layer; peak on CUDA)",
                "", "| layer (memory size) | setting | provider | act | saved | transient | transient op | peak |",
                "|---|---|---|---|---|---|---|---|"]
        for m in memory:
            out.append(f"| {m['memory_shape']} | {m['setting'] or '-'} | {m['provider']} | {_mib(m['act'])} | "
                       f"{_mib(m['saved'])} | {_mib(m['transient'])} | {m['transient_op']} | {_mib(m['peak'])} |")
    if skipped:
        out += ["", "Skipped:", *skipped_summary(skipped)]
    return "\n".join(out) + "\n"


def skipped_summary(skipped, examples: int = 3) -> list[str]:
    """One line per distinct reason: how many cells, and a few of them (the JSON keeps every one). Reasons that
    differ only in the shape they name are one reason."""
    groups: dict[str, list[str]] = {}
    for s in skipped:
        cell = " ".join(str(s[k]) for k in ("provider", "setting", "shape") if s.get(k))
        reason = s["reason"].replace(str(s.get("shape", "\0")), "<shape>")
        groups.setdefault(reason, []).append(cell)
    lines = []
    for reason, cells in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        more = f", +{len(cells) - examples} more" if len(cells) > examples else ""
        lines.append(f"- {len(cells)} x {reason} ({'; '.join(cells[:examples])}{more})")
    return lines


def plots(timings, memory, stem) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = grid(timings, key="ratio_base")
    settings = list(dict.fromkeys(k[1] for k in cells))
    shapes = list(dict.fromkeys(k[0] for k in cells))
    providers = [p for p in dict.fromkeys(r["provider"] for r in timings) if p != "base"]
    written = []
    for kind, ylabel, target in (("time", "fwd+bwd time / base", TIME_TARGET),
                                 ("memory", "saved beyond base / act", SAVED_TARGET)):
        if kind == "memory" and not memory:
            continue
        fig, axes = plt.subplots(len(settings), 1, figsize=(max(8, 1.1 * len(shapes)), 2.6 * len(settings)),
                                 squeeze=False, sharex=True)
        width = 0.8 / max(len(providers), 1)
        for ax, setting in zip(axes[:, 0], settings):
            for j, p in enumerate(providers):
                if kind == "time":
                    ys = [(cells.get((s, setting)) or {}).get(p) for s in shapes]
                else:
                    m = {x["shape"]: x["saved_act"] for x in memory if x["setting"] == setting and x["provider"] == p}
                    ys = [m.get(s) for s in shapes]
                ax.bar([i + (j - (len(providers) - 1) / 2) * width for i in range(len(shapes))],
                       [y or 0 for y in ys], width, label=p)
            ax.axhline(target, ls="--", c="k", lw=0.8, label="target")
            if kind == "time":
                ax.axhline(1.0, c="k", lw=0.5)
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.5 if kind == "time" else 0.01)
            ax.set_title(setting, fontsize=9)
            ax.set_ylabel(ylabel, fontsize=7)
        axes[-1, 0].set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=7)
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        path = f"{stem}-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(info, args, timings, memory, skipped, out_dir) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    if not info["cuda"]:
        slug += f"-{info['threads']}t"
    quant = info.get("base", "bf16")
    stem = os.path.join(out_dir, f"{slug}-{info['date'][:10]}-{info.get('model', 'sdxl')}"
                        + ("" if quant == "bf16" else f"-{quant}"))
    md = tables(info, timings, memory, skipped)
    print("\n" + md)
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"info": info, "args": args, "timings": timings, "memory": memory, "skipped": skipped}, f,
                  indent=1)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or `pip install .[bench]`)")
        return [stem + ".md", stem + ".json"]
    return [stem + ".md", stem + ".json", *plots(timings, memory, stem)]
