"""Test configuration: Hypothesis profiles and the `slow` marker.

Profiles (pick one with the environment variable HYPOTHESIS_PROFILE):
  default   quick: few examples and small shapes, so the whole suite stays within CI's 10-minute
            budget on 2 cores. Used when nothing is set.
  ci        `default` with derandomize=True: the same examples on every run, so a red CI run
            is reproducible on a laptop (`CI=1 python -m pytest`). Chosen automatically when the
            CI environment variable is set and HYPOTHESIS_PROFILE is not.
  thorough  many more examples and bigger shapes (test modules read HYPOTHESIS_PROFILE to widen
            their shape strategies); also runs the slow tests. Minutes, not for CI:
            `HYPOTHESIS_PROFILE=thorough python -m pytest`.
All profiles use deadline=None: the first call of a torch op (and any torch.compile) is slow and
would trip Hypothesis' per-example deadline without saying anything about the code under test.

Device: VMAMBA_TEST_DEVICE=cuda runs the numeric tests of the scan (against the float64
reference, gradients, gradcheck, goldens, compiled = Triton), of the model (official fixtures,
compiled vs eager, gradients, checkpointing) and all of test_compile.py on the GPU; the rest
stays on the CPU. TF32 is switched off there: the tolerances are float32's (test_scan.py).
`VMAMBA_TEST_DEVICE=cuda python -m pytest -q`

Slow tests (`@pytest.mark.slow`, e.g. the L = 4096 scan) are skipped unless asked for with
`-m slow` (or any -m expression naming `slow`) or the thorough profile is active.

Order: the default tests that take minutes (`@pytest.mark.minutes`: whole-model compiles, about
4 minutes each on CI's 2 cores) are placed first, last, second, second to last, ... in the
collection. README's command (`-n 2 --dist worksteal`) hands each of the two workers one half
of the collection, and a worker's last two queued tests cannot be stolen, so two such tests
side by side in one file ran one after the other (9+ minutes with an empty Inductor cache);
placed this way the two workers start them at once.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=10, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)

DEVICE = os.environ.get("VMAMBA_TEST_DEVICE", "cpu")
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
PROFILES = ("default", "ci", "thorough")


def pytest_configure(config):
    if PROFILE not in PROFILES:
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE={PROFILE!r}: use one of {', '.join(PROFILES)}")
    settings.load_profile(PROFILE)
    if DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"VMAMBA_TEST_DEVICE={DEVICE!r}: use cpu or cuda")
    if DEVICE == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise pytest.UsageError("VMAMBA_TEST_DEVICE=cuda, but torch.cuda.is_available() is "
                                    f"False (torch {torch.__version__})")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE}; device for the numeric tests: {DEVICE}"


def pytest_collection_modifyitems(config, items):
    minutes = [item for item in items if "minutes" in item.keywords]
    rest = [item for item in items if "minutes" not in item.keywords]
    items[:] = minutes[0::2] + rest + minutes[1::2][::-1]
    if PROFILE == "thorough" or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow or HYPOTHESIS_PROFILE=thorough")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
