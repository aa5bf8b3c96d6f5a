"""Smoke tests of train.py: its data has the documented shapes, its model learns, and it runs
data-parallel under torchrun (2 CPU processes, gloo) and compiled.

Skipped when scikit-learn (the `train` extra, which ships the digits) is not installed.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
import train  # noqa: E402  (after the skip: train.py's loader needs scikit-learn)


@pytest.fixture(scope="module")
def digits():
    return train.load_digits_split(res=32, seed=0)


def test_split_shapes_labels_and_normalisation(digits):
    x_tr, y_tr, x_te, y_te = digits
    assert x_tr.shape == (1437, 3, 32, 32) and x_te.shape == (360, 3, 32, 32)
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    for y in (y_tr, y_te):   # stratified: every digit on both sides
        assert sorted(y.unique().tolist()) == list(range(10))
    # ...in proportion: each digit's test count is 20% of its samples, to rounding
    tr, te = torch.bincount(y_tr, minlength=10), torch.bincount(y_te, minlength=10)
    assert ((te - 0.2 * (tr + te)).abs() <= 1).all(), te
    assert abs(x_tr.mean().item()) < 1e-4 and abs(x_tr.std().item() - 1) < 1e-4
    assert torch.equal(x_tr[:, 0], x_tr[:, 2])   # a grey image copied to 3 channels


def test_split_is_fixed_by_the_seed(digits):
    again = train.load_digits_split(res=32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(digits, again))
    other = train.load_digits_split(res=32, seed=1)
    assert not torch.equal(digits[1], other[1])
    assert train.load_digits_split(res=16, seed=0)[0].shape == (1437, 3, 16, 16)


def test_random_shift_moves_content_and_keeps_shape(digits):
    x = digits[0][:8]
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(train.random_shift(x, 0), x)
    y = train.random_shift(x, 4, gen)
    assert y.shape == x.shape
    assert not torch.equal(y, x)
    # content only moves: the background (minimum) stays, nothing new appears above the maximum
    assert torch.allclose(y.amin(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)))
    assert (y.amax(dim=(1, 2, 3)) <= x.amax(dim=(1, 2, 3)) + 1e-6).all()


def test_warmup_cosine_schedule():
    f = train.warmup_cosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    steps = [f(s) for s in range(111)]                 # up to the peak at the warm-up's end,
    assert max(steps) == pytest.approx(1.0) and steps.index(max(steps)) in (9, 10)   # never past
    assert all(a <= b for a, b in zip(steps[:10], steps[1:11]))
    assert all(a >= b for a, b in zip(steps[10:], steps[11:]))   # then only down


def test_loss_falls_on_a_fixed_batch(digits):
    """Fifteen AdamW steps on one fixed batch of 64 training digits, the train.py model and
    loss (label smoothing 0.1), constant lr, no augmentation, no drop-path.

    Why 0.7: at init the head's logits are small (trunc_normal std 0.02 on 256 unit-variance
    features: std ~0.3), so the loss starts near ln(10) = 2.30 (checked below); guessing the
    batch's class frequencies only reaches ~2.25.
    With label smoothing 0.1 the floor is 0.50 (p = 0.91 on the target, 0.01 elsewhere). Below
    0.7 * 2.30 = 1.61 the model must be telling the digits of the batch apart."""
    x_tr, y_tr = digits[0][:64], digits[1][:64]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small ops: one thread is faster than two on a busy 2-core CI box
    try:
        torch.manual_seed(0)
        model = train.build_model(drop_path_rate=0.0)
        opt = train.build_optimizer(model, lr=2e-3)
        losses = [train.train_step(model, opt, x_tr, y_tr) for _ in range(15)]
    finally:
        torch.set_num_threads(threads)
    assert abs(losses[0] - math.log(10)) < 0.25, losses[0]
    assert min(losses[-3:]) < 0.7 * losses[0], losses
    assert all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------------------------------------
# train.py as a program: under torchrun, and compiled
# ---------------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
# A short run: 16 px images (4x4 .. 1x1 maps), global batch 32, 20 steps (warm-up 4, then the
# cosine); one thread per process so that 2 processes share 2 cores without oversubscription.
SHORT = ["--res", "16", "--batch-size", "32", "--max-steps", "20"]


def run_train(tmp_path, *args, nproc=1):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc > 1:                   # the CPU (gloo) path, also on a machine with fewer GPUs
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(launch + ["train.py", *SHORT, "--save", str(tmp_path), *args], cwd=HERE,
                         env=env, capture_output=True, text=True, timeout=600)   # a hang guard
    assert out.returncode == 0, out.stdout + out.stderr
    # DDP's bucket views take each parameter's strides; a gradient of other strides is copied
    # into its bucket on every step, with this warning (seen: a depthwise conv's weight, whose
    # gradient came back channels-last)
    assert "Grad strides do not match" not in out.stderr, out.stderr
    return out.stdout, [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]


def assert_learns(losses):
    """Twenty steps on fresh batches. The loss starts near ln(10) = 2.30, and knowing only the
    class frequencies gets it to ~2.25 (see test_loss_falls_on_a_fixed_batch). Step losses are
    noisy (batch 32, drop-path, random shifts: about +-0.2 step to step, observed), so a mean
    of four varies by ~0.1: below 2.15 is that far under the class-frequency floor, i.e. the
    model tells some digits apart. Observed under torchrun: 1.89."""
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses), losses
    assert abs(losses[0] - math.log(10)) < 0.25, losses
    assert sum(losses[-4:]) / 4 < 2.15, losses


def test_torchrun_two_processes_stay_in_sync(tmp_path):
    """2 processes (gloo): each trains on its own half of every batch, with its own
    augmentation, so only DDP's gradient averaging keeps their weights equal: bit for bit,
    as every process applies the same averaged gradient with the same optimiser."""
    stdout, (r0, r1) = run_train(tmp_path, nproc=2)
    assert "2 process(es)" in stdout and "(16 per process)" in stdout
    assert stdout.count("test accuracy") == 1          # rank 0 alone reports
    assert r0["state_dict"].keys() == r1["state_dict"].keys()
    for name, t in r0["state_dict"].items():
        assert torch.equal(t, r1["state_dict"][name]), name
    assert r0["losses"] == r1["losses"]                 # all-reduced: the global batch's loss
    assert_learns(r0["losses"])
    # ...and they did move from the shared initial weights
    torch.manual_seed(0)
    init = train.build_model().state_dict()
    assert not torch.equal(init["head.weight"], r0["state_dict"]["head.weight"])


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """Seen on a one-GPU machine: the second torchrun process asked for cuda:1 and died in
    torch.cuda.set_device ("invalid device ordinal") before saying what to change."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match=r"1 GPU\(s\).*nproc_per_node.*CUDA_VISIBLE_DEVICES"):
        train.setup_processes()


