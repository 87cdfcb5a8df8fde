"""The architecture zoo: every small variant builds, runs and exports; the full-size
configurations match the parameter and multiply-add counts their papers give; stochastic
depth exports as its inference-time form; channel shuffles and depthwise convolutions keep
their single-node form through export and fusion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploykit.models import get_model_spec, list_models, load_torch, resolve
from deploykit.models.seednets import ChannelShuffle
from deploykit.models.zoo import coverage_rows
from deploykit.models.zoo import specs as zoo_specs
from deploykit.models.zoo.complexity import count_macs, count_params
from deploykit.stages.export import ExportOptions, OnnxArtifact, export_onnx
from deploykit.stages.fuse import fuse_onnx

ROWS = coverage_rows()
SMALL = sorted({row.small for row in ROWS} | {s.name for s in zoo_specs() if "_small" in s.name})
# The trained-weights rows (EfficientNet-Lite0, the Fashion-MNIST seed nets) are exported by
# their own tests (test_efficientnet_lite.py, test_seednets.py).
SMALL_EXPORTED = [n for n in SMALL if n != "efficientnet_lite0" and not n.startswith("fmnist_")]

# (model, paper or reference value, relative tolerance, where the number comes from)
PARAMS: list[tuple[str, float, float, str]] = [
    ("alexnet_grouped", 61.0e6, 0.02, "Krizhevsky et al. 2012: 60 million (torchvision 61.1M)"),
    ("vgg16", 138e6, 0.01, "Simonyan & Zisserman 2015, Table 2: 138M"),
    ("vgg19", 144e6, 0.01, "Simonyan & Zisserman 2015, Table 2: 144M"),
    ("resnet50", 25.6e6, 0.01, "He et al. 2016 / torchvision: 25.6M"),
    ("preact_resnet18", 11.69e6, 0.01, "same layout as ResNet-18 (He et al. 2016): 11.7M"),
    ("preact_resnet164", 1.7e6, 0.03, "He et al. 2016b (identity mappings): ResNet-164 1.7M"),
    ("resnet110_stochastic_depth", 1.7e6, 0.03, "He et al. 2016, Table 6: ResNet-110 1.7M"),
    ("resnext50_32x4d", 25.0e6, 0.01, "Xie et al. 2017, Table 1: 25.0M"),
    ("densenet121", 8.0e6, 0.01, "torchvision (Huang et al. 2017, Fig. 3: ~8M)"),
    ("dpn92", 37.7e6, 0.01, "Chen et al. 2017: 145 MB of float32 weights; reference code 37.7M"),
    ("se_resnet50", 28.1e6, 0.01, "Hu et al. 2018: ResNet-50 + ~2.5M = 28.1M"),
    ("mobilenet_v1", 4.2e6, 0.02, "Howard et al. 2017, Table 8: 4.2M"),
    ("mobilenet_v1_050", 1.3e6, 0.03, "Howard et al. 2017, Table 6: 1.3M"),
    ("mobilenet_v2", 3.4e6, 0.04, "Sandler et al. 2018, Table 4: 3.4M (torchvision 3.50M)"),
    ("mobilenet_v3_large", 5.4e6, 0.02, "Howard et al. 2019, Table 3: 5.4M"),
    ("mobilenet_v3_small", 2.5e6, 0.02, "Howard et al. 2019, Table 3: 2.5M"),
    ("inception_v4", 42.68e6, 0.005, "reference implementations of Szegedy et al. 2017: 42.68M"),
    ("xception", 22_855_952, 0.0, "Chollet 2017, Table 3: 22,855,952"),
    ("shufflenet_v2_x1_0", 2.3e6, 0.02, "Ma et al. 2018 (official code, torchvision): 2.3M"),
    ("squeezenet1_0", 1.2e6, 0.05, "Iandola et al. 2016, Table 1: 1,248,424 (1.2M)"),
]
# Multiply-adds at the model's contract input size, counted for conv and FC layers.
MACS: list[tuple[str, float, float, str]] = [
    ("mobilenet_v1", 569e6, 0.01, "Howard et al. 2017, Table 8: 569M mult-adds"),
    ("mobilenet_v1_050", 149e6, 0.01, "Howard et al. 2017, Table 6: 149M mult-adds"),
    ("shufflenet_v1_g3", 137e6, 0.03, "Zhang et al. 2018, Table 1: 137 MFLOPs (140 in Table 2)"),
    ("shufflenet_v1_g8", 137e6, 0.03, "Zhang et al. 2018, Table 1: 137 MFLOPs"),
    ("shufflenet_v2_x1_0", 146e6, 0.02, "Ma et al. 2018: ShuffleNet v2 1x 146 MFLOPs"),
    ("mobilenet_v2", 300e6, 0.03, "Sandler et al. 2018, Table 4: 300M MAdds"),
    ("mobilenet_v3_large", 219e6, 0.02, "Howard et al. 2019, Table 3: 219M MAdds"),
    ("mobilenet_v3_small", 56e6, 0.03, "Howard et al. 2019, Table 3: 56M MAdds"),
    ("dpn92", 6.5e9, 0.02, "Chen et al. 2017: DPN-92 6.5 GFLOPs"),
    ("resnext50_32x4d", 4.2e9, 0.03, "Xie et al. 2017, Table 1: 4.2 GFLOPs (v1.5 stride)"),
]


def _meta_build(name: str) -> nn.Module:
    """The catalogue model on the meta device: shapes only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return get_model_spec(name).builder()


