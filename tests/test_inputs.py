"""What a check feeds an ONNX model: shapes (given, fixed or guessed), dtypes and seeded values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

from bnexport.config import tolerance_for
from bnexport.errors import BnexportError
from bnexport.parity.inputs import input_feeds, input_specs, model_float_dtype, seeded_feeds, seeded_value
from fold.signatures import conv_bn_model, multi_input_model, relu_model


def test_specs_skip_initializers_and_keep_dtypes():
    specs = input_specs(multi_input_model())
    assert [(s.name, s.dtype) for s in specs] == [("a", "float32"), ("b", "float32"), ("idx", "int64"), ("mask", "bool")]
    assert specs[0].dims == ("batch", 3, "h", "w") and specs[2].dims == ("k",)


def test_dynamic_image_sides_are_guessed_realistically_and_named_dims_agree():
    feeds = {f.name: f for f in input_feeds(multi_input_model())}
    assert feeds["a"].shape == (1, 3, 224, 224) and feeds["a"].guessed == (0, 2, 3)
    assert feeds["b"].shape == (1, 8, 224, 224)  # shares batch, h and w with a
    assert feeds["mask"].shape == (1, 1, 224, 224)
    assert feeds["idx"].shape == (128,)


def test_given_shapes_fix_the_named_dims_of_the_inputs_left_out():
    model = conv_bn_model(shape=("batch", 4, "h", "w"))
    (feed,) = input_feeds(model, {"x": (2, 4, 17, 19)})
    assert feed.shape == (2, 4, 17, 19) and feed.guessed == ()
    assert input_feeds(model, (3, 4, 5, 6))[0].shape == (3, 4, 5, 6)
    # a's shape fixes batch, h and w for b and mask, but not idx's k
    with pytest.raises(BnexportError, match="'idx' has dynamic shape"):
        input_feeds(multi_input_model(), {"a": (2, 3, 8, 8)})
    feeds = input_feeds(multi_input_model(), {"a": (2, 3, 8, 8), "idx": (5,)})
    assert [f.shape for f in feeds] == [(2, 3, 8, 8), (2, 8, 8, 8), (5,), (2, 1, 8, 8)]
    assert all(f.guessed == () for f in feeds)
    shapes = {"a": (2, 3, 8, 8), "b": (2, 8, 8, 8), "idx": (4,), "mask": (2, 1, 8, 8)}
    assert [f.shape for f in input_feeds(multi_input_model(), shapes)] == list(shapes.values())


def test_5d_3d_and_channels_last_guesses():
    def model(shape, elem=TensorProto.FLOAT):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", elem, shape)],
                                  [helper.make_tensor_value_info("y", elem, shape)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    assert input_feeds(model(["n", 3, "t", "h", "w"]))[0].shape == (1, 3, 16, 112, 112)
    assert input_feeds(model(["n", 1, "length"]))[0].shape == (1, 1, 128)
    assert input_feeds(model(["n", "h", "w", 3]))[0].shape == (1, 224, 224, 3)  # NHWC
    assert input_feeds(model([-1, 3, -1, -1]))[0].shape == (1, 3, 224, 224)  # -1 counts as dynamic
    assert input_feeds(model([None, "tokens"], TensorProto.INT64))[0].shape == (1, 128)


@pytest.mark.parametrize("shapes, fragments", [
    ({"nope": (1, 3, 8, 8)}, ["no input 'nope'", "a, b, idx, mask"]),
    ({"a": (1, 3, 8)}, ["a=1,3,8", "rank 3", "rank 4"]),
    ({"a": (1, 0, 8, 8)}, ["positive"]),
    ({"a": (1, 4, 8, 8), "b": (1, 8, 8, 8), "idx": (2,), "mask": (1, 1, 8, 8)}, ["dim 1 is 4", "fixes it at 3"]),
    ((1, 3, 8, 8), ["names no input", "has 4"]),
])
def test_bad_shapes_are_one_line_errors(shapes, fragments):
    with pytest.raises(BnexportError) as caught:
        input_feeds(multi_input_model(), shapes)
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_seeded_values_are_reproducible_differ_per_input_and_keep_their_dtype():
    feeds = input_feeds(multi_input_model(), {"a": (1, 3, 8, 8), "b": (1, 8, 8, 8), "idx": (6,), "mask": (1, 1, 8, 8)})
    first, again = seeded_feeds(feeds, seed=3), seeded_feeds(feeds, seed=3)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert {k: v.dtype.name for k, v in first.items()} == {"a": "float32", "b": "float32", "idx": "int64", "mask": "bool"}
    assert not np.array_equal(first["a"][0, :, :, :], first["b"][0, :3, :, :])  # a and b draw different streams
    assert first["idx"].min() >= 0 and first["idx"].max() <= 9
    assert first["mask"].any() and not first["mask"].all()
    assert not np.array_equal(first["a"], seeded_feeds(feeds, seed=4)["a"])
    # input i's value depends on (seed, i) only, not on the inputs beside it
    assert np.array_equal(first["b"], seeded_value((1, 8, 8, 8), "float32", seed=3, index=1))
    # standard normal, as a check needs: mean near 0, spread near 1
    big = seeded_value((100_000,), "float64", seed=0, index=0)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02


def test_half_precision_values():
    half = seeded_value((4, 5), "float16", seed=1, index=0)
    brain = seeded_value((4, 5), "bfloat16", seed=1, index=0)
    assert half.dtype == np.float16 and brain.dtype == np.dtype(ml_dtypes.bfloat16)
    # both round the same float64 draw
    assert np.allclose(half.astype(np.float64), brain.astype(np.float64), rtol=2**-7, atol=0)


def test_model_dtype_is_the_coarsest_float_and_sets_the_tolerance():
    assert model_float_dtype(multi_input_model()) == "float32"
    assert model_float_dtype(conv_bn_model(np.float16)) == "float16"
    assert model_float_dtype(relu_model(TensorProto.BFLOAT16)) == "bfloat16"
    assert model_float_dtype(conv_bn_model(np.float64)) == "float64"
    assert tolerance_for("float16").rtol > tolerance_for("float32").rtol