@pytest.mark.parametrize("argv, match", [
    (["--epochs", "-1"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
    (["--max-steps", "-3"], "--max-steps"), (["--lr", "0"], "--lr"),
    (["--drop-path", "1.5"], "--drop-path"), (["--res", "2"], "--res"),
    (["--save", __file__], "--save"), (["--lr", "inf"], "--lr"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 32)], "--seed"), (["--batch-size", "100000"], "--batch-size"),
    (["--save", os.path.join(__file__, "out")], "--save")])
def test_bad_arguments_are_usage_errors(argv, match, capsys):
    """Seen: a negative --epochs or --max-steps trained nothing and exited 0; --lr inf trained
    to a NaN loss and exited 0; a seed out of scikit-learn's range, a batch larger than the
    training set, or a --save folder that cannot be made (after training), ended in a
    traceback."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]       # after the usage lines
    assert e.value.code == 2 and match in error
    assert ("--drop-path" in error) == (match == "--drop-path")   # only the option at fault


def test_a_batch_that_the_processes_cannot_share_is_a_usage_error(monkeypatch, capsys):
    """Under torchrun a global batch not divisible by the number of processes ended in a
    traceback per process; it is a usage error before the process group starts."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        train.main(["--batch-size", "63"])
    assert e.value.code == 2 and "multiple of the number of processes, 2" in \
        capsys.readouterr().err


