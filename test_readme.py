"""README's Python blocks run as written, so the front page cannot rot.

Every ```python block of README.md is one test, executed in a fresh namespace from a temporary
working directory. The official-checkpoint block reads a file named as the official release's
VMamba-T: the test writes one there first, in the released checkpoints' key spelling (every key
and shape from fixtures/configs/vmamba_tiny_s1l8.json), wrapped as the official trainer saves
it (weights under "model" and "model_ema", an optimizer entry, and a config object of a class
the loader must not import). Blocks that import timm are skipped where timm is not installed.
"""
import json
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
CHECKPOINT = "vssm1_tiny_0230s_ckpt_epoch_264.pth"


class TrainerConfig:
    """Stands in for the official trainer's yacs CfgNode: pickled by reference to this module,
    which the safe loader must never import."""

    def __init__(self):
        self.MODEL = {"TYPE": "vssm"}


def write_official_checkpoint(path):
    """A checkpoint of vmamba_tiny_s1l8 in the released spelling, with random values; returns
    the state dict (our names) a correct loader must produce."""
    spec = json.loads((ROOT / "fixtures/configs/vmamba_tiny_s1l8.json").read_text())
    g = torch.Generator().manual_seed(0)
    sd = {e["key"]: torch.randn(e["shape"], generator=g)
          for e in spec["classification_version"]["state_dict"]}
    torch.save({"model": sd, "model_ema": sd, "optimizer": {"state": {}}, "epoch": 264,
                "config": TrainerConfig()}, path)
    return sd


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, f"README.md: found {len(BLOCKS)} ```python blocks"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if re.search(r"^import timm|^from timm", code, flags=re.M):
        pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    released = write_official_checkpoint(tmp_path / CHECKPOINT) if CHECKPOINT in code else None
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if released is not None:
        # The block loaded the file into `model`: every released tensor reached its parameter.
        loaded = namespace["model"].state_dict()
        assert len(loaded) == len(released)
        assert sum(v.numel() for v in loaded.values()) == sum(
            v.numel() for v in released.values())
        pe = namespace["model"].patch_embed.conv1.weight
        assert torch.equal(pe, released["patch_embed.0.weight"])
        if "tuned" in namespace:      # the fine-tuning model: all but the head from the file
            strict, tuned = namespace["model"].state_dict(), namespace["tuned"].state_dict()
            assert tuned.keys() == strict.keys() and tuned["head.weight"].shape[0] == 10
            assert all(torch.equal(tuned[k], strict[k])
                       for k in strict if not k.startswith("head."))


def test_readme_results_come_from_the_reports():
    """Every figure README's Results section quotes from a report (a number with a decimal
    point, an "x" ratio, "<n> MB", "<n> s" or "<n>%"), CPU and GPU paragraphs alike, appears in a
    generated report the section cites, so the front page cannot drift from
    docs/results-<platform>.md."""
    quoted = README.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    cited = sorted({p for p in re.findall(r"docs/results-(\w+)\.md", quoted)
                    if (ROOT / f"docs/results-{p}.md").exists()})
    assert cited, "README's Results section cites no existing docs/results-<platform>.md"
    reports = "\n".join((ROOT / f"docs/results-{p}.md").read_text() for p in cited)
    figures = re.findall(r"(?<![\w.-])\d+\.\d+x?(?![\w.])|(?<![\w.])\d+(?= MB| s\b)"
                         r"|(?<![\w.])\d+(?:\.\d+)?(?=%)", quoted)
    assert len(figures) >= 10, f"README's Results section quotes few figures: {figures}"
    seconds = set(re.findall(r"(?<![\w.])\d+(?= s\b)", quoted))   # whole seconds: as "<n> s"
    missing = [f for f in figures if not re.search(
        rf"(?<![\w.]){re.escape(f)}{' s' if f in seconds else ''}(?![\w.])", reports)]
    assert not missing, f"README quotes figures its reports do not hold: {missing}"


def test_installed_modules_import_only_installed_modules():
    """`pip install .` ships pyproject's py-modules only: a module of this repository that one of
    them imports must be among them, or `import vmamba_min` fails outside the checkout (the
    tests run inside it, where every file is importable)."""
    import ast
    tomllib = pytest.importorskip("tomllib")              # Python >= 3.11
    shipped = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                  ["py-modules"])
    local = {p.stem for p in ROOT.glob("*.py")}
    for name in sorted(shipped):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert imported & local <= shipped, (name, sorted(imported & local - shipped))


def test_readme_names_the_commands_that_wrote_its_reports():
    """The command README's Results section gives for a report is the one in that report's
    header, so a reader re-running it regenerates the same tables."""
    section = " ".join(README.split("\n## Results", 1)[1].split("\n## ", 1)[0].split())
    for report in sorted(ROOT.glob("docs/results-*.md")):
        header = re.search(r"^\| command \| `([^`]+)` \|$", report.read_text(), flags=re.M)
        assert header, f"{report.name}: no command in its header"
        if f"docs/{report.name}" in section:
            assert f"`{header.group(1)}`" in section, (
                f"README's Results section cites {report.name} but not its command "
                f"{header.group(1)!r}")


def test_every_bench_command_in_readme_parses_and_the_gpu_one_asks_for_every_table():
    """Seen: the GPU command named --train alone, which makes bench.py run the training table
    only, for a report meant to hold inference too."""
    import importlib.util

    import bench
    text = " ".join(README.split())
    commands = re.findall(r"`python bench\.py([^`]*)`", text)
    assert any("--device cuda" in tail for tail in commands)
    have_timm = importlib.util.find_spec("timm") is not None
    for tail in commands:
        if "--only" in tail and "swin_" in tail and not have_timm:
            continue                    # --only checks timm names against timm's registry
        _, args = bench.parse_args(tail.split())
        if args.device == "cuda" and args.report:
            assert args.scan and args.models and args.train, tail