def _export(
    name: str, tmp_path: Path, exporter: str = "torchscript"
) -> tuple[nn.Module, OnnxArtifact]:
    source, contract = resolve(name, random_weights=True)
    model = load_torch(source)
    artifact = export_onnx(
        model, contract, tmp_path / f"{name}.onnx", ExportOptions(exporter=exporter)
    )
    return model, artifact


def test_rows_are_catalogue_entries_in_display_order() -> None:
    names = {spec.name for spec in list_models()}
    for row in ROWS:
        assert row.small in names, row
        assert row.full is None or row.full in names, row
        assert row.kind in ("architecture", "conv-type")
    kinds = [row.kind for row in ROWS]
    assert kinds == sorted(kinds)  # architecture rows first, then the conv types
    assert len({row.name for row in ROWS}) == len(ROWS)
    trained = {"efficientnet_lite0", "fmnist_lenet5", "fmnist_mobilenet_v1"}
    trained |= {"fmnist_shufflenet_v1", "fmnist_squeezenet", "fmnist_resnet"}
    assert trained <= {row.small for row in ROWS}
    conv_types = {row.small for row in ROWS if row.kind == "conv-type"}
    assert {"conv_dilated", "conv_flattened", "conv_transposed", "conv_grouped_g8"} <= conv_types


def test_zoo_entries_are_deploykit_builds_with_unique_names() -> None:
    entries = zoo_specs()
    assert len({s.name for s in entries}) == len(entries)
    for spec in entries:
        assert spec.source in ("deploykit", "torchvision")
        assert spec.pretrained is None


@pytest.mark.parametrize("name", ["alexnet_grouped_small", "dpn_small", "cliquenet_small"])
def test_random_builds_are_deterministic(name: str) -> None:
    first = load_torch(resolve(name)[0]).state_dict()
    second = load_torch(resolve(name)[0]).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", SMALL_EXPORTED)
def test_small_variant_runs_and_exports(name: str, tmp_path: Path) -> None:
    contract = get_model_spec(name).contract
    model, artifact = _export(name, tmp_path)
    with torch.inference_mode():
        out = model(torch.zeros(contract.shape(2)))
    assert out.shape == (2, contract.num_classes)
    assert artifact.exporter == "torchscript"
    # export_onnx only publishes a graph that ONNX Runtime runs like PyTorch
    assert artifact.checks and all(c["cosine"] > 0.9999 for c in artifact.checks)


@pytest.mark.parametrize(("name", "expected", "rtol", "source"), PARAMS)
def test_parameter_count_matches_the_paper(
    name: str, expected: float, rtol: float, source: str
) -> None:
    measured = count_params(_meta_build(name))
    assert measured == pytest.approx(expected, rel=rtol, abs=0), f"{name}: {measured:,} vs {source}"


@pytest.mark.parametrize(("name", "expected", "rtol", "source"), MACS)
def test_multiply_adds_match_the_paper(
    name: str, expected: float, rtol: float, source: str
) -> None:
    contract = get_model_spec(name).contract
    measured = count_macs(_meta_build(name), contract.shape(1))
    assert measured == pytest.approx(expected, rel=rtol), f"{name}: {measured:,} vs {source}"


