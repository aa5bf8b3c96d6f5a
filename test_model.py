"""Tests of vmamba_min.py: the official fixtures, the nine released configurations, and the
properties a model must keep (scan choice, compile, odd sizes, gradients, checkpointing, errors).

Tolerances. Two correct float32 implementations of VMamba differ by about 1e-6 on these
fixtures' logits (the official code's own channels-first vs channels-last paths:
fixtures/README.md); known bugs (a swapped route, a missing D, a merge without un-flip) move
them by 0.05 to 1.9. 1e-4 absolute sits 100x above the noise and 500x below the smallest bug.
"""
import collections
import json
import math
import os
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import vmamba_min as vm
from scan import cross_merge, cross_scan, selective_scan_ref
from conftest import DEVICE
from vmamba_min import (CONFIGS, VSSM, Backbone, VSSMConfig, build, convert_official_state_dict,
                        from_official_kwargs)

FIXTURES = Path(__file__).parent / "fixtures"   # the official goldens, in the repository
MODEL_FIXTURES = ["v0_tiny_d24_sq64.pt", "v2_s1l8_cf_d24_sq64.pt"]
ATOL = 1e-4   # see the module docstring


def fixture_path(name):
    path = FIXTURES / name
    assert path.exists(), f"fixture {path} missing: it is part of the repository (fixtures/)"
    return path


_cache = {}


def load_fixture(name):
    if name not in _cache:
        _cache[name] = torch.load(fixture_path(name), weights_only=True)
    return _cache[name]


def tiny(generation, **kw):
    """Width 24, depths 1,1,2,1, 10 classes: the fixtures' size, fast on 2 cores."""
    kw = {"dim": 24, "depths": (1, 1, 2, 1), "num_classes": 10, **kw}
    return VSSMConfig(generation=generation, **kw)


def resolved(cfg):
    """The config with the generation's defaults written in: two configs that build the same
    model compare equal. (The official kwargs name d_state and mlp_ratio; CONFIGS leave them
    None, "the generation's".)"""
    return replace(cfg, d_state=cfg.n_state, mlp_ratio=cfg.n_mlp_ratio)


def fixture_model(fx, spelling="state_dict"):
    model = VSSM(from_official_kwargs(fx["kwargs"])).eval()
    model.load_state_dict(convert_official_state_dict(fx[spelling]), strict=True)
    return model.to(DEVICE)


# ---------------------------------------------------------------------------------------------
# The official fixtures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["state_dict", "state_dict_classification_naming"])
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_logits(name, spelling):
    fx = load_fixture(name)
    model = fixture_model(fx, spelling)
    with torch.no_grad():
        logits = model(fx["input"].to(DEVICE)).cpu()
    assert logits.shape == fx["logits"].shape
    err = (logits - fx["logits"]).abs().max().item()
    assert err < ATOL, f"{name} ({spelling}): max abs logit error {err:.3g}"


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_first_selective_scan_call(name, monkeypatch):
    """The arguments SS2D hands the scan in layers.0.blocks.0, and what the scan returns, are
    the official ones (u, delta before bias/softplus, A = -exp(A_logs), B, C, delta_bias), but
    for the skip term D: SS2D adds it after the merge (SS2D.ssm), so the scan gets D = None and
    returns the official output less D u."""
    fx = load_fixture(name)
    ref = fx["first_selective_scan_call"]
    model = fixture_model(fx)
    calls, scan = [], vm.selective_scan

    def recording_scan(*args, **kwargs):
        out = scan(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out
    monkeypatch.setattr(vm, "selective_scan", recording_scan)
    with torch.no_grad():
        model(fx["input"].to(DEVICE))
    (u, delta, A, B, C, D, delta_bias), kwargs, out = calls[0]
    assert kwargs["delta_softplus"] is ref["delta_softplus"] is True
    assert D is None
    skip = ref["D"][:, None] * ref["u"]
    for key, got in dict(u=u, delta=delta, A=A, B=B, C=C, delta_bias=delta_bias,
                         out=out.cpu() + skip).items():
        assert got.shape == ref[key].shape, key
        err = (got.cpu() - ref[key]).abs().max().item()
        assert err < ATOL, f"{name}: scan argument {key} max abs error {err:.3g}"


def official_module_name(mine):
    """This file's module name -> the official classification code's (the fixture's keys)."""
    return (mine.replace(".ln_1", ".norm").replace(".ln_2", ".norm2")
            .replace(".self_attention", ".op"))


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_features(name):
    """Every recorded module output matches, so a mismatch is located to its module."""
    fx = load_fixture(name)
    model = fixture_model(fx)
    channel_first = fx["derived"]["channel_first"]
    got = {}

    def hook(mod, args, out, key):
        # The stem and a downsample return (tokens, H, W)
        got[key] = out[0] if isinstance(out, tuple) else out

    for mine, mod in model.named_modules():
        key = official_module_name(mine)
        if key in fx["features"] and key != "patch_embed" and not key.endswith("downsample"):
            mod.register_forward_hook(lambda m, a, o, key=key: hook(m, a, o, key))
    model.patch_embed.register_forward_hook(lambda m, a, o: hook(m, a, o, "patch_embed"))
    for i, layer in enumerate(model.layers[:-1]):
        layer.downsample.register_forward_hook(
            lambda m, a, o, i=i: hook(m, a, o, f"layers.{i}.downsample"))
    with torch.no_grad():
        feats = model.forward_features(fx["input"].to(DEVICE))
        got["classifier.norm"] = model.norm(feats)
        got["classifier.flatten"] = model.forward_head(feats, pre_logits=True)
    assert set(got) == set(fx["features"]), set(fx["features"]) ^ set(got)
    for key, ref in fx["features"].items():
        # The official v2 code runs channels-first (fixture "features_layout"); this file
        # passes tokens (B, L, C) between modules and returns maps (B, H, W, C).
        if channel_first and ref.dim() == 4:
            ref = ref.permute(0, 2, 3, 1)                    # (B, H, W, C)
        if got[key].dim() == 3 and ref.dim() == 4:
            ref = ref.flatten(1, 2)                          # (B, L, C), row-major tokens
        assert got[key].shape == ref.shape, key
        err = (got[key].cpu() - ref).abs().max().item()
        assert err < ATOL, f"{name}: feature {key} max abs error {err:.3g}"


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_backbone(name):
    fx = load_fixture(name)["backbone"]
    kwargs = dict(fx["kwargs"])
    out_indices = kwargs.pop("out_indices")
    backbone = Backbone(from_official_kwargs(kwargs), out_indices).eval()
    backbone.load_state_dict(convert_official_state_dict(fx["state_dict"]), strict=True)
    with torch.no_grad():
        outs = backbone.to(DEVICE)(load_fixture(name)["input"].to(DEVICE))
    assert len(outs) == len(fx["outputs"])
    for i, (o, ref) in enumerate(zip(outs, fx["outputs"])):
        assert o.shape == ref.shape and o.is_contiguous()
        err = (o.cpu() - ref).abs().max().item()
        assert err < ATOL, f"{name}: backbone output {i} max abs error {err:.3g}"


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_detection_file_as_mmcv_saves_it_loads_into_backbone(name, tmp_path):
    """{"meta", "state_dict"} with the backbone's keys under `backbone.` beside a neck's."""
    fx = load_fixture(name)["backbone"]
    kwargs = dict(fx["kwargs"])
    out_indices = kwargs.pop("out_indices")
    sd = {f"backbone.{k}": v for k, v in fx["state_dict"].items()}
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 24, 1, 1)
    torch.save({"meta": {"epoch": 12, "CLASSES": ("person", "car")}, "state_dict": sd},
               tmp_path / "det.pth")
    backbone = Backbone(from_official_kwargs(kwargs), out_indices).eval()
    backbone.load_state_dict(vm.load_official_checkpoint(tmp_path / "det.pth"), strict=True)
    with torch.no_grad():
        outs = backbone(load_fixture(name)["input"])
    for o, ref in zip(outs, fx["outputs"], strict=True):
        assert (o - ref).abs().max().item() < ATOL


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_classification_weights_start_a_backbone_with_strict_false(name):
    """README: a classification file loads into Backbone with strict=False; only the output
    norms are missing, only the classifier's final norm and head are left over."""
    fx = load_fixture(name)
    kwargs = dict(fx["backbone"]["kwargs"])
    out_indices = kwargs.pop("out_indices")
    backbone = Backbone(from_official_kwargs(kwargs), out_indices)
    result = backbone.load_state_dict(convert_official_state_dict(fx["state_dict"]),
                                      strict=False)
    assert result.missing_keys and all(k.startswith("out_norms.") for k in result.missing_keys)
    assert {k.split(".")[0] for k in result.unexpected_keys} == {"norm", "head"}


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_backbone_load_pretrained_takes_a_classifier_file_of_its_configuration_only(name,
                                                                                   tmp_path):
    """README: Backbone.load_pretrained loads a classification file, its output norms left at
    their init. A classifier of one block more or less has the same widths, so strict=False
    loaded it with blocks missing (or left over), silently: here an error."""
    fx = load_fixture(name)
    kwargs = dict(fx["backbone"]["kwargs"])
    out_indices = kwargs.pop("out_indices")
    cfg = from_official_kwargs(kwargs)
    torch.save({"model": fx["state_dict"]}, tmp_path / "cls.pth")
    backbone = Backbone(cfg, out_indices)
    fresh = {k: v.clone() for k, v in backbone.state_dict().items()}
    left = backbone.load_pretrained(tmp_path / "cls.pth")
    assert left and sorted(left) == sorted(k for k in fresh if k.startswith("out_norms."))
    want = convert_official_state_dict(fx["state_dict"])
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, fresh[k] if k in left else want[k]), k
    assert cfg.depths[2] >= 2                                # a block fewer is possible
    d = cfg.depths
    for depths in (d[:2] + (d[2] + 1,) + d[3:], d[:2] + (d[2] - 1,) + d[3:]):   # more, fewer
        other = Backbone(replace(cfg, depths=depths), out_indices)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(RuntimeError, match="keys that do not fit this model"):
            other.load_pretrained(tmp_path / "cls.pth")
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # untouched
    generation = 2 if cfg.generation == 0 else 0
    with pytest.raises(RuntimeError, match="weights are of a generation"):
        Backbone(tiny(generation), out_indices).load_pretrained(tmp_path / "cls.pth")


