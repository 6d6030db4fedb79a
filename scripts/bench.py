"""Benchmark: methods x backbones x seeds x training-set sizes at an equal budget, one JSON.

    .venv/bin/python scripts/bench.py configs/bench/quick.yaml [--out runs/bench/quick] [--quick]

A spec (YAML, configs/bench/) names the data, the held-out split, the budget (minutes or
epochs), and the grid. Every run is an ordinary `edgessl pretrain` run directory under
OUT/runs/; OUT/results.json holds one record per run (method, backbone, seed, data size,
epochs, seconds, images/s, peak memory, kNN on the held-out split, raw-pixel and untrained
kNN on the same split, linear probe when asked, and the kNN-against-seconds curve), and
OUT/*.png the plots: kNN against training seconds per method, throughput and peak memory
per method. Resumable: a run already in results.json is not run again; a run that was
interrupted continues from its checkpoint. `--only` and `--seeds` run part of the grid;
`--quick` keeps the first seed, backbone and size only (and the spec's `quick_budget` when
it has one). A method entry may name its own `seeds` (a one-seed sweep beside a three-seed
ablation). `--table` prints the results as
Markdown; `--table --chain a,b,c` as an ablation, each step's change paired by seed.

Budgets in minutes are wall-clock and so depend on how busy the machine is: run nothing
else beside a benchmark.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import statistics
from pathlib import Path

import yaml

from benchlib import REPO, load_results, markdown, mean_sd, save_results
import edgessl
from edgessl.api import METHODS, resolve_config

SPEC_KEYS = {"data", "val_data", "val_fraction", "split_seed", "budget", "quick_budget", "monitor_every", "linear", "methods",
             "backbones", "seeds", "train_sizes", "overrides"}
ENTRY_KEYS = {"method", "config", "overrides", "seeds", "budget"}


def load_spec(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SystemExit(f"error: {path}: unknown keys {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    if not spec.get("methods"):
        raise SystemExit(f"error: {path}: no methods")
    for key, entry in spec["methods"].items():
        unknown = set(entry or {}) - ENTRY_KEYS
        if unknown:
            raise SystemExit(f"error: {path}: method {key!r}: unknown keys {sorted(unknown)} (known: {sorted(ENTRY_KEYS)})")
    return spec


def run_config(spec: dict, entry: dict, method_key: str, backbone: str, seed: int, size) -> dict:
    """The run's recipe (edgessl.api.resolve_config applies it over the method's preset): the
    entry's config file, then the spec's and the entry's overrides, then the grid point."""
    name = entry.get("method", method_key)
    if name not in METHODS:
        raise SystemExit(f"error: method {name!r} of {method_key!r} is not one of {sorted(METHODS)}")
    recipe: dict = {}
    budget = entry.get("budget", spec["budget"])
    data = spec["data"]
    if data.startswith("npz:") and not Path(data[4:]).is_absolute():
        data = f"npz:{REPO / data[4:]}"
    point = {"method": {"name": name},
             "data": {"spec": data, "val_spec": spec.get("val_data"),
                      "val_fraction": 0.0 if spec.get("val_data") else spec.get("val_fraction", 0.2),
                      "split_seed": spec.get("split_seed", 0), "train_subset": size},
             "backbone": {"name": backbone},
             "optim": {"epochs": budget.get("epochs"), "minutes": budget.get("minutes")},
             "run": {"seed": seed, "monitor_every": spec.get("monitor_every", 1)}}
    layers = [yaml.safe_load((REPO / entry["config"]).read_text()) if entry.get("config") else {},
              spec.get("overrides") or {}, entry.get("overrides") or {}, point]
    for layer in layers:
        for section, values in layer.items():
            recipe.setdefault(section, {}).update(values)
    resolve_config("", recipe)  # a bad key or value stops the benchmark before it trains
    return recipe


