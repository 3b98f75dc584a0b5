"""`custom_layers.linear.Linear`: ``keras.layers.Dense`` with its kernel stored (out, in), as torch's nn.Linear."""

import json

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from custom_layers.inference_ops import dense
from custom_layers.linear import IN_OUT, Linear


def _pair(seed=0):
    keras.utils.set_random_seed(seed)
    reference = keras.layers.Dense(6, bias_initializer="random_normal")
    reference.build((None, 5))
    linear = Linear(6, name="proj")
    linear.build((None, 5))
    linear.kernel.assign(tf.transpose(reference.kernel))
    linear.bias.assign(reference.bias)
    return reference, linear


def test_linear_is_dense_with_the_kernel_out_in():
    reference, linear = _pair()
    assert tuple(linear.kernel.shape) == (6, 5) and [w.path for w in linear.weights] == ["proj/kernel", "proj/bias"]
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 5)).astype("float32"))
    np.testing.assert_allclose(linear(x).numpy(), reference(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(dense(x, linear.kernel.value, linear.bias.value).numpy(), reference(x).numpy(), atol=1e-6)
    symbolic = tf.function(lambda t: linear(t), input_signature=[tf.TensorSpec((None, None, 5))])
    np.testing.assert_allclose(symbolic(x).numpy(), reference(x).numpy(), atol=1e-6)  # dynamic leading dims


def test_linear_config_round_trip_and_gradient():
    _, linear = _pair()
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(linear)))
    twin = keras.saving.deserialize_keras_object(config)
    assert isinstance(twin, Linear) and twin.get_config() == linear.get_config()
    assert "stored_layout" not in linear.get_config()  # a saved Linear is always (out, in)
    x = tf.ones((4, 5))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(linear(x) ** 2)
    grad_kernel, grad_bias = tape.gradient(loss, [linear.kernel.value, linear.bias.value])
    assert grad_kernel.shape == (6, 5) and grad_bias.shape == (6,)


def test_linear_reads_a_dense_layout_file_transposed_only_when_told(tmp_path):
    """``stored_layout=IN_OUT``: the file's kernel is Dense's (in, out), transposed as Keras reads it."""
    reference, linear = _pair(1)
    path = str(tmp_path / "dense_layout.weights.h5")
    keras.Sequential([keras.Input((5,)), linear]).save_weights(path)
    with h5py.File(path, "r+") as f:  # the file as a Dense wrote it: the kernel (in, out)
        (name,) = [n for n in ("layers/linear/vars/0",) if n in f]
        del f[name]
        f.create_dataset(name, data=reference.kernel.numpy())
    told = Linear(6, stored_layout=IN_OUT)
    keras.Sequential([keras.Input((5,)), told]).load_weights(path)
    np.testing.assert_array_equal(told.kernel.numpy(), linear.kernel.numpy())
    np.testing.assert_array_equal(told.bias.numpy(), linear.bias.numpy())
    with pytest.raises(ValueError):  # untold, (5, 6) is not (6, 5): refused, never reshaped
        keras.Sequential([keras.Input((5,)), Linear(6)]).load_weights(path)
    with pytest.raises(ValueError, match="kernel layout"):
        Linear(6, stored_layout="transposed")