def test_timm_filter_refuses_weights_of_another_depth():
    """register_timm's pretrained_filter_fn: timm loads with strict=False when num_classes
    differs from the file's; the filter lets only the head differ."""
    model = VSSM(tiny(2, num_classes=5))
    same = VSSM(tiny(2)).state_dict()                        # 1000 classes: only the head differs
    assert vm._timm_filter(same, model).keys() == same.keys()
    for depths in ((1, 1, 1, 1), (1, 1, 3, 1)):
        with pytest.raises(RuntimeError, match="pretrained weights: keys that do not fit"):
            vm._timm_filter(VSSM(tiny(2, depths=depths)).state_dict(), model)
    with pytest.raises(RuntimeError, match="weights are of a generation 0"):
        vm._timm_filter(VSSM(tiny(0)).state_dict(), model)


def test_weights_of_the_other_generation_are_an_error_naming_both():
    v0, v2 = VSSM(tiny(0)), VSSM(tiny(2))
    for model, other, found in ((v2, v0, "generation 0"), (v0, v2, "generation 2")):
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=f"weights are of a {found}.*model is"):
                model.load_state_dict(other.state_dict(), strict=strict)
        with pytest.raises(RuntimeError, match=found):
            Backbone(model.config).load_state_dict(other.state_dict(), strict=False)
    v2.load_state_dict(VSSM(tiny(2)).state_dict())           # the same generation loads


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_to_official_state_dict_inverts_the_conversion(name):
    """Weights trained here go back to the official spelling: the official classification
    file's keys, order and tensors, exactly; a Backbone's: the classifier's keys without its
    norm and head, and the output norms as outnorm{i}."""
    fx = load_fixture(name)
    official = fx["state_dict_classification_naming"]
    back = vm.to_official_state_dict(convert_official_state_dict(official))
    assert list(back) == list(official)
    assert all(back[k] is official[k] for k in official)
    kwargs = dict(fx["backbone"]["kwargs"])
    out_indices = kwargs.pop("out_indices")
    backbone = Backbone(from_official_kwargs(kwargs), out_indices)
    backbone.load_state_dict(convert_official_state_dict(fx["backbone"]["state_dict"]))
    back = vm.to_official_state_dict(backbone.state_dict())
    outnorms = {f"outnorm{i}.{p}" for i in out_indices for p in ("weight", "bias")}
    assert set(back) == {k for k in official if not k.startswith("classifier.")} | outnorms
    with pytest.raises(ValueError, match="no stem weight"):
        vm.to_official_state_dict({"head.weight": torch.zeros(2, 2)})
    wrapped = {f"module.{k}": v for k, v in backbone.state_dict().items()}   # DDP's names
    with pytest.raises(ValueError, match="'module.' or '_orig_mod.' prefix"):
        vm.to_official_state_dict(wrapped)


def test_official_checkpoint_wrapped_under_model_and_seed_names():
    """Released files nest the weights under "model"; spelling 1 (the seed's names, which are
    this file's v0 names) passes through the converter unchanged and loads plainly."""
    fx = load_fixture("v0_tiny_d24_sq64.pt")
    sd = convert_official_state_dict({"model": fx["state_dict_classification_naming"]})
    for seed_name in ("patch_embed.proj.weight", "patch_embed.norm.weight",
                      "layers.0.blocks.0.ln_1.weight", "layers.0.blocks.0.self_attention.A_logs",
                      "layers.0.blocks.0.self_attention.x_proj_weight",
                      "layers.0.downsample.reduction.weight", "layers.0.downsample.norm.bias",
                      "norm.weight", "head.weight"):
        assert seed_name in sd
    assert convert_official_state_dict(sd).keys() == sd.keys()
    model = VSSM(from_official_kwargs(fx["kwargs"])).eval()
    model.load_state_dict(sd)                                # plain, strict by default
    with torch.no_grad():
        assert (model(fx["input"]) - fx["logits"]).abs().max() < ATOL


# ---------------------------------------------------------------------------------------------
# The nine released configurations
# ---------------------------------------------------------------------------------------------
EXACT_PARAMS = {  # the official models' parameter counts, 1000 classes
    "vanilla_vmamba_tiny": 22_893_448, "vanilla_vmamba_small": 44_417_416,
    "vanilla_vmamba_base": 76_254_056, "vmamba_tiny_s2l5": 30_705_832,
    "vmamba_small_s2l15": 50_147_752, "vmamba_base_s2l15": 88_557_800,
    "vmamba_tiny_s1l8": 30_249_064, "vmamba_small_s1l20": 49_012_840,
    "vmamba_base_s1l20": 86_614_504,
}


def test_configs_are_the_nine_releases():
    assert set(CONFIGS) == set(EXACT_PARAMS)


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_release_params_and_official_key_sets(name):
    """Exact parameter count, and both official spellings of the full-size checkpoint convert
    to exactly this model's keys and shapes (so a real checkpoint loads strictly)."""
    with torch.device("meta"):                               # no memory, no init cost
        model = build(name)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    path = fixture_path(f"configs/{name}.json")
    info = json.loads(path.read_text())
    for spelling in (info["state_dict"], info["classification_version"]["state_dict"]):
        fake = {e["key"]: torch.empty(e["shape"], device="meta") for e in spelling}
        got = {k: tuple(v.shape) for k, v in convert_official_state_dict(fake).items()}
        assert got == mine
    assert resolved(from_official_kwargs(info["vssm_kwargs"])) == resolved(vm.build_config(name))


def test_build_forwards_overrides_and_rejects_unknowns():
    with torch.device("meta"):
        model = build("vmamba_tiny_s1l8", num_classes=10, scan="assoc_chunked", chunk_size=32)
    assert model.head.weight.shape == (10, 768)
    assert model.config.scan == "assoc_chunked" and model.config.chunk_size == 32
    with pytest.raises(ValueError, match="vanilla_vmamba_tiny"):    # lists the valid names
        build("vmamba_tiny")
    with pytest.raises(ValueError, match="num_clases"):
        build("vmamba_tiny_s1l8", num_clases=10)
    for not_a_name in (["vmamba_tiny_s1l8"], VSSMConfig()):    # was "unhashable type"
        with pytest.raises(TypeError, match="configuration name.*valid names"):
            build(not_a_name)


@pytest.mark.parametrize("bad", [dict(generation=1), dict(scan="fast"), dict(chunk_size=0),
                                 dict(depths=(2, 0)), dict(dim=0), dict(d_state=1.5),
                                 dict(drop_path_rate=1.0), dict(dt_rank="auto"),
                                 # bools are ints to Python; a non-number must not compare
                                 dict(generation=False), dict(depths=(True, 1)),
                                 dict(d_state=True), dict(num_classes=True), dict(depths=2),
                                 dict(ssm_ratio="2"), dict(ssm_ratio=float("inf")),
                                 dict(mlp_ratio=0.001),
                                 dict(mlp_ratio=None, drop_path_rate=None),
                                 dict(grad_checkpointing="yes"),
                                 dict(dt_rank=0), dict(d_state=0),   # 0 is not "auto"
                                 # a chunk size the scan would ignore
                                 dict(scan="reference", chunk_size=8),
                                 dict(scan="assoc", chunk_size=8),
                                 dict(dim=1)])          # generation 2's stem has dim // 2 channels
def test_config_validation(bad):
    with pytest.raises(ValueError, match="VSSMConfig"):
        VSSMConfig(**bad)


