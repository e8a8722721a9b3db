import pytest
import torch
from torch import nn

from lenet.config import PRESETS, ConvSpec, ModelSpec
from lenet.errors import ConfigError
from lenet.models import build, feature_shapes, format_summary, init_model, num_params, summary

BOOK_SHAPES = [  # the book's layer_summary for a (1, 1, 28, 28) input
    ("Conv2d", (6, 28, 28)), ("Sigmoid", (6, 28, 28)), ("AvgPool2d", (6, 14, 14)),
    ("Conv2d", (16, 10, 10)), ("Sigmoid", (16, 10, 10)), ("AvgPool2d", (16, 5, 5)),
    ("Flatten", (400,)), ("Linear", (120,)), ("Sigmoid", (120,)), ("Linear", (84,)),
    ("Sigmoid", (84,)), ("Linear", (10,)),
]


def test_book_parameter_count_is_pinned():
    assert num_params(build(PRESETS["book"].model)) == 61_706


def test_book_layers_and_shapes_match_the_book():
    rows = summary(build(PRESETS["book"].model), (1, 28, 28))
    assert [(r.kind, r.output_shape) for r in rows] == BOOK_SHAPES


def test_book_layer_hyperparameters():
    m = build(PRESETS["book"].model)
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size, m.conv1.padding) \
        == (1, 6, (5, 5), (2, 2))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.kernel_size, m.conv2.padding) \
        == (6, 16, (5, 5), (0, 0))
    assert (m.pool1.kernel_size, m.pool1.stride) == (2, 2)
    assert [(fc.in_features, fc.out_features) for fc in (m.fc1, m.fc2, m.fc3)] \
        == [(400, 120), (120, 84), (84, 10)]
    assert not any(isinstance(x, nn.modules.lazy.LazyModuleMixin) for x in m.modules())


def test_mult_adds_total_is_about_042_million():
    rows = summary(build(PRESETS["book"].model), (1, 28, 28))
    assert sum(r.mult_adds for r in rows) == 416_520
    text = format_summary(rows, (1, 28, 28))
    assert "61,706" in text and "0.42 M" in text


def test_xavier_uniform_bounds_weights():
    m = build(PRESETS["book"].model)
    for layer in (m.conv1, m.conv2, m.fc1, m.fc2, m.fc3):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound
        # xavier, not PyTorch's kaiming-uniform default (whose bound is 1/sqrt(fan_in))
        assert layer.weight.abs().max() > 0.8 * bound


def test_init_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = init_model(PRESETS["book"].model, seed=7)
    after = torch.rand(1)
    b = init_model(PRESETS["book"].model, seed=7)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def test_forward_backward_every_parameter_gets_a_gradient():
    m = build(PRESETS["book"].model)
    out = m(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_spec_whose_maps_vanish_is_rejected_naming_the_layer():
    spec = ModelSpec(convs=(ConvSpec(6, 5, 2), ConvSpec(16, 5), ConvSpec(32, 5)))
    with pytest.raises(ConfigError, match="pool3: .* 32x1x1"):
        feature_shapes(spec)
    with pytest.raises(ConfigError, match="conv1"):
        build(ModelSpec(image_size=4, convs=(ConvSpec(6, 5, 0),)))


def test_bad_spec_values_are_rejected():
    with pytest.raises(ConfigError, match="activation"):
        ModelSpec(activation="softplus")
    with pytest.raises(ConfigError, match="convs"):
        ModelSpec(convs=(ConvSpec(0, 5),))


@pytest.mark.parametrize("spec", [p.model for p in PRESETS.values()] + [
    ModelSpec(convs=(ConvSpec(8, 3, 1),), dense=(), batch_norm=True, dropout=0.2),
    ModelSpec(convs=(ConvSpec(4, 7, 3), ConvSpec(8, 5, 2), ConvSpec(16, 3, 1)), dense=(50, 20),
              num_classes=26, image_size=32)])
def test_the_parameter_count_before_building_is_the_built_ones(spec):
    from lenet.models import spec_params

    c, s, _ = feature_shapes(spec)[-1][1]
    assert spec_params(spec, c * s * s) == num_params(build(spec))


@pytest.mark.parametrize("change, message", [
    ({"dense": (10**9,)}, "model: 411,000,002,582 parameters, at most 100,000,000"),
    ({"convs": (ConvSpec(100_000, 5, 2),)}, "model: its conv layers output 78,400,000 values "
                                            "per image, at most 4,000,000"),
    ({"image_size": 100_000}, "model: its conv layers output"),
])
def test_a_spec_far_too_large_is_refused_before_anything_is_allocated(change, message):
    import dataclasses
    import tracemalloc

    spec = dataclasses.replace(ModelSpec(), **change)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=message):
            build(spec)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20  # nothing of the model's size
    finally:
        tracemalloc.stop()
