"""FOGZO cost vs plain STE in the same run (issue 4 targets: overhead beyond the forwards ≤ 10 %
of an STE step; peak memory ≤ 1.05× STE in the default mode).

For each model it prints t_ste (forward + backward + SGD step), t_fwd (no-grad forward + loss),
the FOGZO step time, its ratio to STE and the overhead beyond the forwards it must run,
(t_fogzo − t_ste − k·t_fwd) / t_ste with k = 2n (n one-sided), for n = 1 central, n = 1
one-sided and n = 4, in both restore modes and with ``keep_noise``.

Time: median over interleaved repetitions (each rep times ``--steps`` steps of every
configuration in turn, so machine noise hits all of them alike).
Peak memory of one step, after warm-up steps: live bytes before the step (parameters, gradients,
optimizer state, batch) + the peak of the torch CPU allocator's "Total Allocated" during the
step (torch.profiler memory events, relative to its value before the step) + the peak of NumPy's allocations during the step
(tracemalloc; FOGZO draws its CPU noise bits with NumPy, which torch's profiler does not see).
Summing the two peaks can only overstate FOGZO's peak.

    OMP_NUM_THREADS=1 python benchmarks/bench_fogzo.py [--reps 7 --steps 5 --models mlp,wide,cnn,llama]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import metaste

CONFIGS = {
    # name: FOGZO kwargs (None: plain STE)
    "ste": None,
    "n1-copy": dict(n=1),
    "n1-inplace": dict(n=1, restore="inplace"),
    "n1-keep": dict(n=1, keep_noise=True),
    "n1-1sided": dict(n=1, one_sided=True),
    "n1-1sided-inplace": dict(n=1, one_sided=True, restore="inplace"),
    "n4-copy": dict(n=4),
    "n4-inplace": dict(n=4, restore="inplace"),
}


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
    kw = CONFIGS[cfg]

    def closure():
        return loss_fn(model(x), y)

    if kw is None:

        def step():
            base.zero_grad(set_to_none=True)
            closure().backward()
            base.step()

        return model, base, step, closure
    opt = metaste.FOGZO(base, total_steps=10**6, **kw)
    return model, opt, (lambda: opt.step(closure)), closure


def peak_bytes(model, opt, step) -> int:
    for _ in range(2):
        step()
    live = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    live += [v for s in opt.state.values() if isinstance(s, dict) for v in s.values() if torch.is_tensor(v)]
    base = sum(t.numel() * t.element_size() for t in live)
    tracemalloc.start()
    tracemalloc.reset_peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    np_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]"]
    # "Total Allocated" is the allocator's running total: measure from its value before the step
    torch_peak = max([0] + [m["Total Allocated"] for m in mem]) - (
        mem[0]["Total Allocated"] - mem[0]["Bytes"]
    )
    return base + torch_peak + np_peak


def bench(name, spec, args) -> None:
    runs = {c: build(spec, c) for c in CONFIGS}
    _, x, y, loss_fn = spec
    fwd_model = runs["ste"][0]

    def fwd():
        with torch.no_grad():
            loss_fn(fwd_model(x), y)

    times = {c: [] for c in list(CONFIGS) + ["fwd"]}
    fns = {**{c: r[2] for c, r in runs.items()}, "fwd": fwd}
    for f in fns.values():
        f()
    for _ in range(args.reps):
        for c, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                f()
            times[c].append((time.perf_counter() - t0) / args.steps)
    med = {c: statistics.median(v) for c, v in times.items()}
    mem = {c: peak_bytes(*build(spec, c)[:3]) for c in CONFIGS}
    t_ste, t_fwd = med["ste"], med["fwd"]
    d = sum(e.weight.numel() for _, e in metaste.quantized_weights(runs["ste"][0]))
    print(f"\n### {name}: D = {d} managed weights, t_ste = {t_ste * 1e3:.2f} ms, "
          f"t_fwd = {t_fwd * 1e3:.2f} ms, STE peak = {mem['ste'] / 2**20:.2f} MiB\n")  # fmt: skip
    print(
        "| config | t_fogzo (ms) | × STE | floor 1 + k·t_fwd/t_ste | overhead beyond fwds | peak mem × STE |"
    )
    print("|---|---|---|---|---|---|")
    for c, kw in CONFIGS.items():
        if kw is None:
            continue
        k = kw["n"] * (1 if kw.get("one_sided") else 2)
        over = (med[c] - t_ste - k * t_fwd) / t_ste
        print(f"| {c} | {med[c] * 1e3:.2f} | {med[c] / t_ste:.2f} | {1 + k * t_fwd / t_ste:.2f} | "
              f"{100 * over:+.1f} % | {mem[c] / mem['ste']:.3f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="batch of the small MLP and the CNN")
    ap.add_argument("--models", default="mlp,wide,cnn,llama")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps} × {args.steps} steps"
    )
    specs = models(args.batch)
    for name in args.models.split(","):
        bench(name, specs[name], args)


if __name__ == "__main__":
    main()