def test_config_takes_numbers_and_sequences_of_any_kind():
    """A config read from a file (numpy's numbers, OmegaConf's ListConfig: a Sequence, like
    UserList) makes the same record as Python's ints, floats and tuples; a string, a bool or a
    float where an int belongs is still refused."""
    import numpy as np
    from collections import UserList
    cfg = VSSMConfig(depths=UserList([np.int64(2), 2, 9, 2]), dim=np.int32(96),
                     ssm_ratio=np.float32(1.0), num_classes=np.int64(10),
                     drop_path_rate=np.float64(0.1))
    assert cfg == VSSMConfig(depths=(2, 2, 9, 2), dim=96, ssm_ratio=1.0, num_classes=10)
    assert type(cfg.dim) is int and type(cfg.depths[0]) is int
    assert type(cfg.ssm_ratio) is float and type(cfg.drop_path_rate) is float
    for bad in (dict(depths="2292"), dict(depths=np.array([2, 2])), dict(dim=np.float64(96)),
                dict(depths=(2, np.bool_(True)))):
        with pytest.raises(ValueError, match="VSSMConfig"):
            VSSMConfig(**bad)
    backbone = Backbone(tiny(2), out_indices=UserList([np.int64(1), 3]))
    assert backbone.out_indices == (1, 3) and type(backbone.out_indices[0]) is int
    model = VSSM(tiny(2)).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        got = model.forward_intermediates(x, indices=np.int64(1), intermediates_only=True)
        assert torch.equal(got[0], model.forward_intermediates(x, indices=1,
                                                               intermediates_only=True)[0])


