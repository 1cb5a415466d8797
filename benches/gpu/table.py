#!/usr/bin/env python3
"""Prints the Markdown table of benches/gpu/run.sh from its JSON lines: one row per network,
the median step of each backend (or why there is none: failed, timeout, skipped) with, in
brackets, the median time the host took to issue it (a step close to it waited on the host, not
the device), the seconds from building the network to the first timed step (compiling and
autotuning, mostly), and dnal's time over PyTorch eager's. A network pruned to a checked-in
architecture (`architecture` in its lines) has a row of its own, and so has a network's searching
step (`gates` "search", the architecture stage's, with its penalty's lambda).

Usage: python3 benches/gpu/table.py steps.jsonl
"""

import json
import sys


def main():
    rows, backends = {}, []
    for line in open(sys.argv[1]):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        model = r["model"] + (f" pruned to {r['architecture']}" if r.get("architecture") else "")
        if r.get("gates") == "search":
            model += " searching" + (f" (penalty {r['penalty']:g})" if r.get("penalty") else "")
        rows.setdefault((model, r["batch"], r["size"]), {})[r["backend"]] = r
        if r["backend"] not in backends:
            backends.append(r["backend"])
    torch = next((b for b in backends if b.startswith("pytorch")), None)
    head = ["network", "batch"] + [f"{b} median ms (issued)" for b in backends]
    head += [f"{b} / {torch}" for b in backends if torch and b != torch]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (model, batch, size), by in rows.items():
        cells = [model, f"{batch} x {size}²"]
        for b in backends:
            r = by.get(b)
            if r is None:
                cells.append("not run")
            elif "median_ms" in r:
                issue = f" ({r['issue_ms']:.1f})" if "issue_ms" in r else ""
                warm = f", warm-up {r['warmup_s']:.0f} s" if "warmup_s" in r else ""
                cells.append(f"{r['median_ms']:.1f}{issue}{warm}")
            else:
                cells.append(r.get("error", "failed"))
        for b in backends:
            if not torch or b == torch:
                continue
            ok = all(x in by and "median_ms" in by[x] for x in (b, torch))
            cells.append(f"{by[b]['median_ms'] / by[torch]['median_ms']:.2f}x" if ok else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
