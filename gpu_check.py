"""gpu_check.py: a short check for a machine with a GPU (about two minutes on an H200).

The chunked scan on CUDA against the same scan in float64 on CUDA, eager and compiled (Triton),
output and all seven gradients, at the stage-1 shapes of v0 and v2, with CUDA-event timings;
then both models' eager inference at batch 1 and 128 (ms, img/s, peak memory). Prints one JSON
line per result and appends them to $OUT/gpu.jsonl (or ./gpu.jsonl). `bench.py --device cuda`
is the full comparison; this is the quick one.
"""
import json
import os
import sys
import time

import torch

import scan
import vmamba_min

if not torch.cuda.is_available():
    sys.exit("gpu_check.py: needs CUDA (torch.cuda.is_available() is False)")
out = open(os.path.join(os.environ.get("OUT", "."), "gpu.jsonl"), "a")
DEV = "cuda"


def emit(**kw):
    print(kw, flush=True)
    out.write(json.dumps(kw) + "\n")
    out.flush()


def event_ms(fn, n=20):
    """Mean ms per call over n calls after 2 warm-ups, timed with CUDA events."""
    fn(), fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def scan_rows(name, KD, L, N, g):
    a = [torch.randn(1, KD, L, generator=g), 0.1 * torch.randn(1, KD, L, generator=g),
         -torch.arange(1, N + 1.).repeat(KD, 1), torch.randn(1, 4, N, L, generator=g),
         torch.randn(1, 4, N, L, generator=g), torch.ones(KD), torch.full((KD,), -4.)]
    gy = torch.randn(1, KD, L, generator=g).to(DEV)
    ref = [t.to(DEV, torch.float64).requires_grad_() for t in a]
    y_ref = scan.selective_scan(*ref, delta_softplus=True)
    y_ref.backward(gy.double())
    for mode in ("eager", "compiled"):
        f = scan.selective_scan if mode == "eager" else \
            torch.compile(scan.selective_scan, fullgraph=True)
        x = [t.to(DEV).requires_grad_() for t in a]
        t0 = time.time()
        y = f(*x, delta_softplus=True)
        y.backward(gy)
        torch.cuda.synchronize()
        first = time.time() - t0

        def rel(p, q):
            return ((p.double() - q).abs().max() / q.abs().max()).item()

        def fwd():
            with torch.no_grad():
                f(*x, delta_softplus=True)

        def fwd_bwd():
            for t in x:
                t.grad = None
            f(*x, delta_softplus=True).backward(gy)

        errs = [rel(y, y_ref)] + [rel(p.grad, q.grad) for p, q in zip(x, ref)]
        fwd_bwd()
        emit(scan=name, mode=mode, first_call_s=round(first, 1),
             max_rel_err_y_and_grads=max(errs), fwd_ms=round(event_ms(fwd), 3),
             fwd_bwd_ms=round(event_ms(fwd_bwd), 3))


def model_rows(model):
    m = vmamba_min.build(model).eval().to(DEV)
    for batch in (1, 128):
        x = torch.randn(batch, 3, 224, 224, device=DEV)

        def run():
            with torch.no_grad():
                m(x)

        torch.cuda.reset_peak_memory_stats()
        ms = event_ms(run, 5 if batch > 1 else 20)
        emit(model=model, batch=batch, mode="eager", ms=round(ms, 2),
             img_s=round(1e3 * batch / ms, 1),
             peak_mb=round(torch.cuda.max_memory_allocated() / 2**20))


if __name__ == "__main__":
    emit(torch=torch.__version__, gpu=torch.cuda.get_device_name())
    gen = torch.Generator().manual_seed(0)
    for name, shape in {"v0": (768, 3136, 16), "v2": (384, 3136, 1)}.items():
        scan_rows(name, *shape, gen)
    for model in ("vmamba_tiny_s1l8", "vanilla_vmamba_tiny"):
        model_rows(model)