def test_config_cannot_change_after_validation():
    """A config is validated once, when made: changing a field afterwards (model.config.dim =
    0) passed silently and left the record describing another model. replace() makes a new,
    validated one."""
    import dataclasses
    cfg = tiny(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 0
    assert replace(cfg, dim=32).dim == 32 and cfg.dim == 24
    with pytest.raises(ValueError, match="VSSMConfig"):
        replace(cfg, dim=0)


def test_from_official_kwargs_rejects_what_it_does_not_support():
    kwargs = load_fixture("v2_s1l8_cf_d24_sq64.pt")["kwargs"]
    assert resolved(from_official_kwargs(kwargs)) == resolved(tiny(2, ssm_ratio=1.0,
                                                                   drop_path_rate=0.2))
    for change in (dict(forward_type="v05"), dict(ssm_conv=5), dict(ssm_conv_bias=True),
                   dict(downsample_version="v1"), dict(gmlp=True), dict(something_new=1),
                   dict(dims=[24, 40, 96, 192]), dict(dims=[24, 48])):
        with pytest.raises(ValueError, match=next(iter(change))):
            from_official_kwargs({**kwargs, **change})
    # No forward_type: the official default, "v2", which this file does not implement.
    with pytest.raises(ValueError, match="forward_type 'v2'"):
        from_official_kwargs({k: v for k, v in kwargs.items() if k != "forward_type"})
    # The official code looks layer names up lowercased: its default spelling "LN" is fine.
    spelled = {**kwargs, "norm_layer": "LN", "ssm_act_layer": "SiLU", "mlp_act_layer": "GELU"}
    assert resolved(from_official_kwargs(spelled)) == resolved(from_official_kwargs(kwargs))
    with pytest.raises(ValueError, match="use_checkpoint=0"):     # not grad_checkpointing
        from_official_kwargs({**kwargs, "use_checkpoint": 0})


def test_from_official_kwargs_fills_a_missing_key_with_the_official_default():
    """A key left out means what the official VSSM's default builds (a state of 16, an MLP,
    the v1 stem, ...), not VSSMConfig's default: the official constructor's model, or an
    error, never a silently different model."""
    v2 = load_fixture("v2_s1l8_cf_d24_sq64.pt")["kwargs"]
    without = {k: v for k, v in v2.items() if k != "ssm_d_state"}
    assert from_official_kwargs(without).d_state == 16 and from_official_kwargs(v2).d_state == 1
    for key in ("ssm_conv_bias", "downsample_version", "patchembed_version"):
        with pytest.raises(ValueError, match=f"{key}=.*the official default"):
            from_official_kwargs({k: v for k, v in v2.items() if k != key})
    v0 = load_fixture("v0_tiny_d24_sq64.pt")["kwargs"]
    with pytest.raises(ValueError, match="v0 with an MLP"):       # the official mlp_ratio 4.0
        from_official_kwargs({k: v for k, v in v0.items() if k != "mlp_ratio"})
    assert from_official_kwargs({k: v for k, v in v0.items() if k != "drop_path_rate"}
                                ).drop_path_rate == 0.1


# ---------------------------------------------------------------------------------------------
# Properties of the model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generation", [0, 2])
def test_reference_and_chunked_scan_give_the_same_model(generation):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 32, device=DEVICE)
    outs = []
    for scan, chunk in (("reference", None), ("chunked", 64), ("chunked", 7)):
        torch.manual_seed(1)                                 # same weights each time
        model = VSSM(tiny(generation, scan=scan, chunk_size=chunk)).eval().to(DEVICE)
        with torch.no_grad():
            outs.append(model(x))
    # Different float32 summation orders of the same recurrence: logits of size ~1 differ by
    # ~1e-6 (as the official layouts do); 1e-5 leaves 10x margin and catches any real bug.
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("generation", [0, 2])
def test_ss2d_equals_the_per_route_formulation(generation):
    """SS2D.ssm projects the map before routing it and adds the skip term after the merge; the
    paper's order (route copies of u, x_proj and dt_proj per route, D inside each route's scan)
    gives the same output. float64: equal up to summation order (~1e-15 relative)."""
    torch.manual_seed(0)
    ss2d = VSSM(tiny(generation)).layers[0].blocks[0].self_attention.double()
    with torch.no_grad():
        ss2d.Ds.uniform_(-1, 2)                              # four different D_k per channel
    batch, D, H, W = 2, ss2d.d_inner, 5, 7
    x = torch.randn(batch, D, H, W, dtype=torch.float64)
    R, N = ss2d.dt_rank, ss2d.d_state
    xs = cross_scan(x)                                       # (b, K, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, ss2d.x_proj_weight)
    dts, Bs, Cs = x_dbl.split([R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, ss2d.dt_projs_weight)
    # A and delta_bias in float64: SS2D takes the scan's parameters to at least float32 (the
    # official code's .float() upcasts bf16/fp16 ones) and keeps a float64 model's in float64.
    y = selective_scan_ref(xs.reshape(batch, 4 * D, H * W), dts.reshape(batch, 4 * D, H * W),
                           -torch.exp(ss2d.A_logs), Bs, Cs, ss2d.Ds,
                           ss2d.dt_projs_bias.reshape(-1), delta_softplus=True)
    want = cross_merge(y.view(batch, 4, D, H, W)).transpose(1, 2)   # (b, L, D) tokens
    with torch.no_grad():
        got = ss2d.ssm(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class _Both(nn.Module):
    """A v0 and a v2 model in one graph, so one (slow, ~1 min) compile covers both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # chunk_size 4: short unrolled loops keep the compile time down; the chunk boundaries
        # (and the padding of the last chunk, L = 35) are still exercised.
        self.v0 = VSSM(tiny(0, depths=(1, 1), chunk_size=4)).eval()
        self.v2 = VSSM(tiny(2, depths=(1, 1), chunk_size=4)).eval()
        self.to(DEVICE)

    def forward(self, x):
        return self.v0(x), self.v2(x)


@pytest.fixture(scope="module")
def compiled_pair():
    model = _Both()
    compiled = torch.compile(model, fullgraph=True)          # fullgraph: a graph break fails
    # One compile thread: on 2 cores the worker pool's start-up cost more than it saved
    # (docs/design.md).
    with torch.no_grad(), torch._inductor.config.patch(compile_threads=1):
        compiled(torch.randn(2, 3, 20, 28, device=DEVICE))   # compile here, once per module
    return model, compiled


@pytest.mark.slow      # ~55 s cold; test_compile.py's inference test covers it (no graph breaks)
def test_compiled_matches_eager(compiled_pair):
    model, compiled = compiled_pair
    x = torch.randn(2, 3, 20, 28, device=DEVICE)             # odd, non-square maps: 5x7, 3x4...
    with torch.no_grad():
        eager, comp = model(x), compiled(x)
    # Inductor fuses and reorders float32 sums (and vectorises exp); ~1e-7 is typical on
    # logits of size ~1. 1e-5 keeps 10x margin; the miscompiles in docs/design.md were
    # off by 6-76%.
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-5)


@pytest.mark.parametrize("generation", [0, 2])
@pytest.mark.parametrize("size", [(37, 50), (64, 33), (4, 4), (13, 97)])
def test_odd_and_non_square_inputs(generation, size):
    model = VSSM(tiny(generation)).eval()
    backbone = Backbone(tiny(generation)).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        logits, feats = model(x), backbone(x)
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    # Official sizes: v0 floors the 4x4 patch embed, then pads odd maps; v2 convs round up.
    h, w = (size[0] // 4, size[1] // 4) if generation == 0 else \
           (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    for i, f in enumerate(feats):
        assert f.shape == (1, 24 * 2 ** i, h, w) and torch.isfinite(f).all()
        h, w = math.ceil(h / 2), math.ceil(w / 2)


@pytest.mark.parametrize("batch", [1, 3])
def test_grid_and_tokens_are_views_with_channels_last_strides(batch):
    """grid: tokens (b, L, C) -> (b, C, H, W) with the strides a conv reads as channels-last
    (at b = 1 too, where another view of the same memory gets a batch stride a conv reads as
    NCHW, and copies); tokens: back, also a view. Row-major: token h*W + w is pixel (h, w)."""
    H, W, C = 3, 5, 4
    x = torch.randn(batch, H * W, C)
    m = vm.grid(x, H, W)
    assert m.shape == (batch, C, H, W) and m.data_ptr() == x.data_ptr()
    assert m.stride() == (H * W * C, 1, W * C, C)
    assert m.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(m[:, :, 2, 3], x[:, 2 * W + 3])
    t = vm.tokens(m)
    assert t.data_ptr() == x.data_ptr() and torch.equal(t, x)


def _computed_nodes(gm, shapes):
    """Nodes of an ATen graph that compute (not view) a tensor of one of these shapes."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if any(r.alias_info is not None for r in n.target._schema.returns):
            continue                                         # a view of its input
        val = n.meta.get("val")
        outs = val if isinstance(val, (tuple, list)) else (val,)
        if any(isinstance(t, torch.Tensor) and tuple(t.shape) in shapes for t in outs):
            yield n


@pytest.mark.parametrize("generation", [0, 2])
def test_no_channels_last_map_is_computed_on_the_way_into_a_convolution(generation):
    """Between the convolutions the model computes tokens (b, L, C), never (b, H, W, C) maps:
    Inductor's layout optimization stores a 4-D tensor on a path into a convolution with
    channels-last strides of its own dims, which for (b, H, W, C) puts H innermost (every
    LayerNorm then reads channels H floats apart; docs/design.md, "Tokens between the
    convolutions"). Checked on the ATen graph: no op upstream of a convolution outputs a
    (b, h_i, w_i, C_i) tensor; the classifier's final LayerNorm, past the last convolution,
    does, which shows the check sees such tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx
    torch.manual_seed(0)
    model = VSSM(tiny(generation)).eval()
    batch, h, w = 2, 16, 20                                  # 64 x 80 px: h, w, C all differ
    x = torch.randn(batch, 3, 4 * h, 4 * w)
    with torch.no_grad():
        gm = make_fx(model)(x)
    maps = set()
    for i in range(len(model.layers)):
        maps.add((batch, h, w, model.config.stage_dim(i)))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default]
    upstream, todo = set(), list(convs)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in upstream:
                upstream.add(a)
                todo.append(a)
    computed = list(_computed_nodes(gm, maps))
    bad = [n.format_node() for n in computed if n in upstream]
    assert convs and not bad, bad
    assert any(n not in upstream for n in computed)          # the classifier's map LayerNorm


def test_patch_merging_concatenates_in_the_checkpoints_order():
    """Each output token is LayerNorm + Linear of its 2x2 neighbourhood's four tokens side by
    side in the official order (the official torch.cat of the four strided slices of the map)."""
    torch.manual_seed(0)
    merge = vm.PatchMerging(6)
    x = torch.randn(2, 4, 6, 6)                              # (B, H, W, C)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                     x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)   # (B, 2, 3, 4C)
    want = merge.reduction(merge.norm(cat)).flatten(1, 2)
    out, h, w = merge(x.flatten(1, 2), 4, 6)
    assert (h, w) == (2, 3)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_patch_merging_pads_bottom_right_with_zeros():
    merge = vm.PatchMerging(6)
    x = torch.randn(2, 5, 7, 6)                              # (B, H, W, C), both odd
    padded = torch.zeros(2, 6, 8, 6)
    padded[:, :5, :7] = x
    out, h, w = merge(x.flatten(1, 2), 5, 7)                 # tokens (B, L, C) in, and out
    want, h_want, w_want = merge(padded.flatten(1, 2), 6, 8)
    assert (h, w) == (h_want, w_want) == (3, 4)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("generation", [0, 2])
def test_gradients_reach_every_parameter(generation):
    torch.manual_seed(0)
    model = VSSM(tiny(generation, drop_path_rate=0.0)).train().to(DEVICE)
    # 48x40 leaves the last stage a 2x2 map: on a 1x1 map (L = 1) the state starts and ends
    # after one step, so A_logs has no effect and its gradient is truly 0.
    model(torch.randn(2, 3, 48, 40, device=DEVICE)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("generation", [0, 2])
def test_gradient_checkpointing_changes_nothing(generation):
    torch.manual_seed(0)
    model = VSSM(tiny(generation, drop_path_rate=0.3)).train().to(DEVICE)  # drop path: RNG replays
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(123)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out0, g0), (out1, g1) = results
    # Same ops, same order, recomputed: bitwise equal.
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0, msg=n)
    backbone = Backbone(tiny(generation))                # the detection backbone has the switch
    backbone.set_grad_checkpointing()
    assert backbone.config.grad_checkpointing and all(s.grad_checkpointing for s in backbone.layers)


def test_gradient_checkpointing_in_training_mode_only(monkeypatch):
    """VSSMConfig.grad_checkpointing: every block recomputed in backward in training mode; in
    eval mode none, gradients or not (a checkpoint there broke strict torch.export, jit.trace
    and torch.func of such a model; for gradients of an eval model with the memory saving,
    train() with drop_path_rate 0 computes the same)."""
    calls = []
    real = vm.checkpoint
    monkeypatch.setattr(vm, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = VSSM(tiny(2, grad_checkpointing=True, drop_path_rate=0.0))
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model.train()(x).sum().backward()
    assert len(calls) == sum(model.config.depths)
    model.eval()(x).sum().backward()
    assert len(calls) == sum(model.config.depths)
    torch.export.export(model, (x.detach(),), strict=True)   # eval: no checkpoint to trace


def test_drop_path_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = VSSM(tiny(2, drop_path_rate=0.5))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_bf16_autocast_keeps_the_scan_in_float32():
    torch.manual_seed(0)
    model = VSSM(tiny(0)).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    for blk in model.modules():
        if isinstance(blk, vm.SS2D):   # out_norm's input is the merged scan output
            blk.out_norm.register_forward_hook(lambda m, a, o: seen.append(a[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert seen and all(d == torch.float32 for d in seen)
    with torch.no_grad():
        ref = model(x)
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%) in every projection; a few such
    # roundings through 5 blocks move logits of size ~0.5 by a few 1e-3. 0.05 is ~10x that.
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=0.05)


def test_timm_style_api():
    model = VSSM(tiny(2)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1, 1, 192)                 # (B, H/32, W/32, 8C)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 192)
        torch.testing.assert_close(model.head(pre), model(x), rtol=0, atol=0)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, 192)
        assert model.get_classifier() is model.head
        model.reset_classifier(4, "avg")                     # timm's global_pool argument
        model.double()                                       # a new head in the model's dtype
        model.reset_classifier(3)
        assert model.head.weight.dtype == torch.float64
        assert model(x.double()).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")
    nwd = model.no_weight_decay()
    assert nwd and all(n.endswith((".A_logs", ".Ds")) for n in nwd)
    assert len(nwd) == 2 * sum(isinstance(m, vm.SS2D) for m in model.modules())


def test_official_initialisation():
    torch.manual_seed(0)
    model = VSSM(tiny(0))
    ss2d = model.layers[2].blocks[0].self_attention          # C = 96: D = 192, N = 16, R = 6
    N, R = 16, 6
    assert torch.equal(ss2d.A_logs, torch.log(torch.arange(1., N + 1)).expand(4 * 192, N))
    assert torch.equal(ss2d.Ds, torch.ones(4 * 192))
    dt = nn.functional.softplus(ss2d.dt_projs_bias)          # the initial step sizes
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert ss2d.dt_projs_weight.abs().max() <= R ** -0.5
    w = ss2d.in_proj.weight   # 36,864 draws of trunc_normal(std .02): sample std within 2%
    assert 0.0196 < w.std() < 0.0204 and w.abs().max() < 0.2   # (cut at +-2 absolute, as timm)
    assert torch.equal(model.norm.weight, torch.ones(192)) and not model.head.bias.any()


@pytest.mark.parametrize("generation", [0, 2])
def test_init_weights_after_a_meta_build(generation):
    """Built on the meta device, then to_empty: init_weights draws every weight anew from the
    official init (checked against a model as constructed where the init is deterministic,
    by range or spread elsewhere); torch's per-module convention (reset_parameters on each
    module that has one, as FSDP's meta materialisation does) reaches the SSM's too."""
    with torch.device("meta"):
        model, backbone = VSSM(tiny(generation)), Backbone(tiny(generation))
    built = VSSM(tiny(generation))
    for m in (model, backbone):
        m.to_empty(device="cpu")
        for p in m.parameters():
            p.data.fill_(float("nan"))
        m.init_weights()
        assert all(torch.isfinite(p).all() for p in m.parameters())
    got, want = model.state_dict(), built.state_dict()
    for k in want:
        if k.endswith(("A_logs", "Ds", "norm.weight", "norm.bias", "ln_1.weight", "ln_1.bias",
                       "head.bias")):
            assert torch.equal(got[k], want[k]), k
    dt = nn.functional.softplus(got["layers.0.blocks.0.self_attention.dt_projs_bias"])
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert not torch.equal(got["head.weight"], want["head.weight"])   # drawn, not copied
    assert 0.01 < got["head.weight"].std() < 0.03                     # trunc_normal(.02)
    for p in model.parameters():
        p.data.fill_(float("nan"))
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    ssm = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in (
        "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")]
    assert len(ssm) == 5 * sum(model.config.depths)
    assert all(torch.isfinite(p).all() for p in ssm)


@pytest.mark.parametrize("generation", [0, 2])
def test_per_sample_gradients_by_torch_func(generation):
    """README: per-sample gradients through torch.func (vmap of grad over functional_call)
    equal a loop over the samples, with the default scan and the reference loop; the
    associative scan raises (its autograd Functions have no setup_context)."""
    from torch.func import functional_call, grad, vmap
    x = torch.randn(2, 3, 32, 32)
    model = VSSM(tiny(generation, scan="assoc")).eval()
    with pytest.raises(RuntimeError, match="setup_context"):
        vmap(lambda t: model(t[None])[0])(x)
    for scan in ("chunked", "reference"):
        torch.manual_seed(0)
        model = VSSM(tiny(generation, scan=scan)).eval()
        params = {n: p.detach() for n, p in model.named_parameters()}

        def loss(p, t):
            return functional_call(model, p, (t[None],)).square().sum()
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
        # float32, the same sums batched differently: measured up to 5e-6 of a tensor's
        # largest gradient (both generations, both scans); bound 1e-4, 20x that
        for i in range(2):
            model.zero_grad()
            model(x[i:i + 1]).square().sum().backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-4,
                                           atol=1e-4 * p.grad.abs().max().item(),
                                           msg=f"{scan} {n}")


def test_init_weights_of_a_model_sharded_by_fsdp2(tmp_path):
    """FSDP2's meta-device flow (fully_shard, to_empty, init_weights): the SSM's values were
    copied into DTensor parameters as plain tensors, an error. In a process of its own (one
    gloo rank): the process group is global."""
    import socket
    import subprocess
    import sys
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "fsdp2.py"
    script.write_text(f"""
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import vmamba_min as vm
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
dist.init_process_group("gloo", rank=0, world_size=1)
for generation in (0, 2):
    cfg = vm.VSSMConfig(generation=generation, dim=16, depths=(1, 1, 2, 1), num_classes=5)
    with torch.device("meta"):
        model = vm.VSSM(cfg)
    for block in model.modules():
        if isinstance(block, vm.VSSBlock):
            fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    model.init_weights()
    full = {{n: p.full_tensor() for n, p in model.named_parameters()}}
    assert all(torch.isfinite(p).all() for p in full.values())
    a = full["layers.0.blocks.0.self_attention.A_logs"]
    assert torch.equal(a, torch.log(torch.arange(1., a.shape[1] + 1)).expand_as(a))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
dist.destroy_process_group()
print("ok")
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_backbone_out_indices():
    backbone = Backbone(tiny(2), out_indices=(3, 1)).eval()
    assert set(backbone.state_dict()) >= {"out_norms.1.weight", "out_norms.3.bias"}
    assert "out_norms.0.weight" not in backbone.state_dict()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, 48, 8, 8), (1, 192, 2, 2)]
    for bad in ((4,), (True,), 3, (), (-1,)):
        with pytest.raises(ValueError, match=f"out_indices.*got {re.escape(repr(bad))}$"):
            Backbone(tiny(2), out_indices=bad)
    with pytest.raises(TypeError, match="build_config"):
        Backbone("vmamba_tiny_s1l8")
    # the default is every stage, however many the configuration has (it was (0, 1, 2, 3),
    # an error for three stages that blamed an argument the caller never passed)
    three = replace(tiny(2), depths=(1, 1, 1))
    assert Backbone(three).out_indices == (0, 1, 2) == Backbone(three, range(3)).out_indices


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x, match", [
    (torch.randn(3, 32, 32), "image batch"), (torch.randn(1, 1, 32, 32), "image batch"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    (torch.randn(1, 3, 3, 32), "H, W >= 4"), ("an image", "image batch")])
