"""What the benchmark scripts share: where the data is, resumable results JSON, mean ± sd,
Markdown tables. Scripts import it as `benchlib` (their own folder is on sys.path when run)."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-5k-train.npz"  # ../shared beside the clone


def load_results(path: Path) -> dict:
    """The results a resumable benchmark has so far ({} before its first run)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict) -> None:
    """Write the results after each run, atomically, so an interrupted benchmark resumes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def mean_sd(vals: Iterable[Optional[float]], digits: int = 2, sign: str = "") -> str:
    """'mean ± sample standard deviation' of the values that are not None ('-' if none)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    spread = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
    return f"{statistics.mean(vals):{sign}.{digits}f}{spread}"


def markdown(header: list[str], rows: Iterable[list], align: str = "") -> str:
    """A Markdown table; align is one letter per column, l or r (default l). Cells are not
    padded, so a table's diff shows only the numbers that changed."""
    align = align.ljust(len(header), "l")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
