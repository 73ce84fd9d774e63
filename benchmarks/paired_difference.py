"""Is run A better than run B on the same questions by more than chance? Paired differences of per-question metrics.

    python benchmarks/paired_difference.py RUN_A/predictions_test.jsonl RUN_B/predictions_test.jsonl
    python benchmarks/paired_difference.py A.jsonl B.jsonl --metrics rougeL factuality em --group-by turns
    python benchmarks/paired_difference.py RUN/predictions_test_paraphrase.jsonl RUN/predictions_test.jsonl \
        --metrics em --b-weight 0.8 --pair-by-stem      # is paraphrase EM above 0.8 x test EM? (same facts)

Reads two prediction files of one split (``rag-train`` / ``rag-eval`` write them, one JSON record per question with
its per-question metrics), pairs the records by id, and prints for each metric: A's and B's mean, the mean
difference, its standard error (standard deviation of the paired differences over sqrt(n)) and the difference in
standard errors. Records whose metric is null (e.g. factuality of a sentence that states no fact) are left out of
that metric's pairs. ``--group-by FIELD`` also splits the means by a field of the records (or of their ``meta``).
A side may be several runs of one recipe (seeds) joined by commas, ``A1.jsonl,A2.jsonl``: each question's metrics
are averaged over that side's runs before pairing, so the standard error is that of the seed-averaged systems on
these questions. ``--b-weight W`` tests A against W x B (the difference is A - W x B, e.g. a ratio target of 0.8); ``--pair-by-stem``
pairs ids without their last dotted part (the world's ``<fact>.q<k>`` paraphrase with its ``<fact>.p<k>`` question).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def read(path: Path, by_stem: bool = False) -> dict[str, dict[str, Any]]:
    records = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SystemExit(f"{path}:{line_no}: not JSON ({err.msg})") from None
                key = str(record["id"])
                if by_stem:
                    key = key.rsplit(".", 1)[0]
                    if key in records:
                        raise SystemExit(f"{path}:{line_no}: id stem {key!r} repeats: --pair-by-stem needs one per stem")
                records[key] = record
    return records


def read_runs(spec: str, by_stem: bool = False) -> dict[str, dict[str, Any]]:
    """The records of one run, or of several (comma-separated) averaged per question over the runs."""
    runs = [read(Path(p), by_stem) for p in spec.split(",") if p]
    if len(runs) == 1:
        return runs[0]
    ids = set.intersection(*(set(r) for r in runs))
    merged = {}
    for i in ids:
        record = dict(runs[0][i])
        for k in numeric_fields([r[i] for r in runs]):  # a metric null in the first run still counts
            values = [float(r[i][k]) for r in runs if r[i].get(k) is not None]
            record[k] = sum(values) / len(values)
        merged[i] = record
    return merged


def paired(a: dict[str, dict], b: dict[str, dict], metric: str, b_weight: float = 1.0) -> dict[str, float] | None:
    pairs = [
        (float(a[i][metric]), float(b[i][metric]))
        for i in a.keys() & b.keys()
        if a[i].get(metric) is not None and b[i].get(metric) is not None
    ]
    if len(pairs) < 2:
        return None
    n = len(pairs)
    diffs = [x - b_weight * y for x, y in pairs]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    return {
        "n": n,
        "a": sum(x for x, _ in pairs) / n,
        "b": sum(y for _, y in pairs) / n,
        "diff": mean,
        "se": se,
        "z": mean / se if se else math.inf,
    }


def numeric_fields(records: list[dict]) -> list[str]:
    """Every field that is a number in at least one record, in first-seen order.

    One record is not enough: a metric may be null for that one (factuality of a sentence with no fact).
    """
    seen: dict[str, None] = {}
    for record in records:
        for k, v in record.items():
            if k != "id" and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen.setdefault(k)
    return list(seen)


def field(record: dict, name: str) -> Any:
    return record.get(name, (record.get("meta") or {}).get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a prediction file, or several runs (seeds) of one recipe joined by commas")
    parser.add_argument("b", help="the same for B")
    parser.add_argument("--metrics", nargs="+", default=None, help="default: every numeric per-question metric")
    parser.add_argument("--group-by", default=None, help="also split A's and B's means by this record field")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    parser.add_argument("--b-weight", type=float, default=1.0, help="compare A with this multiple of B")
    parser.add_argument("--pair-by-stem", action="store_true", help="pair ids without their last dotted part")
    args = parser.parse_args(argv)
    a, b = read_runs(args.a, args.pair_by_stem), read_runs(args.b, args.pair_by_stem)
    common = a.keys() & b.keys()
    if not common:
        print(f"no question ids in common between {args.a} and {args.b}", file=sys.stderr)
        return 2
    metrics = args.metrics or numeric_fields([a[i] for i in sorted(common)])
    w = args.b_weight
    out: dict[str, Any] = {"a": str(args.a), "b": str(args.b), "b_weight": w, "questions": len(common), "metrics": {}}
    print(f"{len(common)} questions in both; A = {args.a}, B = {args.b}")
    head = "A - B" if w == 1.0 else f"A-{w:g}B"
    print(f"{'metric':16s} {'n':>5s} {'A':>8s} {'B':>8s} {head:>8s} {'SE':>7s} {'z':>6s}")
    for m in metrics:
        r = paired(a, b, m, w)
        if r is None:
            continue
        out["metrics"][m] = r
        print(f"{m:16s} {r['n']:5d} {r['a']:8.3f} {r['b']:8.3f} {r['diff']:8.3f} {r['se']:7.3f} {r['z']:6.1f}")
    if args.group_by:
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for i in common:
            groups[str(field(a[i], args.group_by))]["ids"].append(i)
        out["groups"] = {}
        for g, v in sorted(groups.items()):
            sub_a, sub_b = {i: a[i] for i in v["ids"]}, {i: b[i] for i in v["ids"]}
            row = {m: paired(sub_a, sub_b, m) for m in metrics}
            out["groups"][g] = row
            cells = ", ".join(f"{m} A {r['a']:.3f} / B {r['b']:.3f}" for m, r in row.items() if r)
            print(f"{args.group_by}={g} ({len(v['ids'])}): {cells}")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