def test_bad_inputs(x, match):
    model = VSSM(tiny(0))
    with pytest.raises(ValueError, match=match):
        model(x)


@pytest.mark.parametrize("scan", ["chunked", "assoc"])
@pytest.mark.parametrize("generation", [0, 2])
def test_empty_batch_gives_empty_logits(generation, scan):
    model = VSSM(tiny(generation, scan=scan)).eval().to(DEVICE)
    with torch.no_grad():
        assert model(torch.randn(0, 3, 32, 32, device=DEVICE)).shape == (0, 10)


def test_float64_model_computes_its_scan_parameters_in_float64():
    """A model converted with .double() keeps A and the dt bias in float64 on their way into
    the scan (which runs in float64 for float64 inputs). Check: a central difference with step
    h = 1e-4 against autograd's derivative, per parameter (dt ~ 1: bias 0.5). In float64 they
    agree to ~2e-9 relative (measured; the h^2 term and f's rounding over h); through a
    float32 round trip the parameter +- h lands on float32's grid (ulp 6e-8 near 0.5 to 1),
    so the step is off by up to 3e-4 relative (measured: 2e-4 and 2e-5). Bound 1e-6."""
    torch.manual_seed(0)
    ss2d = VSSM(tiny(0, dim=8, depths=(1,))).double().layers[0].blocks[0].self_attention
    with torch.no_grad():
        ss2d.dt_projs_bias.fill_(0.5)
    x = torch.randn(1, 12, 8, dtype=torch.float64)              # (b, L, C), L = 3 x 4
    w = torch.randn(1, 12, 8, dtype=torch.float64)
    h = 1e-4
    for param, index in ((ss2d.A_logs, (5, 1)), (ss2d.dt_projs_bias, (0, 3))):
        ss2d.zero_grad()
        (ss2d(x, 3, 4) * w).sum().backward()
        exact = param.grad[index].item()
        with torch.no_grad():
            value = param[index].item()
            param[index] = value + h
            up = (ss2d(x, 3, 4) * w).sum().item()
            param[index] = value - h
            down = (ss2d(x, 3, 4) * w).sum().item()
            param[index] = value
        assert abs((up - down) / (2 * h) - exact) <= 1e-6 * abs(exact), (index, exact)


def test_bad_checkpoints_name_the_offending_keys():
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")
    good = convert_official_state_dict(fx["state_dict"])
    model = VSSM(from_official_kwargs(fx["kwargs"]))
    missing = {k: v for k, v in good.items() if k != "layers.1.blocks.0.ln_2.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key.*layers\.1\.blocks\.0\.ln_2\.bias"):
        model.load_state_dict(missing)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*layers\.0\.extra"):
        model.load_state_dict({**good, "layers.0.extra": torch.zeros(1)})
    # Another configuration's checkpoint: v2 weights into a v0 model, s1 into s2.
    with pytest.raises(RuntimeError, match="patch_embed.conv1.weight"):
        VSSM(tiny(0)).load_state_dict(good)
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.0\.blocks\.0"):
        VSSM(tiny(2, ssm_ratio=2.0)).load_state_dict(good)
    bad = dict(fx["state_dict"])
    bad["layers.0.blocks.0.op.x_proj.weight"] = torch.zeros(15, 24)   # 15 rows: not K * 4
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0\.op\.x_proj\.weight"):
        convert_official_state_dict(bad)


# ---------------------------------------------------------------------------------------------
# Review findings: each with the test that catches it
# ---------------------------------------------------------------------------------------------
def test_replace_generation_takes_the_new_generations_defaults():
    """d_state and mlp_ratio stay None ("the generation's") in the config, so replacing the
    generation does not carry generation 2's d_state 1 and MLP over; explicit values stay."""
    cfg = replace(vm.build_config("vmamba_tiny_s1l8"), generation=0)
    assert cfg.d_state is None and cfg.mlp_ratio is None
    assert cfg.n_state == 16 and cfg.n_mlp_ratio == 0.0
    with torch.device("meta"):
        model = VSSM(replace(cfg, dim=8))
    blk = model.layers[0].blocks[0]
    assert blk.self_attention.A_logs.shape[1] == 16 and blk.mlp is None
    explicit = replace(VSSMConfig(generation=2, d_state=3, mlp_ratio=2.0), generation=0)
    assert (explicit.n_state, explicit.n_mlp_ratio) == (3, 2.0)
    assert (VSSMConfig(generation=2).n_state, VSSMConfig(generation=2).n_mlp_ratio) == (1, 4.0)


