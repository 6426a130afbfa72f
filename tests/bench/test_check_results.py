"""benchmarks/check_results.py: a saved comparison's runs are rebuilt exactly from its JSON (each
method's re-run gives the saved metric, the extended equal-compute baseline included), and a run
whose saved metric the code no longer gives is reported."""

import importlib.util
import json
from pathlib import Path

from metaste.bench.compare import Protocol, Setup, compare

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("check_results", ROOT / "benchmarks" / "check_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_saved_comparison_reproduces_and_a_changed_metric_is_reported(tmp_path):
    tool = _tool()
    protocol = Protocol(["ste", "fogzo"], seeds=[0], tune_seeds=[100], tune_lr=[0.1])
    comp = compare(Setup(task="digits-mlp", steps=12), protocol, workers=1, log=lambda _: None)
    path = comp.save(tmp_path / "tiny.comparison.json")
    saved = json.loads(path.read_text())
    assert any(r["steps"] != 12 for r in saved["runs"])  # the baseline ran on for equal compute

    rows = tool.check([path])
    assert {label for _, label, _, _ in rows} == {"ste", "fogzo"}
    assert all(tool.reproduces(s, now) for _, _, s, now in rows)

    saved["runs"][0]["final_metric"] += 1.0  # as if the code had changed since it was saved
    path.write_text(json.dumps(saved))
    stale = [label for _, label, s, now in tool.check([path]) if not tool.reproduces(s, now)]
    assert stale == [saved["runs"][0]["label"]]