def test_full_size_shapes_on_meta() -> None:
    for name in (
        "alexnet_grouped",
        "inception_v4",
        "xception",
        "dpn92",
        "se_resnet50",
        "shufflenet_v1_g8",
    ):
        spec = get_model_spec(name)
        out = _meta_build(name).eval()(torch.empty(spec.contract.shape(2), device="meta"))
        assert tuple(out.shape) == (2, 1000), name


def test_small_resnets_have_identity_and_projection_shortcuts() -> None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for name, kind in (("resnet_basic_small", BasicBlock), ("resnet_bottleneck_small", Bottleneck)):
        blocks = [m for m in get_model_spec(name).builder().modules() if isinstance(m, kind)]
        assert {b.downsample is None for b in blocks} == {True, False}, name
    resnext = get_model_spec("resnext_small").builder()
    assert {m.conv2.groups for m in resnext.modules() if isinstance(m, Bottleneck)} == {32}


def test_lenet5_has_the_papers_c3_table_and_parameter_count(tmp_path: Path) -> None:
    from deploykit.models.zoo.lenet import C3_TABLE, trainable_params

    assert [len(maps) for maps in C3_TABLE] == [3] * 6 + [4] * 9 + [6]
    model, artifact = _export("lenet5", tmp_path)
    # LeCun et al. 1998: about 60,000 trainable parameters (C3: 1,516)
    assert trainable_params(model) == pytest.approx(60_000, rel=0.02)
    assert trainable_params(model) == 60_806
    ops = [node.op_type for node in _ops(artifact.path)]
    assert ops.count("Conv") == 2 and "Mul" not in ops  # the table is folded into C3's kernel
    weights = {
        i.name: onnx.numpy_helper.to_array(i)
        for i in onnx.load(str(artifact.path)).graph.initializer
    }
    c3 = next(w for w in weights.values() if w.shape == (16, 6, 5, 5))
    connected = (np.abs(c3).sum(axis=(2, 3)) > 0).sum()
    assert connected == 60  # 6 x 3 + 9 x 4 + 6 input maps


def test_mac_counter_counts_a_known_layer() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # 16 * 32 * 32 outputs x (8/4) * 9
    assert count_macs(conv, (1, 8, 32, 32)) == 16 * 32 * 32 * 2 * 9
    up = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1)  # 4 * 8 * 8 inputs x 6 * 16
    assert count_macs(up, (1, 4, 8, 8)) == 4 * 8 * 8 * 6 * 16
    assert count_macs(nn.Linear(10, 3), (1, 10)) == 30


def _ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_stochastic_depth_is_deterministic_in_eval_and_exports_without_random_ops(
    exporter: str, tmp_path: Path
) -> None:
    model, artifact = _export("resnet_stochastic_depth_small", tmp_path, exporter)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        outs = [model(x) for _ in range(6)]
        model.eval()
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random depth in training
    kinds = {node.op_type for node in _ops(artifact.path)}
    assert not kinds & {
        "RandomUniform",
        "RandomUniformLike",
        "RandomNormal",
        "Bernoulli",
        "Dropout",
    }
    assert "Mul" in kinds  # the branch scaled by its survival probability


def _shuffle_chains(nodes: list[onnx.NodeProto]) -> list[tuple[str, ...]]:
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chains = []
    for node in nodes:
        if node.op_type != "Transpose":
            continue
        before = producer.get(node.input[0])
        after = consumers.get(node.output[0], [])
        perm = next(list(a.ints) for a in node.attribute if a.name == "perm")
        chains.append(
            (
                before.op_type if before is not None else "",
                str(perm),
                ",".join(n.op_type for n in after),
            )
        )
    return chains