def test_drop_path_is_a_module_and_leaves_the_state_dict_alone():
    model = VSSM(tiny(2, drop_path_rate=0.2))
    blk = model.layers[3].blocks[0]
    assert isinstance(blk.drop_path, vm.DropPath) and "p=0.200" in repr(blk)
    assert not any(".drop_path" in k for k in model.state_dict())
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")             # official keys still load strictly
    assert set(convert_official_state_dict(fx["state_dict"])) == set(
        VSSM(from_official_kwargs(fx["kwargs"])).state_dict())
    # compile_blocks (lazy: nothing compiles here) hands every block its rate as a tensor, so
    # that one graph serves a stage's blocks; still out of the state_dict
    vm.compile_blocks(model)
    for b in (m for m in model.modules() if isinstance(m, vm.VSSBlock)):
        assert isinstance(b.drop_path.rate, torch.Tensor)
        assert b.drop_path.rate.item() == pytest.approx(b.drop_path.p)
    assert not any(".drop_path" in k for k in model.state_dict())


def test_drop_path_keeps_the_expected_value():
    """Kept samples are scaled by 1/(1-p), so E[drop_path(x)] = x. Each of the n outputs of a
    ones input is 0 (prob p) or 1/(1-p): mean 1, variance p/(1-p). With p = 0.3, n = 200,000
    the sample mean has std sqrt(0.3/0.7/2e5) = 1.5e-3; 6 std = 0.009 (a false alarm below
    1e-8). Without the rescale the mean is 1-p = 0.7."""
    torch.manual_seed(0)
    layer = vm.DropPath(0.3).train()
    out = layer(torch.ones(200_000, 1, 1, 1))
    assert set(out.unique().tolist()) <= {0.0, (torch.tensor(1.0) / 0.7).item()}
    assert abs(out.mean().item() - 1.0) < 0.009
    assert torch.equal(layer.eval()(torch.ones(3, 1)), torch.ones(3, 1))


def test_drop_path_of_one_drops_everything_and_other_rates_are_refused():
    """p = 1: every sample dropped, zeros (as timm's; 0/0 gave NaN); p outside [0, 1] is an
    error naming it, not torch's bernoulli_ complaint about 1 - p."""
    layer = vm.DropPath(1.0).train()
    assert torch.equal(layer(torch.ones(3, 2)), torch.zeros(3, 2))
    # compile_blocks' tensor rate, as compiled code reads it
    for dtype in (torch.float32, torch.float16):         # a 1e-30 floor was 0 in float16
        ones, rate = torch.ones(3, 2, dtype=dtype), torch.tensor(1.0, dtype=dtype)
        assert torch.equal(vm.drop_path(ones, rate, True), torch.zeros(3, 2, dtype=dtype))
    for bad in (1.5, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="DropPath: p must be a number in"):
            vm.DropPath(bad)
    with pytest.raises(ValueError, match="Backbone expects an image batch"):
        Backbone(tiny(2))(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "vanilla_vmamba_base"])
def test_drop_path_rates_are_the_official_linspace(name):
    """Official: torch.linspace(0, drop_path_rate, sum(depths)), block by block, in order."""
    with torch.device("meta"):
        model = build(name)
    rates = [blk.drop_path.p for layer in model.layers for blk in layer.blocks]
    cfg = model.config
    assert rates == torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()


def _max_logit_error(dtype, generation):
    torch.manual_seed(0)
    model = VSSM(tiny(generation)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        low = model.to(dtype)(x.to(dtype))
    assert low.dtype == dtype and torch.isfinite(low).all()
    return (low.float() - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("generation", [0, 2])
def test_channels_last_conv_weights_change_nothing(generation, batch):
    """model.to(memory_format=torch.channels_last), as README advises for DDP and train.py
    does: the same logits and gradients up to float32 rounding (a convolution may sum in
    another order for weights of other strides: at batch 1 and 3 generation 2's logits moved
    by ~2e-7 and its gradients by ~3e-6 of their largest entry, on a CPU; bit for bit at
    batch 2), and a state_dict saved from it loads into a model as built. Tolerances as for
    two summation orders elsewhere: 1e-5 on logits of size ~0.3-1 (as in
    test_reference_and_chunked_...), 1e-4 of each gradient's largest entry (test_compile's
    GRAD_RTOL)."""
    torch.manual_seed(0)
    model = VSSM(tiny(generation)).eval()                    # eval: no drop-path draws
    x = torch.randn(batch, 3, 64, 64)
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    model.to(memory_format=torch.channels_last)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-4 * r.abs().max().item(), msg=name)
    fresh = VSSM(tiny(generation)).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), ref)


@pytest.mark.parametrize("generation", [0, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_converted_to_low_precision_runs(dtype, generation):
    """model.to(dtype) with an input of that dtype: the scan runs in float32 and hands its
    output back in the model's dtype. Error budget: every parameter and activation is rounded
    to the dtype (relative error up to eps/2: bf16 2^-8, fp16 2^-11). The LayerNorms reset the
    scale, so errors add rather than compound: about 10 roundings per block on the path to a
    logit, 5 blocks, and independent roundings grow like sqrt(50) ~ 7 times eps/2, i.e.
    ~3.5 eps relative, on logits of size ~0.4 here: ~1.4 eps expected. Measured (seed 0, max
    |logit| 0.37): bf16 2.1e-3 / 2.4e-3 (v0 / v2) = 0.3 eps, fp16 2.6e-4 / 3.0e-4 = 0.3 eps.
    Bound 3 eps (bf16 0.023, fp16 0.0029): 2x the estimate, 10x the measurement."""
    err, _ = _max_logit_error(dtype, generation)
    bound = 3 * torch.finfo(dtype).eps
    assert err < bound, f"{dtype}: max abs logit error {err:.3g} >= {bound:.3g}"


def test_image_dtype_must_match_the_model_unless_autocast():
    model = VSSM(tiny(2)).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"torch\.float16.*parameter dtype torch\.float32"):
        model(x.half())
    with pytest.raises(ValueError, match="dtype"):
        Backbone(tiny(2))(x.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x.bfloat16()).shape == (1, 10)        # autocast casts per op: allowed
        with pytest.raises(ValueError, match="autocast does not cast float64"):
            model(x.double())                                 # but never float64
        with pytest.raises(ValueError, match="autocast does not cast float64"):
            VSSM(tiny(2)).double().eval()(x)                  # a float64 model neither


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "got list"), ({"model": "weights"}, "'model': str"),
    ({1: torch.zeros(1)}, "str names"), ({"head.weight": [0.0]}, "'head.weight': list")])
def test_converter_rejects_what_is_not_a_state_dict(bad, match):
    with pytest.raises(TypeError, match=match):
        convert_official_state_dict(bad)


def test_converter_rejects_two_spellings_of_one_key():
    """A file holding both `classifier.norm.weight` (released spelling) and `norm.weight`: one
    of them would silently overwrite the other."""
    sd = dict(load_fixture("v2_s1l8_cf_d24_sq64.pt")["state_dict"])
    assert "classifier.norm.weight" in sd
    sd["norm.weight"] = torch.full_like(sd["classifier.norm.weight"], 7.0)
    with pytest.raises(ValueError, match=r"'norm.weight'.*'classifier.norm.weight'.*both map"):
        convert_official_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# forward_intermediates (timm's feature API): the one loop over the stages
# ---------------------------------------------------------------------------------------------
def _stage_outputs_by_hooks(model, x):
    """Each stage's block output as a map (b, h, w, C), recorded by hooks, the plain forward
    run. A stage gets (tokens, h, w) and returns (its blocks' output tokens, next input)."""
    seen = {}

    def hook(mod, args, out, i):
        seen[i] = out[0].unflatten(1, args[1:])

    handles = [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
               for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("generation", [0, 2])
def test_forward_intermediates_are_the_stage_outputs(generation):
    torch.manual_seed(0)
    model = VSSM(tiny(generation)).eval()
    x = torch.randn(2, 3, 40, 56)
    ref = _stage_outputs_by_hooks(model, x)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert torch.equal(final, ref[3])                   # the last stage: no downsample
        assert len(maps) == 4
        for i, m in enumerate(maps):
            assert m.is_contiguous() and torch.equal(m, ref[i].permute(0, 3, 1, 2))
        nhwc = model.forward_intermediates(x, indices=[1, -1], output_fmt="NHWC",
                                           intermediates_only=True)
        assert [torch.equal(m, ref[i]) for m, i in zip(nhwc, (1, 3))] == [True, True]
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last2] == [96, 192]
        # norm: the head's norm on the last stage's intermediate, and only there; final stays
        # forward_features' (a norm in it was applied twice by forward_head). A norm that is
        # not the identity shows it: the initial one is within rounding of it.
        model.norm.weight.uniform_(0.5, 2.0)
        model.norm.bias.normal_()
        normed, maps_n = model.forward_intermediates(x, indices=[0, 3], norm=True)
        assert torch.equal(normed, final)
        assert torch.equal(model.forward_head(normed), model(x))
        assert torch.equal(maps_n[0], maps[0])
        assert torch.equal(maps_n[1], model.norm(final).permute(0, 3, 1, 2))


