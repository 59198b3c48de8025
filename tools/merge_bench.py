"""Merge ``python -m crossattn.bench`` result folders into one ``PREFIX.json`` + ``PREFIX.md``.

    python tools/merge_bench.py OUT/bench bench-seed000 bench-short_inference ...

tools/gpu_session.sh benchmarks one workload per bench run, so that a phase cut off by its
timeout still returns every workload measured before; this merges them after each run.
Folders without a results.json (a run that was cut off) are skipped; a run whose command
failed (a peer that raised) still has one, and its rows and failures are kept.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(folders: list[Path]) -> dict | None:
    parts = [json.loads((f / "results.json").read_text()) for f in folders if (f / "results.json").is_file()]
    if not parts:
        return None
    # Each run keeps its own environment (date, load, commit); a row names its run. The header
    # shows the first run's, with every distinct commit when they differ.
    env = dict(parts[0]["environment"])
    commits = list(dict.fromkeys(p["environment"].get("commit") or "unknown" for p in parts))
    if len(commits) > 1:
        env["commit"] = ", ".join(commits)
    merged = {"environment": env, "runs": [p["environment"] for p in parts], "peaks": parts[0]["peaks"],
              "rows": [], "skipped": {}, "failed": {}}
    for i, p in enumerate(parts):
        merged["rows"] += [{**row, "run": i} for row in p["rows"]]
        merged["skipped"].update(p.get("skipped", {}))
        merged["failed"].update(p.get("failed", {}))
    return merged


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    prefix, folders = Path(argv[0]), [Path(a) for a in argv[1:]]
    merged = merge(folders)
    if merged is None:
        print("merge_bench: no results yet")
        return 0
    from crossattn.bench.report import markdown_table

    prefix.with_suffix(".json").write_text(json.dumps(merged, indent=1))
    prefix.with_suffix(".md").write_text(markdown_table(merged["environment"], merged["peaks"], merged["rows"],
                                                        merged["skipped"], merged["failed"]))
    print(f"merge_bench: {len(merged['rows'])} rows -> {prefix}.json, {prefix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