@pytest.mark.parametrize(
    ("name", "exporter"),
    [
        ("conv_shuffled_grouped", "torchscript"),
        ("conv_shuffled_grouped", "dynamo"),
        ("shufflenet_v1_g3_small", "torchscript"),
        ("shufflenet_v1_g8_small", "torchscript"),
    ],
)
def test_channel_shuffle_is_one_reshape_transpose_reshape_chain(
    name: str, exporter: str, tmp_path: Path
) -> None:
    model, artifact = _export(name, tmp_path, exporter)
    shuffles = sum(isinstance(m, ChannelShuffle) for m in model.modules())
    contract = get_model_spec(name).contract
    fused, _ = fuse_onnx(artifact, tmp_path / f"{name}.fused.onnx", contract, [1])
    for path in (artifact.path, fused.path):
        chains = _shuffle_chains(_ops(path))
        assert len(chains) == shuffles > 0, path.name
        assert set(chains) == {("Reshape", "[0, 2, 1, 3, 4]", "Reshape")}, chains


def _depthwise_modules(model: nn.Module) -> int:
    return sum(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
        for m in model.modules()
    )


def _conv_groups(path: Path) -> list[tuple[int, int]]:
    graph = onnx.load(str(path)).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        found.append((group, shapes[node.input[1]][0]))
    return found


@pytest.mark.parametrize(
    "name", ["conv_depthwise_separable", "mobilenet_v1_small", "xception_small"]
)
def test_depthwise_convs_stay_single_conv_nodes(name: str, tmp_path: Path) -> None:
    model, artifact = _export(name, tmp_path)
    contract = get_model_spec(name).contract
    fused, _ = fuse_onnx(artifact, tmp_path / f"{name}.fused.onnx", contract, [1])
    expected = _depthwise_modules(model)
    assert expected > 0
    for path in (artifact.path, fused.path):
        groups = _conv_groups(path)
        depthwise = [(g, c) for g, c in groups if g > 1 and g == c]
        assert len(depthwise) == expected, path.name
        assert "Split" not in {n.op_type for n in _ops(path)}


def test_grouped_convs_keep_their_group_counts(tmp_path: Path) -> None:
    for groups in (2, 4, 8):
        _, artifact = _export(f"conv_grouped_g{groups}", tmp_path)
        assert (groups, 32) in _conv_groups(artifact.path)
    _, artifact = _export("alexnet_grouped_small", tmp_path)
    assert [g for g, _ in _conv_groups(artifact.path)] == [1, 2, 1, 2, 2]


def test_alexnet_lrn_follows_the_paper_formula() -> None:
    from deploykit.models.zoo.alexnet import AlexNet

    net = AlexNet(10, image_size=64, width=0.125, hidden=16)
    lrn = next(m for m in net.modules() if isinstance(m, nn.LocalResponseNorm))
    x = torch.rand(1, 12, 5, 5)
    squares = torch.nn.functional.pad(x.pow(2), (0, 0, 0, 0, 2, 2))
    window = sum(squares[:, i : i + 12] for i in range(5))
    expected = x / (2.0 + 1e-4 * window) ** 0.75  # b = a / (k + alpha * sum a^2)^beta
    assert torch.allclose(lrn(x), expected, atol=1e-6)
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in AlexNet(lrn=False).modules())


def test_cliquenet_reuses_its_weights_in_stage_two() -> None:
    from deploykit.models.zoo.cliquenet import CliqueBlock

    block = CliqueBlock(4, 3, 3).eval()
    calls: dict[str, int] = {}
    hooks: list[Any] = []
    for key, conv in block.pairs.items():
        hooks.append(conv.register_forward_hook(_counter(calls, key)))
    block(torch.randn(1, 4, 6, 6))
    # W_li with l < i runs in stage I and stage II; W_mi with m > i only in stage II.
    assert calls == {f"{s}_{d}": 2 if s < d else 1 for s in range(3) for d in range(3) if s != d}
    for hook in hooks:
        hook.remove()


def _counter(calls: dict[str, int], key: str) -> Callable[..., None]:
    def hook(*_: Any) -> None:
        calls[key] = calls.get(key, 0) + 1

    return hook


def test_se_block_scales_channels_by_a_sigmoid_gate() -> None:
    from deploykit.models.zoo.senet import SqueezeExcite

    se = SqueezeExcite(32)
    x = torch.rand(2, 32, 4, 4)
    with torch.no_grad():
        ratio = (se(x) / x).numpy()
    per_channel = ratio[:, :, :1, :1]
    assert np.allclose(ratio, per_channel, atol=1e-6)  # one scale per (sample, channel)
    assert ((per_channel > 0) & (per_channel < 1)).all()