def test_forward_intermediates_stop_early_runs_no_later_stage():
    model = VSSM(tiny(2)).eval()
    calls = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # The call erf.py makes: one stage's map, channels-last.
        (y,) = model.forward_intermediates(x, indices=[1], intermediates_only=True,
                                           stop_early=True, output_fmt="NHWC")
        assert calls == [0, 1] and y.shape == (1, 4, 4, 48)
        calls.clear()
        final, (m,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert calls == [0, 1] and torch.equal(final, y) and torch.equal(m, y.permute(0, 3, 1, 2))
        calls.clear()
        model.forward_intermediates(x, indices=[1])       # final needs every stage
        assert calls == [0, 1, 2, 3]
    # Nor the downsample of the last stage run: nothing reads it (a Backbone's stage 2 under
    # DDP left its downsample without a gradient, and ran it for nothing).
    downsamples = []
    for i, layer in enumerate(model.layers[:3]):
        layer.downsample.register_forward_hook(lambda m, a, o, i=i: downsamples.append(i))
    with torch.no_grad():
        model.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert downsamples == [0]
    backbone = Backbone(tiny(2), (0, 2))
    sum(m.sum() for m in backbone(x)).backward()
    assert {n for n, q in backbone.named_parameters() if q.grad is None} == {
        n for n, _ in backbone.named_parameters()
        if n.startswith(("layers.3.", "layers.2.downsample."))}


@pytest.mark.parametrize("indices, error", [
    (0, ValueError), (5, ValueError), ([4], ValueError), ([-5], ValueError), ([], ValueError),
    ([True], ValueError), ([1.0], ValueError), ("0", TypeError),
    (torch.tensor(1), TypeError)])       # was "iteration over a 0-d tensor"
def test_forward_intermediates_validates_indices(indices, error):
    model = VSSM(tiny(2))
    with pytest.raises(error, match="indices"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=indices)


def test_forward_intermediates_rejects_unknown_output_format():
    with pytest.raises(ValueError, match="output_fmt"):
        VSSM(tiny(2)).forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")


def test_prune_intermediate_layers():
    torch.manual_seed(0)
    model = VSSM(tiny(0)).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([-4, 1]) == [0, 1]
        assert len(model.layers) == 2 and model.layers[1].downsample is None
        assert isinstance(model.norm, nn.Identity) and isinstance(model.head, nn.Identity)
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(full, pruned))
    # what describes the model follows the kept stages: a new head fits, the pooled features
    # and feature_info have stage 1's width (they kept the full model's before)
    width = model.config.stage_dim(1)
    assert model.num_features == width and model.config.depths == tiny(0).depths[:2]
    assert [f["num_chs"] for f in model.feature_info] == [model.config.stage_dim(0), width]
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (1, 3)
    with pytest.raises(ValueError, match="prune_head=True"):   # a head sized for the last stage
        VSSM(tiny(0)).prune_intermediate_layers([1], prune_head=False)
    keep_all = VSSM(tiny(0))
    assert keep_all.prune_intermediate_layers(None, prune_head=False) == [0, 1, 2, 3]
    assert isinstance(keep_all.norm, nn.LayerNorm) and isinstance(keep_all.head, nn.Linear)
    headless = VSSM(tiny(0))                                 # every stage kept: the head
    assert headless.prune_intermediate_layers(None) == [0, 1, 2, 3]     # still goes by default
    assert isinstance(headless.head, nn.Identity) and headless.num_classes == 0
    assert isinstance(headless.norm, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# load_official_checkpoint: the trainer's file format, read without running anything in it
# ---------------------------------------------------------------------------------------------
_WRITE_OFFICIAL = r'''
import os, sys, torch
tmp = sys.argv[1]
os.makedirs(os.path.join(tmp, "pkgs", "yacs"))
open(os.path.join(tmp, "pkgs", "yacs", "__init__.py"), "w").close()
with open(os.path.join(tmp, "pkgs", "yacs", "config.py"), "w") as f:
    f.write("class CfgNode(dict):\n    pass\n")     # a stand-in for yacs' CfgNode (a dict)
sys.path.insert(0, os.path.join(tmp, "pkgs"))
from yacs.config import CfgNode

class Payload:                                     # what a malicious file would carry
    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return os.mkdir, (os.path.join(tmp, self.name),)

weights = torch.load(os.path.join(tmp, "weights.pt"), weights_only=True)
config = CfgNode(MODEL=CfgNode(NAME="vssm1_tiny_0230s", TYPE="vssm"), TRAIN=CfgNode(EPOCHS=300))
config.__dict__["__immutable__"] = True
torch.save({"model": weights["model"], "model_ema": weights["model_ema"],
            "optimizer": {"state": {},
                          "param_groups": [{"lr": 1e-3, "payload": Payload("MARKER_1")}]},
            "lr_scheduler": {"t": 3}, "scaler": {"scale": 65536.0}, "epoch": 3,
            "max_accuracy": 82.6, "config": config, "payload": Payload("MARKER_2")},
           os.path.join(tmp, "official.pth"))
'''

_LOAD_UNSAFELY = r'''
import os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[1], "pkgs"))
torch.load(os.path.join(sys.argv[1], "official.pth"), weights_only=False)
'''


def _python(code, *args):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def write_official_checkpoint(tmp_path, model_sd, ema_sd):
    """tmp_path/official.pth as the official trainer writes it (model, model_ema, optimizer,
    lr_scheduler, scaler, epoch, a yacs CfgNode config), plus __reduce__ payloads that would
    create the directories tmp_path/MARKER_1 and MARKER_2 when unpickled. Written by a separate
    Python process: the CfgNode's module exists only there, so this process cannot import it."""
    torch.save({"model": model_sd, "model_ema": ema_sd}, tmp_path / "weights.pt")
    _python(_WRITE_OFFICIAL, tmp_path)
    return tmp_path / "official.pth"


def _perturbed(sd):
    gen = torch.Generator().manual_seed(0)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}


def test_load_official_checkpoint_runs_nothing_from_the_file(tmp_path):
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")
    sd = fx["state_dict_classification_naming"]
    path = write_official_checkpoint(tmp_path, sd, _perturbed(sd))
    import importlib.util
    assert importlib.util.find_spec("yacs") is None          # the CfgNode is not importable here
    markers = [tmp_path / "MARKER_1", tmp_path / "MARKER_2"]
    loaded = vm.load_official_checkpoint(path)
    assert not any(m.exists() for m in markers)              # the payloads did not run
    model = VSSM(from_official_kwargs(fx["kwargs"])).eval()
    model.load_state_dict(loaded)                            # strict
    with torch.no_grad():
        assert (model(fx["input"]) - fx["logits"]).abs().max() < ATOL
    ema = vm.load_official_checkpoint(path, ema=True)
    assert all(torch.equal(ema[k], v) for k, v in
               convert_official_state_dict(_perturbed(sd)).items())
    assert not any(m.exists() for m in markers)
    # The control: the same file through plain pickle (weights_only=False) does run them.
    _python(_LOAD_UNSAFELY, tmp_path)
    assert all(m.is_dir() for m in markers)


def test_load_pretrained_takes_the_files_head_if_it_fits_and_keeps_a_fresh_one_if_not(tmp_path):
    """VSSM.load_pretrained (README's fine-tuning; timm's pretrained=True) on an official-layout
    file: a model of the file's size reproduces the official logits; with another
    num_classes the head keeps its fresh weights and the trunk is the file's; a file without
    a head (to fine-tune from) loads the same way, but not silently: with a warning."""
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")
    sd = fx["state_dict_classification_naming"]
    torch.save({"model": sd, "epoch": 1}, tmp_path / "ck.pth")
    model = VSSM(from_official_kwargs(fx["kwargs"])).eval()
    model.load_pretrained(tmp_path / "ck.pth")
    with torch.no_grad():
        assert (model(fx["input"]) - fx["logits"]).abs().max() < ATOL
    other = VSSM(replace(from_official_kwargs(fx["kwargs"]), num_classes=5)).eval()
    fresh = other.head.weight.clone()
    other.load_pretrained(tmp_path / "ck.pth")
    assert torch.equal(other.head.weight, fresh)
    with torch.no_grad():
        assert torch.equal(other.forward_features(fx["input"]),
                           model.forward_features(fx["input"]))
    headless = {k: v for k, v in sd.items() if not k.startswith("classifier.head.")}
    assert len(headless) == len(sd) - 2
    torch.save({"model": headless}, tmp_path / "headless.pth")
    needs_head = VSSM(from_official_kwargs(fx["kwargs"])).eval()
    fresh = needs_head.head.weight.clone()
    with pytest.warns(UserWarning, match="no classifier head.*10 classes"):
        left = needs_head.load_pretrained(tmp_path / "headless.pth")
    assert left == ["head.weight", "head.bias"] and torch.equal(needs_head.head.weight, fresh)
    with torch.no_grad():
        assert torch.equal(needs_head.forward_features(fx["input"]),
                           model.forward_features(fx["input"]))
    assert model.load_pretrained(tmp_path / "ck.pth") == []


