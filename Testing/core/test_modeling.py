"""Networks: HarDNet backbones, prompt learner, aggregators, builder, ONNX parity."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from samless.modeling import (  # noqa: E402
    PRESETS,
    ConvUpsample,
    HarDNet,
    LesionProbability,
    NetConfig,
    PromptLearner,
    SAMLessNet,
    build_model,
    model_complexity,
)
from samless.modeling.hardnet import HarmonicDenseBlock  # noqa: E402

BACKBONES = ["hardnet85", "hardnet68", "hardnet39ds"]
AGGREGATORS = ["conv_upsample", "conv_upsample_detail", "transposed_conv"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def small(backbone: str = "hardnet39ds", **kw) -> NetConfig:
    kw = {"input_size": 64, "embed_size": 16, **kw}
    return NetConfig(backbone=backbone, **kw)


# ---- HarDNet -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["85", "68", "39ds"])
def test_hardnet_features_per_stride(arch):
    net = HarDNet(arch, in_channels=1).eval()
    assert net.strides == [4, 8, 16, 32]
    with torch.no_grad():
        feats = net(torch.zeros(1, 1, 64, 64))
    assert [f.shape[1] for f in feats] == net.out_channels
    assert [f.shape[-1] for f in feats] == [64 // s for s in net.strides]


def test_hardnet_published_widths_and_sizes():
    # Transition widths at strides 4/8/16/32 and backbone size (published totals minus the FC head).
    expected = {
        "85": ([192, 320, 720, 1280], 35.4e6),
        "68": ([128, 320, 640, 1024], 16.5e6),
        "39ds": ([96, 320, 640, 1024], 2.46e6),
    }
    for arch, (chs, params) in expected.items():
        net = HarDNet(f"hardnet{arch}", 3)
        assert net.out_channels == chs
        assert sum(p.numel() for p in net.parameters()) == pytest.approx(params, rel=0.02)
    with pytest.raises(ValueError, match="allowed"):
        HarDNet("101", 1)


def test_harmonic_block_links():
    block = HarmonicDenseBlock(in_ch=10, n_layers=8, growth_rate=4, grmul=1.7, depthwise=False)
    # Layer k reads k - 2**n for every 2**n dividing k (index 0 = block input).
    assert block.links == [[0], [1, 0], [2], [3, 2, 0], [4], [5, 4], [6], [7, 6, 4, 0]]
    # Output = odd layers + the last one.
    assert block.keep == [1, 3, 5, 7, 8]
    with torch.no_grad():
        y = block(torch.zeros(1, 10, 8, 8))
    assert y.shape[1] == block.out_channels


# ---- whole network -------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_every_backbone_and_aggregator(backbone, aggregator):
    net = build_model(small(backbone, aggregator=aggregator)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        emb = net.embed(x)
        logits = net(x)
        prob = LesionProbability(net)(x)
    assert emb.shape == (2, 256, 16, 16)
    assert logits.shape == (2, 2, 64, 64)
    assert prob.shape == (2, 1, 64, 64) and prob.dtype == torch.float32
    assert prob.min() >= 0 and prob.max() <= 1
    assert torch.allclose(prob, torch.softmax(logits, 1)[:, 1:2])


@pytest.mark.parametrize("in_channels", [1, 3])
def test_input_channels(in_channels):
    net = build_model(small(in_channels=in_channels)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, in_channels, 64, 64)).shape == (2, 2, 64, 64)


@pytest.mark.parametrize("name", ["hardnet39ds_256", "hardnet85_512"])
def test_preset_embedding_is_sam_prompt_shape(name):
    cfg = PRESETS[name]
    net = build_model(name).eval()
    with torch.inference_mode():
        emb = net.embed(torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size))
    assert emb.shape == (1, 256, 64, 64)


@pytest.mark.parametrize(
    ("input_size", "embed_size", "fuse_stride"), [(64, 16, 4), (128, 16, 8), (96, 16, 4), (64, 32, 4), (256, 4, 32)]
)
def test_learner_strides_not_in_backbone(input_size, embed_size, fuse_stride):
    learner = PromptLearner("hardnet39ds", 1, input_size, 32, embed_size, 16).eval()
    assert learner.fuse_stride == fuse_stride
    with torch.no_grad():
        assert learner(torch.randn(1, 1, input_size, input_size)).shape == (1, 32, embed_size, embed_size)


def test_conv_upsample_matches_literal_order():
    # The implementation commutes 1x1 convs with the upsampling; it must equal the paper's order.
    agg = ConvUpsample(64, 2).eval()
    for p in agg.parameters():
        torch.nn.init.normal_(p)

    def up(t):
        return F.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False)

    emb = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        x = up(F.relu(agg.norm1(agg.conv1(emb))))
        x = up(F.relu(agg.norm2(agg.conv2(x))))
        ref = agg.head(x)
        out = agg(emb, 32)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_decode_any_out_size(aggregator):
    net = build_model(small(aggregator=aggregator)).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        emb = net.embed(x)
        assert net.decode(emb, 100, x).shape == (1, 2, 100, 100)
        assert net.decode(emb, (48, 80), x).shape == (1, 2, 48, 80)


def test_detail_aggregator_starts_as_conv_upsample_and_then_reads_the_image():
    plain = build_model(small(in_channels=3)).eval()
    detail = build_model(small(in_channels=3, aggregator="conv_upsample_detail")).eval()
    result = detail.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(k.startswith("aggregator.detail.") for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(detail(x), plain(x))  # zero-initialised head: nothing added yet
        emb = detail.embed(x)
        with pytest.raises(ValueError, match="needs the input image"):
            detail.decode(emb, 64)
        # Trained (here: any non-zero head), the branch changes the logits where the image changes,
        # even with the embedding held fixed: evidence the coarse path cannot see.
        torch.nn.init.normal_(detail.aggregator.detail.head.weight)
        y = x.clone()
        y[:, :, 30:34, 30:34] += 5.0
        changed = (detail.decode(emb, 64, y) - detail.decode(emb, 64, x)).abs().amax(1)
    # Mostly where the image changed (GroupNorm's statistics carry a trace everywhere else).
    assert changed[:, 28:36, 28:36].amax() > 10 * changed[:, :8, :8].amax()


def test_phase1_trains_learner_alone_and_phase2_both():
    net = build_model(small()).train()
    x = torch.randn(2, 1, 64, 64)
    net.embed(x).square().mean().backward()
    assert all(p.grad is not None for p in net.learner.parameters())
    assert all(p.grad is None for p in net.aggregator.parameters())
    net.zero_grad(set_to_none=True)
    net(x).mean().backward()
    assert all(p.grad is not None for p in net.aggregator.parameters())
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"learner", "aggregator"}


# ---- config and builder --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_roundtrip(name):
    cfg = PRESETS[name]
    d = json.loads(json.dumps(cfg.to_dict()))
    assert NetConfig.from_dict(d) == cfg
    assert isinstance(build_model(d), SAMLessNet)
    assert build_model(name).config == cfg


def test_presets_match_paper():
    assert PRESETS["hardnet85_512"] == NetConfig(
        backbone="hardnet85",
        in_channels=1,
        input_size=512,
        embed_dim=256,
        embed_size=64,
        aggregator="conv_upsample",
        num_classes=2,
    )
    assert PRESETS["hardnet68_512"].backbone == "hardnet68"
    light = PRESETS["hardnet39ds_256"]
    assert (light.backbone, light.input_size, light.embed_size) == ("hardnet39ds", 256, 64)


@pytest.mark.parametrize(
    ("change", "key", "hint"),
    [
        ({"backbone": "resnet50"}, "backbone", "hardnet39ds"),
        ({"aggregator": "mlp"}, "aggregator", "transposed_conv"),
        ({"input_size": 500}, "input_size", "multiple of 32"),
        ({"embed_size": 48}, "embed_size", "divide"),
        ({"in_channels": 0}, "in_channels", "positive integer"),
        ({"embed_dim": "256"}, "embed_dim", "positive integer"),
        ({"decoder_channels": True}, "decoder_channels", "positive integer"),
        ({"num_classes": 1}, "num_classes", ">= 2"),
        ({"dropout": 0.1}, "dropout", "allowed"),
    ],
)
def test_bad_config_rejected(change, key, hint):
    d = {**PRESETS["hardnet85_512"].to_dict(), **change}
    with pytest.raises(ValueError, match=key) as err:
        NetConfig.from_dict(d)
    assert hint in str(err.value)


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("hardnet200_512")
    with pytest.raises(ValueError, match="expects a dict"):
        NetConfig.from_dict([("backbone", "hardnet85")])


def test_model_complexity():
    light = model_complexity("hardnet39ds_256")
    paper = model_complexity("hardnet85_512")
    for c in (light, paper):
        assert isinstance(c["params"], int) and c["params"] > 0
        assert isinstance(c["gflops_per_slice"], float) and c["gflops_per_slice"] > 0
    assert light["params"] == sum(p.numel() for p in build_model("hardnet39ds_256").parameters())
    assert paper["params"] > 10 * light["params"]
    assert paper["gflops_per_slice"] > 10 * light["gflops_per_slice"]
    assert 0.5 < light["gflops_per_slice"] < 5  # ~1 GMAC HarDNet-39DS at 256^2 plus decoders
    assert 50 < paper["gflops_per_slice"] < 200  # ~47 GMACs HarDNet-85 at 512^2


# ---- ONNX ----------------------------------------------------------------------------------------


def _randomise_bn(net: torch.nn.Module) -> None:
    # Non-trivial running statistics so the parity check also covers BatchNorm folding.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)


# The legacy (TorchScript) exporter is the one the product uses; it warns that it is deprecated, and
# F.group_norm's batch-size sanity check trips a harmless TracerWarning.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize(
    "cfg",
    [
        NetConfig(backbone="hardnet39ds", input_size=128, embed_size=32),  # light preset, reduced size
        NetConfig(backbone="hardnet68", input_size=64, embed_size=16, aggregator="transposed_conv", in_channels=3),
        NetConfig(backbone="hardnet39ds", input_size=64, embed_size=16, aggregator="conv_upsample_detail",
                  in_channels=3),
    ],
    ids=["hardnet39ds-conv_upsample", "hardnet68-transposed_conv", "hardnet39ds-conv_upsample_detail"],
)
def test_onnx_export_matches_onnxruntime(cfg, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = build_model(cfg)
    _randomise_bn(net)
    model = LesionProbability(net).eval()
    path = tmp_path / "model.onnx"
    dummy = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    torch.onnx.export(
        model,
        dummy,
        str(path),
        input_names=["image"],
        output_names=["probability"],
        dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)  # batch differs from export
    with torch.inference_mode():
        ref = model(x).numpy()
    (out,) = sess.run(["probability"], {"image": x.numpy()})
    assert out.shape == (3, 1, cfg.input_size, cfg.input_size)
    assert np.abs(out - ref).max() < 1e-4
    assert ref.std() > 1e-3  # not a saturated, trivially equal output
