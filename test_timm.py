"""Tests of vmamba_min.register_timm(): the nine releases through timm.create_model, the
official evaluation transform from their pretrained_cfg, features_only, and official checkpoint
files through pretrained=True. Skipped (with the reason) where timm is not installed; run them
with timm's environment, e.g. a venv made with `pip install -e ".[peers]"`:
`../venv-timm/bin/python -m pytest -q test_timm.py`.

Tolerance: the golden comparisons reuse test_model's ATOL (1e-4; derivation there).
"""
import subprocess
import sys
import warnings

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (optional: pip install timm)")

import vmamba_min as vm                                      # noqa: E402
from test_model import (ATOL, EXACT_PARAMS, _perturbed, load_fixture,  # noqa: E402
                        write_official_checkpoint)

NAMES = list(vm.CONFIGS)
SMALL = dict(dim=24, depths=(1, 1, 2, 1))                    # the fixtures' size


@pytest.fixture(scope="module", autouse=True)
def registered():
    return vm.register_timm()


def test_importing_vmamba_min_does_not_import_timm():
    code = "import sys, vmamba_min; assert 'timm' not in sys.modules, 'timm imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_register_is_idempotent_and_lists_the_nine():
    assert set(timm.list_models(module=vm.TIMM_MODULE)) == set(NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # timm warns when overwriting
        assert vm.register_timm() == NAMES
    assert set(timm.list_models(module=vm.TIMM_MODULE)) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_create_model_builds_the_release(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert isinstance(model, vm.VSSM) and model.config == vm.build_config(name)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]
    cfg = model.pretrained_cfg
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.head


def test_create_model_passes_options_and_rejects_unknown_ones():
    with torch.device("meta"):
        model = timm.create_model("vmamba_tiny_s2l5", num_classes=7, drop_path_rate=0.05,
                                  scan="reference", in_chans=1)
    assert (model.config.num_classes, model.config.drop_path_rate) == (7, 0.05)
    assert model.config.scan == "reference" and model.head.weight.shape == (7, 768)
    assert model.patch_embed.conv1.in_channels == 1
    with pytest.raises(ValueError, match="drop_rate"):
        timm.create_model("vmamba_tiny_s2l5", drop_rate=0.1)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("vmamba_tiny_s2l5", global_pool="max")


def test_create_model_takes_timms_own_options():
    """timm's train.py passes drop_rate (its --drop, 0.0 by default) to every model, and
    create_model takes device and dtype: the values that change nothing build the release."""
    model = timm.create_model("vmamba_tiny_s2l5", drop_rate=0.0, global_pool="avg",
                              device="meta", dtype=torch.bfloat16)
    assert model.config == vm.build_config("vmamba_tiny_s2l5")
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS["vmamba_tiny_s2l5"]
    for bad in ("bfloat16", torch.int8):     # a string went to nn.Module.to as a device
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            timm.create_model("vmamba_tiny_s2l5", dtype=bad)


@pytest.mark.parametrize("name", ["vanilla_vmamba_tiny", "vmamba_base_s1l20"])
def test_pretrained_cfg_gives_the_official_eval_transform(name):
    """As officially: resize the shorter side to 256 (bicubic), centre crop 224, ImageNet
    mean/std."""
    with torch.device("meta"):
        model = timm.create_model(name)
    data = timm.data.resolve_data_config({}, model=model)
    assert data == dict(input_size=(3, 224, 224), interpolation="bicubic",
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875,
                        crop_mode="center")
    steps = timm.data.create_transform(**data).transforms
    resize, crop = steps[0], steps[1]
    assert type(resize).__name__ == "Resize" and resize.size == 256
    assert resize.interpolation.value == "bicubic"
    assert type(crop).__name__ == "CenterCrop" and tuple(crop.size) == (224, 224)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (-2,)])
