"""Write docs/reliability.md: a table of every test, what it does and what happened in a recorded run.

    .venv/bin/python -m tests.reliability_report test-results/junit/*.xml

`make test` leaves one JUnit XML file per pytest invocation under test-results/junit/.
"What it does" is the test's docstring (first paragraph) or, where it has none, its name
read as a sentence: the names are written to say what is checked. "What happened" is
the outcome and the time of that run. The hand-written part of the document (what each
fault test does to the system) lives between the markers and is kept as it is.
"""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "reliability.md"
GENERATED_BEGIN, GENERATED_END = "<!-- tests:begin -->", "<!-- tests:end -->"

# The suites this document is about come first; the rest follow in file order.
RELIABILITY_FILES = (
    "tests/deliberation/test_fault_worker_killed.py",
    "tests/deliberation/test_fault_redis_restart.py",
    "tests/deliberation/test_recovery.py",
    "tests/deliberation/test_consumer_layer_loss.py",
    "tests/deliberation/test_faults.py",
    "tests/e2e/test_reconnect.py",
    "tests/deliberation/test_abuse.py",
    "tests/deliberation/test_multi_process.py",
    "tests/simulation/test_bots.py",
    "tests/deliberation/test_consumer_fanout.py",
    "tests/deliberation/test_deploy_config.py",
    "tests/deliberation/test_round_integration.py",
)


@dataclass
class Case:
    file: str
    name: str  # function name, with the parametrisation if any
    outcome: str
    seconds: float
    message: str = ""


def _read_junit(path: Path) -> list[Case]:
    cases = []
    for testcase in ET.parse(path).getroot().iter("testcase"):
        classname = testcase.get("classname", "")
        name = testcase.get("name", "")
        # "tests.deliberation.test_faults" or "tests.deliberation.test_faults.TestClass"
        parts = classname.split(".")
        while parts and not (ROOT / Path(*parts)).with_suffix(".py").exists():
            name = f"{parts.pop()}.{name}"
        file = "/".join(parts) + ".py"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = testcase.find(tag)
            if element is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (element.get("message") or "").strip().splitlines()[0][:160] if element.get("message") else ""
                break
        cases.append(Case(file=file, name=name, outcome=outcome, seconds=float(testcase.get("time", 0.0)), message=message))
    return cases


def _docstrings(file: str) -> dict[str, str]:
    """Test function name -> first paragraph of its docstring (classes: Class.method)."""
    path = ROOT / file
    if not path.exists():
        return {}
    found: dict[str, str] = {}

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                doc = ast.get_docstring(node) or ""
                found[prefix + node.name] = " ".join(doc.split("\n\n")[0].split())

    visit(ast.parse(path.read_text()).body, "")
    return found


def _sentence(name: str) -> str:
    base, _, params = name.partition("[")
    words = base.rsplit(".", 1)[-1].removeprefix("test_").replace("_", " ")
    text = words[:1].upper() + words[1:]
    return f"{text} [{params}" if params else text


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(cases: list[Case], *, sources: list[Path]) -> str:
    by_file: dict[str, list[Case]] = {}
    for case in cases:
        by_file.setdefault(case.file, []).append(case)
    order = [f for f in RELIABILITY_FILES if f in by_file] + sorted(f for f in by_file if f not in RELIABILITY_FILES)
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.outcome] = counts.get(case.outcome, 0) + 1
    total_s = sum(case.seconds for case in cases)
    lines = [
        f"Recorded {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from "
        + ", ".join(f"`{p.name}`" for p in sources)
        + f": {len(cases)} tests, "
        + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        + f", {total_s / 60:.1f} min of test time.",
        "",
    ]
    for file in order:
        docs = _docstrings(file)
        lines += [f"### `{file}`", "", "| Test | What it does | What happened |", "|---|---|---|"]
        for case in by_file[file]:
            what = docs.get(case.name.split("[")[0]) or _sentence(case.name)
            happened = f"{case.outcome}, {case.seconds:.1f} s" + (f": {case.message}" if case.message else "")
            lines.append(f"| `{_escape(case.name)}` | {_escape(what)} | {_escape(happened)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    sources = [Path(arg) for arg in argv]
    if not sources:
        print("usage: python -m tests.reliability_report test-results/junit/*.xml", file=sys.stderr)
        return 2
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        print(f"no such file: {', '.join(missing)} (run `make test` first)", file=sys.stderr)
        return 2
    cases = [case for path in sources for case in _read_junit(path)]
    table = render(cases, sources=sources)
    document = DOC_PATH.read_text() if DOC_PATH.exists() else f"# Reliability\n\n{GENERATED_BEGIN}\n{GENERATED_END}\n"
    if GENERATED_BEGIN not in document or GENERATED_END not in document:
        print(f"{DOC_PATH} lacks the markers {GENERATED_BEGIN} / {GENERATED_END}", file=sys.stderr)
        return 2
    head, _, rest = document.partition(GENERATED_BEGIN)
    _, _, tail = rest.partition(GENERATED_END)
    DOC_PATH.write_text(f"{head}{GENERATED_BEGIN}\n{table}\n{GENERATED_END}{tail}")
    print(f"wrote {DOC_PATH}: {len(cases)} tests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