def test_optimizer_steps_whatever_the_layouts_of_gradients_and_state():
    """torch's fused AdamW on a CPU reads a gradient or a state tensor of another layout than
    its parameter's in the parameter's order: a contiguous conv weight with a channels-last
    gradient, or state saved from a model of the other layout, took silently wrong steps (a
    review helper's find). build_optimizer's steps equal the unfused optimizer's."""
    def steps(fused, grad_layout, state_layout):
        torch.manual_seed(0)
        model = train.build_model(dim=16, depths=(1, 1)).to(memory_format=torch.channels_last)
        opt = train.build_optimizer(model)
        if not fused:                                         # the same groups, one by one
            opt = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                                     for g in opt.param_groups], foreach=False)
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(model.parameters())]
        for step in range(3):
            for p, g in zip(model.parameters(), grads):
                p.grad = (g * (step + 1)).contiguous(
                    memory_format=grad_layout if g.dim() == 4 else torch.contiguous_format)
            opt.step()
            for state in opt.state.values():             # as if loaded from another layout
                for k, v in state.items():
                    if v.dim() == 4:
                        state[k] = v.contiguous(memory_format=state_layout)
        return [p.detach().clone() for p in model.parameters()]
    want = steps(False, torch.channels_last, torch.channels_last)
    for layouts in ((torch.contiguous_format, torch.channels_last),
                    (torch.channels_last, torch.contiguous_format)):
        for got, w in zip(steps(True, *layouts), want, strict=True):
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)


def test_optimizer_groups_are_the_same_for_a_compiled_or_wrapped_model():
    """Seen: given torch.compile(model), whose parameter names carry an `_orig_mod.` prefix,
    A_logs took weight decay."""
    model = train.build_model(dim=16, depths=(1, 1))

    def groups(m):
        return [{id(p) for p in g["params"]} for g in train.build_optimizer(m).param_groups]
    plain = groups(model)
    a_logs = {id(p) for n, p in model.named_parameters() if n.endswith("A_logs")}
    assert a_logs and a_logs <= plain[1] and not a_logs & plain[0]
    for n, p in model.named_parameters():   # decay on matrices; none on biases, norms, A, D
        exempt = p.dim() < 2 or n.endswith((".A_logs", ".Ds"))
        assert (id(p) in plain[1], id(p) in plain[0]) == (exempt, not exempt), n
    assert groups(torch.compile(model)) == plain
    assert groups(torch.nn.Sequential(model)) == plain
    with pytest.raises(TypeError, match="no_weight_decay"):
        train.build_optimizer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a model.*got generator"):   # torch.optim's habit
        train.build_optimizer(model.parameters())
    from vmamba_min import Backbone
    backbone = Backbone(model.config)                        # the detection backbone too
    assert backbone.no_weight_decay() == model.no_weight_decay()
    assert groups(backbone)[1] >= {id(p) for n, p in backbone.named_parameters()
                                   if n.endswith(("A_logs", "Ds"))}


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """train.py --compile (fullgraph) trains, and follows the eager run of the same seed step for
    step. Slow: compiling the forward and backward takes one to four minutes on 2 cores.

    Tolerance: Inductor fuses and reorders float32 sums, so each step's loss moves by float32
    rounding (~1e-7 relative); twenty Adam steps carried that to at most 1e-6 (observed: the
    compiled run also draws the same drop-path masks). 1e-4 leaves two orders of margin, and is
    far below what a wrong gradient or a different data order would cause (> 1e-2)."""
    stdout, (compiled,) = run_train(tmp_path / "compiled", "--compile")
    assert "compiled: model" in stdout and "test accuracy" in stdout
    assert_learns(compiled["losses"])
    _, (eager,) = run_train(tmp_path / "eager")
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=0, abs=1e-4)


@pytest.mark.slow
def test_compile_blocks_training_matches_eager(tmp_path):
    """train.py --compile blocks (vmamba_min.compile_blocks: the four stages' blocks compiled,
    forward and backward; evaluation forced eager) trains and follows the eager run step for
    step, with the tolerance of the test above and for the same reason. Slow: over a minute of
    compiling on 2 cores with an empty Inductor cache, too much for CI's 10-minute budget.
    Drop-path off: compile_blocks draws its masks from another random stream
    (vmamba_min.DropPath), so with it on, the two runs differ by their masks."""
    stdout, (compiled,) = run_train(tmp_path / "blocks", "--compile", "blocks", "--drop-path", "0")
    assert "compiled: blocks" in stdout and "test accuracy" in stdout
    assert_learns(compiled["losses"])
    _, (eager,) = run_train(tmp_path / "eager", "--drop-path", "0")
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=0, abs=1e-4)
    assert compiled["state_dict"].keys() == eager["state_dict"].keys()
