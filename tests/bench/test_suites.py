"""The suites and the regenerated results pages."""

import dataclasses
import math

import pytest
import torch

from metaste.bench import pages, suites
from metaste.bench.compare import Protocol, Setup, compare
from metaste.bench.runner import RunSpec, _run
from metaste.bench.tasks import get_task
from metaste.quant.registry import quantized_weights


def test_fogzo_mnist_quantizes_both_layers_with_the_lsq_init_fixed_step(monkeypatch):
    (entry,) = suites.SUITES["fogzo-mnist"]
    setup = entry.setup.resolved()
    assert (setup.bits, setup.quantizer, setup.optimizer, setup.steps) == (2, "fixed", "sgd", 3000)
    assert len(entry.protocol.seeds) == 20 and not set(entry.protocol.seeds) & set(entry.protocol.tune_seeds)
    floats = {
        n: m.weight.detach().clone()
        for n, m in get_task("mnist-mlp").model(0).named_modules()
        if hasattr(m, "weight")
    }
    seen = {}

    def build(model, ctx):
        seen.update(quantized_weights(model))
        raise StopIteration  # the model is all this test needs

    from metaste.bench import registry

    monkeypatch.setattr(registry.METHODS["ste"], "build", build)
    spec = RunSpec(
        "mnist-mlp", "ste", "ste", 0, 0.1, 1, setup.bits, setup.quantizer, quant=tuple(setup.quant.items())
    )
    with pytest.raises(StopIteration):
        _run(spec)
    assert len(seen) == 2  # both layers: the last one is not kept in float
    for name, entry_q in seen.items():
        w = floats[name.rsplit(".", 1)[0]]
        expected = 2 * w.abs().mean() / math.sqrt(1)  # Qp = 1 at 2 bits
        s = entry_q.quantizer.s
        assert not s.requires_grad
        torch.testing.assert_close(s, expected.reshape_as(s))


def test_every_suite_entry_is_a_valid_comparison():
    from metaste.bench.compare import check

    for entries in suites.SUITES.values():
        for e in entries:  # the gpu suite's entries are checked here on the CPU (the device apart)
            check(dataclasses.replace(e.setup, device="cpu"), e.protocol)


def test_report_regeneration_is_idempotent_and_replaces_only_its_block(tmp_path, monkeypatch):
    comp = compare(
        Setup("digits-mlp", steps=6),
        Protocol(["ste", "ste-identity", "fogzo"], seeds=[0, 1], tune_seeds=[100], tune_lr=[0.1]),
        log=lambda _: None,
    )
    entry = suites.SuiteEntry("tiny", "digits, 6 steps", Setup("digits-mlp"), Protocol(["ste"], [0]))
    monkeypatch.setattr(suites, "SUITES", {"tiny": [entry]})
    results = tmp_path / "docs" / "results"
    comp.save(results / "tiny" / "tiny.comparison.json")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:answer -->\nold\n<!-- /results:answer -->\noutro\n")
    doc = tmp_path / "docs" / "results.md"
    page = tmp_path / "docs" / "methods" / "page.md"
    page.parent.mkdir(parents=True)
    page.write_text("a\n<!-- results:suite:tiny -->\nold\n<!-- /results:suite:tiny -->\nb\n")
    pages.write_reports(results, doc, readme)
    first = (readme.read_text(), doc.read_text(), page.read_text())
    pages.write_reports(results, doc, readme)
    assert (readme.read_text(), doc.read_text(), page.read_text()) == first
    assert first[2].startswith("a\n<!-- results:suite:tiny -->\n- **digits, 6 steps** (`tiny`)\n  - `ste` vs")
    assert first[2].endswith("<!-- /results:suite:tiny -->\nb\n") and "old" not in first[2]
    assert "  - `fogzo` vs best STE" in first[2]
    text = first[0]
    assert text.startswith("intro\n<!-- results:answer -->\n") and text.endswith(
        "<!-- /results:answer -->\noutro\n"
    )
    (answer,) = [line for line in text.splitlines() if line.startswith("| digits-mlp 2-bit lsq, sgd")]
    assert "old" not in text and "| `tiny` |" in answer and "| `fogzo` " in answer  # the one metaste method
    assert answer.count("|") == 8 and answer.rstrip().endswith("| — |")  # no PARQ listed
    doc_text = first[1]
    assert doc_text.index("## The answer") < doc_text.index("## Every verdict") < doc_text.index("### digits")
    assert "**tiny**: `fogzo` vs best STE" in doc_text
    (row,) = [line for line in doc_text.splitlines() if line.startswith("| `fogzo` | ")][:1]
    assert sum(int(c) for c in row.split("|")[2:5]) == 1  # one comparison, one equal-steps verdict


def test_replace_block_names_a_missing_block():
    with pytest.raises(ValueError, match="results:demo"):
        pages.replace_block("no markers here", "demo", "x")


def test_gpu_scale_enlarges_the_tasks_and_runs_on_cpu():
    llama = get_task("kjv-llama", "gpu")
    assert 9e6 < sum(p.numel() for p in llama.model(0).parameters()) < 11e6
    resnet = get_task("fashion-resnet", "gpu").model(0)
    assert sum(p.numel() for p in resnet.parameters()) > 2.5e5  # ResNet-20
    r = _run(RunSpec("digits-mlp", "fogzo", "fogzo", 0, 0.1, 3, 2, "lsq", scale="gpu"))
    assert len(r.losses) == 3 and not r.diverged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda_puts_model_and_data_on_the_gpu():
    r = _run(RunSpec("digits-mlp", "fogzo", "fogzo", 0, 0.1, 5, 2, "lsq", device="cuda"))
    assert len(r.losses) == 5 and not r.diverged
