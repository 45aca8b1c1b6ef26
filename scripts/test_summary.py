"""The last words of `make test` (printed by scripts/test-services.sh): what ran against what, and what was skipped and why.

    python scripts/test_summary.py [--since EPOCH] [--junit-dir DIR] [--service TEXT]... [--missing 'NAME|TEXT']...

Reads the JUnit reports under DIR (test-results/junit/) written at or after EPOCH, one per pytest run.
Every skipped test is named with its reason; one whose reason points at a service that could not be
set up (--missing) says so.

Standard library only: it runs before, or without, the project's virtual environment.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Words in a skip reason that point at a service (the names scripts/test-services.sh uses).
SERVICE_WORDS = {
    "postgresql": ("postgres", "database_url"),
    "redis": ("redis",),
    "chromium": ("chromium", "browser"),
}


def _test_id(classname: str, name: str) -> str:
    """`tests/deliberation/test_faults.py::TestClass::test_name` from JUnit's dotted classname."""
    parts = classname.split(".") if classname else []
    inner = []
    while parts and not (ROOT / Path(*parts)).with_suffix(".py").exists():
        inner.insert(0, parts.pop())
    path = "/".join(parts) + ".py" if parts else classname
    return "::".join([path, *inner, name])


def _read(path: Path) -> tuple[dict[str, float], list[tuple[str, str]], list[str]]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    skipped, failed = [], []
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for suite in suites:
        for key in counts:
            counts[key] += float(suite.get(key, 0) or 0)
    for case in root.iter("testcase"):
        test = _test_id(case.get("classname", ""), case.get("name", ""))
        skip = case.find("skipped")
        if skip is not None:
            skipped.append((test, (skip.get("message") or skip.text or "no reason given").strip()))
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(test)
    return counts, skipped, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=float, default=0.0, help="only reports written at or after this time (epoch seconds)")
    parser.add_argument("--junit-dir", type=Path, default=ROOT / "test-results" / "junit")
    parser.add_argument("--service", action="append", default=[], help="a service the run used, as text")
    parser.add_argument("--missing", action="append", default=[], help="NAME|TEXT: a service that could not be set up")
    args = parser.parse_args(argv)

    missing = dict(item.split("|", 1) for item in args.missing if "|" in item)
    reports = (
        sorted(path for path in args.junit_dir.glob("*.xml") if path.stat().st_mtime >= args.since - 1) if args.junit_dir.is_dir() else []
    )

    lines = ["", "=" * 30 + " test summary " + "=" * 30]
    lines.extend(f"Used: {service}" for service in args.service)
    lines.extend(f"NOT SET UP: {name}: {text}" for name, text in missing.items())
    if not reports:
        lines.append(f"No JUnit report was written under {args.junit_dir} by this run.")

    by_reason: dict[str, list[str]] = defaultdict(list)
    total_skipped = 0
    all_failed: list[str] = []
    for path in reports:
        try:
            counts, skipped, failed = _read(path)
        except ET.ParseError as error:
            lines.append(f"{path.name}: unreadable ({error})")
            continue
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines.append(
            f"{path.name}: {int(counts['tests'])} tests, {int(passed)} passed, {int(counts['failures'])} failed, "
            f"{int(counts['errors'])} errors, {int(counts['skipped'])} skipped ({counts['time']:.0f} s)"
        )
        for test, reason in skipped:
            by_reason[reason].append(test)
            total_skipped += 1
        all_failed.extend(failed)

    if reports:
        lines.append(f"Skipped: {total_skipped}" + ("" if total_skipped else " (none)"))
    for reason, tests in by_reason.items():
        lowered = reason.lower()
        causes = [name for name in missing if any(word in lowered for word in SERVICE_WORDS.get(name, (name,)))]
        cause = f"  [because {', '.join(causes)} could not be set up]" if causes else ""
        lines.append(f"  {reason} ({len(tests)}){cause}")
        lines.extend(f"    - {test}" for test in tests)
    if all_failed:
        lines.append(f"Failed: {len(all_failed)}")
        lines.extend(f"  - {test}" for test in all_failed)
    lines.append("=" * 74)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