def curve(run_dir: Path) -> list[list[float]]:
    """[[training seconds, kNN %], ...] from metrics.csv, the untrained network at 0 s."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("knn_top1")]
    return [[0.0 if r["epoch"] == "0" else float(r["seconds"]), float(r["knn_top1"])] for r in rows]


def linear_top1(run_dir: Path) -> float:
    """The linear probe on the run's own split, loaded as the run resolved it (input size, fit)."""
    return edgessl.Run(run_dir).probe(linear=True)["linear_top1"]


def run_one(spec: dict, key: str, cfg: dict, run_dir: Path, point: dict) -> dict | None:
    resume = (run_dir / "checkpoint.pt").exists()
    quiet = {"progress": False, "log": lambda *_: None}
    run = edgessl.pretrain(out=run_dir, resume=True, **quiet) if resume else \
        edgessl.pretrain(out=run_dir, config=cfg, **quiet)
    out = run.summary
    if out.get("stopped_early"):
        return None
    record = {**point, "run_dir": str(run_dir), "epochs": out["epochs"], "steps": out["steps"],
              "seconds": out["seconds"], "images_per_s": out["images_per_s"], "peak_mem_mb": out["peak_mem_mb"],
              "knn_top1": out.get("knn_top1"), "knn_pixels": out.get("knn_pixels"),
              "knn_untrained": out.get("knn_untrained"), "curve": curve(run_dir), "config": str(run_dir / "config.yaml")}
    if spec.get("linear"):
        record["linear_top1"] = linear_top1(run_dir)
    return record


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results.values())
    methods = sorted({r["method_key"] for r in runs})
    cmap = plt.cm.tab10 if len(methods) <= 10 else plt.cm.tab20  # tab20 pairs dark and light shades
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot([x / 60 for x in xs], ys, marker=".", color=colours[r["method_key"]], alpha=0.8,
                label=r["method_key"])
    pixels = [r["knn_pixels"] for r in runs if r.get("knn_pixels") is not None]
    if pixels:
        ax.axhline(sum(pixels) / len(pixels), color="k", ls="--", lw=1, label="raw pixels")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set(xlabel="training minutes (this machine)", ylabel="kNN top-1 % (held-out split)",
           title="kNN against training time")
    ax.grid(alpha=0.3)
    paths = [out / "knn_vs_minutes.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, field, label in ((axes[0], "images_per_s", "images / s"), (axes[1], "peak_mem_mb", "peak memory MB")):
        vals = [[r[field] for r in runs if r["method_key"] == m] for m in methods]
        ax.bar(methods, [sum(v) / len(v) for v in vals], color=[colours[m] for m in methods])
        ax.set(ylabel=label)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out / "throughput_memory.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def chain_table(results: dict, chain: list[str]) -> str:
    """Markdown for an ablation: each method key in turn, its kNN over seeds, and its change
    from the row before, paired by seed (same seed: same initial weights and data order).
    With several backbones or data sizes, one chain per (backbone, size), labelled."""
    groups: dict = {}
    for r in results.values():
        group = (r.get("backbone", ""), r.get("train_size") or "all")
        groups.setdefault(group, {}).setdefault(r["method_key"], {})[r["seed"]] = r["knn_top1"]
    have = {k for by_key in groups.values() for k in by_key}
    missing = [k for k in chain if k not in have]
    if missing:
        raise SystemExit(f"error: no results for {missing} (have: {sorted(have)})")
    label = len(groups) > 1
    header = (["backbone", "train images"] if label else []) + ["step", "seeds", "kNN top-1",
                                                                 "change from the row above (paired by seed)"]
    rows = []
    for (backbone, size), by_key in groups.items():
        steps = [k for k in chain if k in by_key]
        for i, key in enumerate(steps):
            runs = by_key[key]
            change = "-"
            if i:
                before = by_key[steps[i - 1]]
                change = mean_sd([runs[s] - before[s] for s in sorted(set(runs) & set(before))], sign="+")
            rows.append(([backbone, size] if label else []) + [key, len(runs), mean_sd(list(runs.values())), change])
    return markdown(header, rows, ("lr" if label else "") + "lrll")


def table(results: dict) -> str:
    """Markdown, one row per (method, backbone, data size): mean and spread over seeds."""
    groups: dict = {}
    for r in results.values():
        groups.setdefault((r["method_key"], r["backbone"], r["train_size"] or "all"), []).append(r)
    lines = ["| method | backbone | train images | seeds | epochs | kNN top-1 | linear top-1 | raw pixels kNN | "
             "untrained kNN | images/s | peak MB |", "| --- | --- | --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: |"]
    for (m, b, n), rs in groups.items():
        lines.append(f"| {m} | {b} | {n} | {len(rs)} | {mean_sd([r['epochs'] for r in rs], 0)} | "
                     f"{mean_sd([r['knn_top1'] for r in rs])} | {mean_sd([r.get('linear_top1') for r in rs])} | "
                     f"{mean_sd([r['knn_pixels'] for r in rs])} | {mean_sd([r['knn_untrained'] for r in rs])} | "
                     f"{statistics.mean(r['images_per_s'] for r in rs):.0f} | "
                     f"{max(r['peak_mem_mb'] for r in rs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--out", type=Path, help="output folder (default runs/bench/SPEC_NAME)")
    ap.add_argument("--quick", action="store_true", help="first seed, backbone and size only")
    ap.add_argument("--only", nargs="*", help="method keys to run")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="seeds to run (0,1,2), of the spec's")
    ap.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    ap.add_argument("--chain", help="with --table: an ablation, method keys in order (a,b,c), each row's "
                                    "change from the one before, paired by seed")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    out = args.out or REPO / "runs" / "bench" / (args.spec.stem + ("-quick" if args.quick else ""))
    if args.table:
        results = load_results(out / "results.json")
        print(chain_table(results, args.chain.split(",")) if args.chain else table(results))
        return
    out.mkdir(parents=True, exist_ok=True)
    if args.quick and spec.get("quick_budget"):
        spec["budget"] = spec["quick_budget"]
    backbones, seeds, sizes = spec.get("backbones", ["mobilenetv3"]), spec.get("seeds", [0]), \
        spec.get("train_sizes", [None])
    if args.quick:
        backbones, seeds, sizes = backbones[:1], seeds[:1], sizes[:1]
    results_path = out / "results.json"
    results = load_results(results_path)
    # an entry may name its own seeds (a one-seed sweep beside a three-seed ablation)
    entry_seeds = {k: (e or {}).get("seeds", seeds) for k, e in spec["methods"].items()}
    if not args.quick:
        seeds = list(dict.fromkeys(seeds + [s for ss in entry_seeds.values() for s in ss]))
    grid = list(itertools.product(sizes, backbones, seeds, spec["methods"].items()))
    for size, backbone, seed, (method_key, entry) in grid:
        if args.only and method_key not in args.only:
            continue
        if not args.quick and seed not in entry_seeds[method_key]:
            continue
        if args.seeds is not None and seed not in args.seeds:
            continue
        key = f"{method_key}|{backbone}|seed{seed}|n{size or 'all'}"
        if key in results:
            continue
        entry = entry or {}
        cfg = run_config(spec, entry, method_key, backbone, seed, size)
        point = {"method_key": method_key, "method": cfg["method"]["name"], "backbone": backbone, "seed": seed,
                 "train_size": size, "budget": entry.get("budget", spec["budget"])}
        run_dir = out / "runs" / key.replace("|", "_")
        record = run_one(spec, key, cfg, run_dir, point)
        if record is None:  # SIGINT / SIGTERM: checkpointed; running the script again resumes it
            raise SystemExit(f"stopped during {key}; run again to resume it")
        results[key] = record
        save_results(results_path, results)
        r = results[key]
        print(f"{key:48s} kNN {r['knn_top1']:.2f} (pixels {r['knn_pixels']:.2f}, untrained {r['knn_untrained']:.2f}) "
              f"{r['epochs']} ep {r['seconds']:.0f} s {r['images_per_s']:.0f} img/s {r['peak_mem_mb']:.0f} MB",
              flush=True)
    for p in plots(results, out) if results else []:
        print(f"wrote {p}")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