@pytest.mark.parametrize("name", MODEL_FIXTURES)
@pytest.mark.parametrize("in_chans", [1, 2, 6])
def test_load_pretrained_adapts_the_rgb_stem_to_other_channel_counts(name, in_chans, tmp_path):
    """A model of in_chans channels from an RGB file (as timm adapts a first conv): one channel
    x gives what the RGB model gives for (x, x, x); c channels, c/3 copies of an RGB image
    (channels 0,1,2,0,1,2,... as the filters repeat) give the RGB model's logits. So do the
    backbones' maps."""
    fx = load_fixture(name)
    torch.save({"model": fx["state_dict"]}, tmp_path / "rgb.pth")
    cfg = from_official_kwargs(fx["kwargs"])
    rgb, adapted = VSSM(cfg).eval(), VSSM(replace(cfg, in_chans=in_chans)).eval()
    rgb.load_pretrained(tmp_path / "rgb.pth")
    adapted.load_pretrained(tmp_path / "rgb.pth")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if in_chans == 1:
        x = x[:, :1].expand(2, 3, 32, 32)                 # a grey image as RGB
    mine = x[:, [i % 3 for i in range(in_chans)]]
    if in_chans == 2:               # filters R, G scaled by 3/2: the RGB model sees 1.5 (R, G, 0)
        x = torch.cat([x[:, :2], torch.zeros_like(x[:, :1])], 1) * 1.5
    with torch.no_grad():
        torch.testing.assert_close(adapted(mine), rgb(x), rtol=0, atol=1e-5)
        kw = dict(fx["backbone"]["kwargs"])
        out_indices = kw.pop("out_indices")
        bcfg = from_official_kwargs(kw)
        bb_rgb, bb = Backbone(bcfg, out_indices).eval(), Backbone(
            replace(bcfg, in_chans=in_chans), out_indices).eval()
        bb_rgb.load_pretrained(tmp_path / "rgb.pth")
        bb.load_pretrained(tmp_path / "rgb.pth")
        for a, b in zip(bb(mine), bb_rgb(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_load_official_checkpoint_bare_state_dict_and_errors(tmp_path):
    fx = load_fixture("v0_tiny_d24_sq64.pt")
    torch.save(fx["state_dict"], tmp_path / "bare.pth")
    loaded = vm.load_official_checkpoint(tmp_path / "bare.pth")
    assert loaded.keys() == convert_official_state_dict(fx["state_dict"]).keys()
    with pytest.raises(KeyError, match="model_ema"):
        vm.load_official_checkpoint(tmp_path / "bare.pth", ema=True)
    torch.save({"model": fx["state_dict"], "epoch": 1}, tmp_path / "no_ema.pth")
    with pytest.raises(KeyError, match=r"no 'model_ema' entry.*'epoch', 'model'"):
        vm.load_official_checkpoint(tmp_path / "no_ema.pth", ema=True)
    (tmp_path / "legacy.pth").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match="zip"):
        vm.load_official_checkpoint(tmp_path / "legacy.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        vm.load_official_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="a directory, not a file"):
        vm.load_official_checkpoint(tmp_path)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:   # a zip, not torch.save's
        z.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match="not readable as a torch.save archive"):
        vm.load_official_checkpoint(tmp_path / "other.zip")
    with pytest.raises(TypeError, match="file path"):
        with open(tmp_path / "bare.pth", "rb") as f:
            vm.load_official_checkpoint(f)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(TypeError, match="expected a dict.*got Tensor"):
        vm.load_official_checkpoint(tmp_path / "tensor.pth")


def test_load_pretrained_files_users_meet_and_their_errors(tmp_path):
    """State dicts saved through a wrapper load (DDP's "module.", torch.compile's
    "_orig_mod."), and so do parameters saved as such; a file refused for a reason other than
    another configuration says which (a trainer's prefix, a backbone's file, a truncated,
    empty or safetensors file, an EMA asked of a bare state dict)."""
    fx = load_fixture("v2_s1l8_cf_d24_sq64.pt")
    sd = fx["state_dict_classification_naming"]
    model = VSSM(from_official_kwargs(fx["kwargs"])).eval()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        torch.save({"model": {prefix + k: v for k, v in sd.items()}}, tmp_path / "w.pth")
        loaded = VSSM(from_official_kwargs(fx["kwargs"])).eval()
        assert loaded.load_pretrained(tmp_path / "w.pth") == []
        with torch.no_grad():
            assert (loaded(fx["input"]) - fx["logits"]).abs().max() < ATOL, prefix
    params = {k: torch.nn.Parameter(v) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(params, tmp_path / "params.pth")
    got = vm.load_official_checkpoint(tmp_path / "params.pth")
    assert all(type(v) is torch.Tensor for v in got.values())
    assert got.keys() == convert_official_state_dict(sd).keys()
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, tmp_path / "pl.ckpt")
    with pytest.raises(RuntimeError, match="carry a prefix, 'model.'"):
        model.load_pretrained(tmp_path / "pl.ckpt")
    backbone = Backbone(from_official_kwargs(fx["kwargs"]), (1, 3))
    torch.save({"state_dict": {"backbone." + k: v for k, v in vm.to_official_state_dict(
        backbone.state_dict()).items()}}, tmp_path / "det.pth")
    with pytest.raises(RuntimeError, match=r"a backbone's file.*Backbone\(\.\.\.\)"):
        model.load_pretrained(tmp_path / "det.pth")
    torch.save({"model": sd}, tmp_path / "ck.pth")
    data = (tmp_path / "ck.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "w.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    for name, why in (("cut.pth", "truncated"), ("empty.pth", "empty"),
                      ("w.safetensors", "safetensors")):
        with pytest.raises(ValueError, match=why):
            vm.load_official_checkpoint(tmp_path / name)
    torch.save(sd, tmp_path / "bare.pth")
    with pytest.raises(KeyError) as e:
        vm.load_official_checkpoint(tmp_path / "bare.pth", ema=True)
    assert "bare state dict, which has no EMA weights" in str(e.value) and len(str(e.value)) < 300


def test_load_official_checkpoint_under_forced_weights_only_loading_says_why(tmp_path,
                                                                            monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch.load refuse any pickle_module, even for a bare
    state dict: torch's message named neither the variable nor a way out."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pth")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(RuntimeError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD.*weights_only=True"):
        vm.load_official_checkpoint(tmp_path / "bare.pth")


def test_allow_list_unpickler_turns_unknown_globals_into_records():
    import io
    import pickle

    class Call:
        def __reduce__(self):
            return print, ("must not print",)
    data = pickle.dumps({"a": Call(), "b": collections.OrderedDict(x=1)}, protocol=4)
    out = vm._AllowListUnpickler(io.BytesIO(data)).load()
    assert isinstance(out["a"], vm.Opaque) and out["a"].global_name == "builtins.print"
    assert out["a"].args == ("must not print",)
    assert type(out["b"]) is collections.OrderedDict and out["b"] == {"x": 1}
    # torch's own functions are globals like any other: only the tensor rebuilds pass, and a
    # parameter's rebuild is ours, giving the tensor alone (no hooks or attributes attached)
    unpickler = vm._AllowListUnpickler(io.BytesIO(b""))
    rebuild = unpickler.find_class("torch._utils", "_rebuild_parameter")
    assert rebuild is not torch._utils._rebuild_parameter
    t = torch.zeros(2)
    assert rebuild(t, True, collections.OrderedDict(hook=print)) is t
    for module, name in [("torch.serialization", "save"), ("torch", "load"),
                         ("torch.hub", "load"), ("torch._utils", "_rebuild_parameter_with_state"),
                         ("builtins", "eval"), ("collections", "defaultdict")]:
        cls = unpickler.find_class(module, name)
        assert isinstance(cls, type) and issubclass(cls, vm.Opaque), (module, name)
        assert cls.global_name == f"{module}.{name}"


def test_load_official_checkpoint_does_not_call_torch_functions(tmp_path):
    """A file whose pickle calls torch.save on loading (it would write a file) loads as data:
    its tensors, and a record in place of the call."""
    marker = tmp_path / "written_by_the_checkpoint"

    class Payload:
        def __reduce__(self):
            return torch.save, ({"x": 1}, str(marker))
    torch.save({"model": {"w": torch.ones(2)}, "payload": Payload()}, tmp_path / "ck.pth")
    sd = vm.load_official_checkpoint(tmp_path / "ck.pth")
    assert not marker.exists()
    assert torch.equal(sd["w"], torch.ones(2))