def test_features_only(out_indices):
    torch.manual_seed(0)
    full = timm.create_model("vmamba_tiny_s1l8", **SMALL).eval()
    torch.manual_seed(0)                                     # the same weights
    feats = timm.create_model("vmamba_tiny_s1l8", features_only=True, out_indices=out_indices,
                              **SMALL).eval()
    stages = [i % 4 for i in out_indices]
    assert feats.feature_info.channels() == [24 * 2 ** i for i in stages]
    assert feats.feature_info.reduction() == [4 * 2 ** i for i in stages]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = feats(x)
        want = full.forward_intermediates(x, indices=stages, intermediates_only=True)
    assert len(got) == len(stages)
    for g, w, i in zip(got, want, stages):
        assert g.shape == (2, 24 * 2 ** i, 16 // 2 ** i, 24 // 2 ** i) and g.is_contiguous()
        assert torch.equal(g, w)
    assert len(feats.model.layers) == max(stages) + 1     # stages after the last one are pruned


def test_features_only_default_is_every_stage():
    feats = timm.create_model("vanilla_vmamba_tiny", features_only=True, **SMALL)
    assert feats.feature_info.reduction() == [4, 8, 16, 32]


FIXTURE_RELEASE = {"v0_tiny_d24_sq64.pt": "vanilla_vmamba_tiny",
                   "v2_s1l8_cf_d24_sq64.pt": "vmamba_tiny_s1l8"}


@pytest.mark.parametrize("fixture", list(FIXTURE_RELEASE))
def test_pretrained_official_checkpoint_file(fixture, tmp_path):
    """A checkpoint in the official trainer's format (CfgNode config, payloads that must not
    run: see test_model) loads through timm's pretrained=True and gives the official logits."""
    fx = load_fixture(fixture)
    sd = fx["state_dict_classification_naming"]
    path = write_official_checkpoint(tmp_path, sd, _perturbed(sd))
    overlay = dict(file=str(path))
    name = FIXTURE_RELEASE[fixture]
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                              num_classes=10, **SMALL).eval()
    with torch.no_grad():
        err = (model(fx["input"]) - fx["logits"]).abs().max().item()
    assert err < ATOL, f"{fixture}: max abs logit error {err:.3g}"
    assert not any((tmp_path / m).exists() for m in ("MARKER_1", "MARKER_2"))

    # Another head size: the head keeps its fresh init, everything before it is the file's.
    other = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                              num_classes=5, **SMALL).eval()
    assert other.head.weight.shape == (5, 192)
    with torch.no_grad():
        assert torch.equal(other.forward_features(fx["input"]),
                           model.forward_features(fx["input"]))

    # features_only: the stages' block outputs are the official ones.
    feats = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                              features_only=True, **SMALL).eval()
    with torch.no_grad():
        maps = feats(fx["input"])
    for i, (m, depth) in enumerate(zip(maps, SMALL["depths"])):
        ref = fx["features"][f"layers.{i}.blocks.{depth - 1}"]
        if not fx["derived"]["channel_first"]:
            ref = ref.permute(0, 3, 1, 2)                    # the v0 fixture is NHWC
        assert m.shape == ref.shape and (m - ref).abs().max() < ATOL, f"stage {i}"


def test_pretrained_in_memory_official_state_dict():
    """timm's own loader path (an in-memory state dict) converts official names too. (timm
    keeps the head only when the cfg's num_classes matches the model's, hence the 10.)"""
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")
    overlay = dict(state_dict=dict(fx["state_dict"]), num_classes=10)
    model = timm.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=10, **SMALL,
                              pretrained_cfg_overlay=overlay)
    with torch.no_grad():
        assert (model.eval()(fx["input"]) - fx["logits"]).abs().max() < ATOL


@pytest.mark.parametrize("in_chans", [1, 2])
def test_pretrained_in_memory_state_dict_with_other_in_chans(in_chans, tmp_path):
    """timm adapts an RGB stem after the filter: the filter's shape check must not refuse it
    (it did, for an in-memory state dict). The stem comes out as load_pretrained's, from a
    file, adapts it."""
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")
    overlay = dict(state_dict=dict(fx["state_dict"]), num_classes=10)
    model = timm.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=10, **SMALL,
                              in_chans=in_chans, pretrained_cfg_overlay=overlay)
    path = write_official_checkpoint(tmp_path, fx["state_dict_classification_naming"],
                                     _perturbed(fx["state_dict_classification_naming"]))
    from_file = vm.build("vmamba_tiny_s1l8", num_classes=10, in_chans=in_chans, **SMALL)
    from_file.load_pretrained(path)
    stem = model.patch_embed.conv1.weight
    assert stem.shape[1] == in_chans
    torch.testing.assert_close(stem, from_file.patch_embed.conv1.weight)
    wrong = dict(fx["state_dict"])            # a stem of another width is still refused
    wrong["patch_embed.0.weight"] = wrong["patch_embed.0.weight"][:4]
    with pytest.raises(RuntimeError, match="do not fit"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=10, **SMALL,
                          in_chans=in_chans, pretrained_cfg_overlay=dict(state_dict=wrong))


def test_pretrained_in_memory_state_dict_of_another_depth_is_an_error():
    """With num_classes other than the weights' (1000), timm loads with strict=False: a state
    dict of one block fewer loaded the rest and left that block random, silently."""
    fewer = vm.build("vmamba_tiny_s1l8", **dict(SMALL, depths=(1, 1, 1, 1))).state_dict()
    with pytest.raises(RuntimeError, match="do not fit"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=10, **SMALL,
                          pretrained_cfg_overlay=dict(state_dict=fewer))
    # asked for explicitly, a partial load stays possible
    model = timm.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=10, **SMALL,
                              pretrained_strict=False,
                              pretrained_cfg_overlay=dict(state_dict=fewer))
    assert torch.equal(model.patch_embed.conv1.weight, fewer["patch_embed.conv1.weight"])


def test_pretrained_without_a_file_is_an_error():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True, **SMALL)


def test_pretrained_file_of_another_configuration_is_an_error(tmp_path):
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")
    torch.save({"model": fx["state_dict_classification_naming"]}, tmp_path / "v2.pth")
    with pytest.raises(RuntimeError, match="size mismatch|do not fit"):
        timm.create_model("vmamba_tiny_s2l5", pretrained=True, num_classes=10, **SMALL,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "v2.pth")))
