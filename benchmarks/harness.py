"""Shared benchmark plumbing: alternate tools, summarise, record.

Every measurement runs in its own process (``tests.peak_rss.measure``) so peak memory (``ru_maxrss`` from
``wait4``) belongs to one run. Tools alternate (A B A B ...) so drift on a noisy machine hits both alike;
we report medians.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_llm.formats.folder import read_config
from edge_llm.machine.blas import find_openblas

RESULTS = Path(__file__).with_name("RESULTS.md")
# mlx-lm given the OpenBLAS edge-llm loads by default (the informational like-for-like column)
OPENBLAS_ENV = {"LD_PRELOAD": find_openblas() or ""}


@dataclass
class Series:
    """Repeated measurements of one metric for one tool."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def alternate(tools: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, Series]]:
    """Runs each tool once per round, in turn (A B A B), collecting every metric it returns."""
    results: dict[str, dict[str, Series]] = {name: {} for name in tools}
    for r in range(rounds):
        for name, fn in tools.items():
            metrics = fn()
            print(f"  round {r + 1} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            for key, value in metrics.items():
                results[name].setdefault(key, Series()).values.append(value)
    return results


@dataclass
class Case:
    """One comparison: tools to alternate (the first is ours) and the metrics to tabulate.

    ``metrics`` rows are (key, label, ratio?): ratios are ours / theirs, for speeds and memory alike.
    """

    title: str
    tools: dict[str, Callable[[], dict[str, float]]]
    metrics: list[tuple[str, str, bool]]


def table(results: dict[str, dict[str, Series]], metrics: list[tuple[str, str, bool]]) -> str:
    """Medians per tool, and ours / each other tool's ratio, as a markdown table."""
    names = list(results)
    ours, others = names[0], names[1:]
    head = f"| metric | {ours} | " + " | ".join(f"{o} | ratio" for o in others) + " |"
    lines = [head, "|---" * (2 + 2 * len(others)) + "|"]
    for key, label, ratio in metrics:
        a = results[ours][key].median
        cells = [f"{a:.4g}"]
        for o in others:
            b = results[o][key].median
            cells += [f"{b:.4g}", f"{a / b:.2f}x" if ratio and b else ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_load() -> str:
    """The 1/5/15-minute load averages (the machine is shared; say how busy it was)."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def old_style_copy(folder: Path, dst: Path) -> Path:
    """A copy of ``folder`` whose config.json uses rope_theta/rope_scaling (mlx-lm 0.32 reads only those).

    Weight files are symlinked, not copied.
    """
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != "config.json":
            (dst / item.name).symlink_to(item.resolve())
    raw = json.loads((folder / "config.json").read_text())
    config = read_config(folder)  # normalized: has rope_theta and rope_scaling
    raw.pop("rope_parameters", None)
    raw["rope_theta"] = config["rope_theta"]
    if config.get("rope_scaling"):
        raw["rope_scaling"] = config["rope_scaling"]
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    return dst


def write_section(title: str, body: str) -> None:
    """Replaces (or appends) the ``## title`` section of RESULTS.md."""
    header = "# Benchmark results\n\nMeasured, not estimated. Each section names its command.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)
