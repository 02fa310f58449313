"""Mutation check: break the promise verification makes, one way at a time; the tests must notice.

Each mutation edits one line of a copy of this tree (the product or, for the property tests'
own premise, the test) and runs the tests that guard that promise in the copy. A mutation is
*killed* when at least one test fails; one that survives is a hole in the suite. Prints one line
per mutation and exits 1 when any survived.

    python benchmarks/mutations.py                 # all mutations
    python benchmarks/mutations.py --only rollback-broken first-output-only

The copy is made from the files git tracks (plus this tree's uncommitted changes to them) in a
temporary folder; nothing here is modified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUARDS = [
    "tests/test_verify.py", "tests/test_soundness.py", "tests/test_cli.py", "tests/test_gate.py", "tests/test_engine.py",
    "tests/test_faults.py", "tests/test_evidence.py", "tests/test_overridable.py", "tests/test_property.py",
]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...] = tuple(GUARDS)


MUTATIONS = [
    Mutation("rollback-broken", "the rewrite after a rollback no longer skips the offending sites",
             "rewriter/prove/rollback.py", "current = rewrite(loaded, rules, skip=sorted(skipped), only=only,",
             "current = rewrite(loaded, rules, skip=sorted(skip), only=only,"),
    Mutation("first-output-only", "verification compares only the first graph output",
             "rewriter/prove/verify.py", "        for out in orig.outputs:\n", "        for out in orig.outputs[:1]:\n"),
    Mutation("rtol-of-the-largest", "the per-element relative tolerance is scaled by the largest reference value",
             "rewriter/prove/compare.py", "np.maximum(tol.rtol * np.abs(b), 2.0 * noise)", "np.maximum(tol.rtol * np.abs(b).max(), 2.0 * noise)"),
    Mutation("properties-rewrite-nothing", "the property tests run with no rule (every example passes untouched)",
             "tests/test_property.py", 'RULE_SETS = {d: _REGISTRY.select(direction=d) for d in ("to-matmul", "to-conv")}',
             'RULE_SETS = {d: [] for d in ("to-matmul", "to-conv")}', ("tests/test_property.py",)),
    Mutation("no-site-evidence", "a site's boundary is never judged (only the graph outputs)",
             "rewriter/prove/evidence.py", "        bad = next((d for d in out_diffs if not d.passed and not d.vacuous), None)\n",
             "        bad = None\n"),
    Mutation("no-evidence-search", "verification tries no other inputs when there is no finite value",
             "rewriter/prove/inputs.py", "EVIDENCE_SEARCH = (\n    NORMAL,", "EVIDENCE_SEARCH = (\n    NORMAL,\n) or (\n    NORMAL,"),
    Mutation("overridable-read-as-constant", "shape inference reads initializers that are also graph inputs",
             "rewriter/engine/graph.py", "(kept if _keeps_values(t) and t.name not in fed else dropped)", "(kept if _keeps_values(t) else dropped)"),
    Mutation("untaken-branch-counted", "a site that never ran counts as verified",
             "rewriter/prove/evidence.py", "        if p.ran == 0:\n", "        if p.ran < 0:\n"),
    Mutation("outputs-not-compared-where-measured", "the benchmark does not compare the outputs at the measured shape",
             "rewriter/measure/bench.py", "    outputs = _outputs_check(sessions, feeds, provider) if len(sessions) == 2 else None",
             "    outputs = None"),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # `rewriter.rules` is the top-level rules/ folder (package-dir); in the copy, a link finds it.
    (dest / "rewriter" / "rules").symlink_to(dest / "rules", target_is_directory=True)


def run(mutation: Mutation, work: Path) -> tuple[bool, str, float]:
    target = work / mutation.path
    text = target.read_text()
    if text.count(mutation.old) != 1:
        return False, f"cannot apply: the line to change is not found once in {mutation.path}", 0.0
    target.write_text(text.replace(mutation.old, mutation.new))
    env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
                              cwd=work, env=env, capture_output=True, text=True)
    finally:
        target.write_text(text)
    failed = [ln.split(" ")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED ")]
    return proc.returncode != 0, (f"killed by {failed[0]}" if failed else proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="names of the mutations to run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    survived = 0
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-mutations-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        for m in chosen:
            killed, detail, seconds = run(m, work)
            survived += not killed
            print(f"{'killed  ' if killed else 'SURVIVED'} {m.name:38} {seconds:6.1f} s  {m.what}: {detail}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
