"""FOGZO cost vs plain STE in the same run (targets: overhead beyond the forwards ≤ 10 %
of an STE step at n = 1 and n = 4; peak memory ≤ 1.05× STE in the default mode).

For each model it reports t_ste (forward + backward + SGD step), t_fwd (no-grad forward + loss),
the FOGZO step time, its ratio to STE, the floor 1 + k·t_fwd/t_ste (the forwards FOGZO must
run, k = 2n, n one-sided) and the overhead beyond that floor, (t_fogzo − t_ste − k·t_fwd) /
t_ste, for n = 1 (both restore modes, ``keep_noise``, one-sided) and n = 4.

Time: CPU time and wall time per step, medians and min–max spread over interleaved rounds
(:mod:`_measure`); the overhead uses the CPU-time medians. Peak memory: peak resident bytes of
one step above the process's size before the build, each configuration in a fresh process
(:func:`_measure.peak_bytes`). Run with one thread::

    OMP_NUM_THREADS=1 python benchmarks/bench_fogzo.py [--reps 5 --steps 3 --models mlp,wide,cnn,llama]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import fmt, interleaved, peak_bytes, ratio, summary  # noqa: E402

import metaste  # noqa: E402  (the checkout's, or $METASTE_PATH: _measure)

CONFIGS = {
    # name: FOGZO kwargs (None: plain STE)
    "ste": None,
    "n1-copy": dict(n=1, restore="copy"),
    "n1-inplace": dict(n=1, restore="inplace"),
    "n1-keep": dict(n=1, keep_noise=True),
    "n1-1sided": dict(n=1, one_sided=True),
    "n4-copy": dict(n=4, restore="copy"),
    "n4-inplace": dict(n=4, restore="inplace"),
}
#: plain STE with its gradients kept between steps (``zero_grad(set_to_none=False)``): a memory
#: reference only. FOGZO holds the clean gradient through its perturbed forwards; the plain STE
#: step (``set_to_none=True``) never has gradients and a forward's temporaries alive together.
STE_KEPT = "ste-kept-grads"


class Block(nn.Module):
    """A LLaMA block: RMSNorm, causal attention, RMSNorm, SwiGLU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.gate, self.down = (
            nn.Linear(d, 4 * d, bias=False),
            nn.Linear(d, 4 * d, bias=False),
            nn.Linear(4 * d, d, bias=False),
        )

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        return self.head(self.norm(self.blocks(self.emb(idx))))


def models(batch: int) -> dict:
    """name -> (float model, input, target, loss)."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 1, 28, 28, generator=g)
    lab = torch.randint(0, 10, (batch,), generator=g)
    tok = torch.randint(0, 96, (16, 65), generator=g)
    ce = F.cross_entropy
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10)), img, lab, ce),
        "wide": (
            nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10)),
            torch.randn(256, 1, 28, 28, generator=g),
            torch.randint(0, 10, (256,), generator=g),
            ce,
        ),
        "cnn": (
            nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
            ),
            img,
            lab,
            ce,
        ),
        "llama": (TinyLlama(), tok[:, :-1], tok[:, 1:], lambda out, y: ce(out.flatten(0, 1), y.flatten())),
    }  # fmt: skip


def build(spec, cfg):
    net, x, y, loss_fn = spec
    torch.manual_seed(0)
    model = metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate="identity")
    base = torch.optim.SGD(model.parameters(), lr=1e-3)
    kw = None if cfg == STE_KEPT else CONFIGS[cfg]

    def closure():
        return loss_fn(model(x), y)

    if kw is None:

        def step():
            base.zero_grad(set_to_none=cfg != STE_KEPT)
            closure().backward()
            base.step()

        return model, base, step, closure
    opt = metaste.FOGZO(base, total_steps=10**6, **kw)
    return model, opt, (lambda: opt.step(closure)), closure


def build_step(name: str, cfg: str, batch: int = 64):
    """The step function of one configuration (for the memory measurement in a fresh process)."""
    return build(models(batch)[name], cfg)[2]


def bench(name, spec, args) -> dict:
    runs = {c: build(spec, c) for c in CONFIGS}
    _, x, y, loss_fn = spec
    fwd_model = runs["ste"][0]

    def fwd():
        with torch.no_grad():
            loss_fn(fwd_model(x), y)

    fns = {**{c: r[2] for c, r in runs.items()}, "fwd": fwd}
    times = interleaved(fns, args.reps, args.steps)
    mem = {c: peak_bytes("bench_fogzo", "build_step", name=name, cfg=c, batch=args.batch) for c in CONFIGS}
    med = {c: summary(v["cpu"])[0] for c, v in times.items()}
    t_ste, t_fwd = med["ste"], med["fwd"]
    d = sum(e.weight.numel() for _, e in metaste.quantized_weights(runs["ste"][0]))
    rows = {}
    for c, kw in CONFIGS.items():
        if kw is None:
            continue
        k = kw["n"] * (1 if kw.get("one_sided") else 2)
        rows[c] = {
            "cpu_ms": summary([t * 1e3 for t in times[c]["cpu"]]),
            "wall_ms": summary([t * 1e3 for t in times[c]["wall"]]),
            "cpu_ratio": ratio(times[c]["cpu"], times["ste"]["cpu"]),
            "floor": 1 + k * t_fwd / t_ste,
            "overhead": (med[c] - t_ste - k * t_fwd) / t_ste,
            "mem_ratio": mem[c] / mem["ste"],
        }
    kept = peak_bytes("bench_fogzo", "build_step", name=name, cfg=STE_KEPT, batch=args.batch)
    return {
        "D": d,
        "t_ste_ms": summary([t * 1e3 for t in times["ste"]["cpu"]]),
        "t_fwd_ms": summary([t * 1e3 for t in times["fwd"]["cpu"]]),
        "ste_peak_mib": mem["ste"] / 2**20,
        "ste_kept_peak_mib": kept / 2**20,
        "rows": rows,
    }


def print_model(name: str, r: dict) -> None:
    print(
        f"\n### {name}: D = {r['D']} managed weights, t_ste = {fmt(r['t_ste_ms'])} ms, "
        f"t_fwd = {fmt(r['t_fwd_ms'])} ms (CPU), STE peak = {r['ste_peak_mib']:.2f} MiB "
        f"({r['ste_kept_peak_mib']:.2f} MiB with its gradients kept between steps)\n"
    )
    print(
        "| config | CPU ms/step | × STE (CPU) | wall ms/step | floor 1 + k·t_fwd/t_ste | overhead beyond fwds | peak mem × STE |"
    )
    print("|---|---|---|---|---|---|---|")
    for c, row in r["rows"].items():
        print(
            f"| {c} | {fmt(row['cpu_ms'])} | {fmt(row['cpu_ratio'])} | {fmt(row['wall_ms'])} | {row['floor']:.2f} "
            f"| {100 * row['overhead']:+.1f} % | {row['mem_ratio']:.3f} |"
        )


def run(reps: int = 5, steps: int = 3, batch: int = 64, names: str = "mlp,wide,cnn,llama") -> dict:
    """{model: bench(...)} for the comma-separated ``names`` (one thread)."""
    torch.set_num_threads(1)
    args = argparse.Namespace(reps=reps, steps=steps, batch=batch)
    specs = models(batch)
    return {name: bench(name, specs[name], args) for name in names.split(",")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="batch of the small MLP and the CNN")
    ap.add_argument("--models", default="mlp,wide,cnn,llama")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads 1, reps {args.reps} × {args.steps} steps")
    results = {}
    for name in args.models.split(","):
        results.update(run(args.reps, args.steps, args.batch, name))
        print_model(name, results[name])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
