"""`models.precision.cast_model` while another thread builds float32 models.

The bfloat16 twin is rebuilt under Keras' dtype policy set for the rebuild (GPT-2's sub-layers, built in its
constructor, take it). Keras keeps that policy per thread (its global state is a ``threading.local``), so a
float32 model built meanwhile in another thread (a load, a serving worker) stays float32. This test holds
Keras to it: were the policy shared by all threads, the loading thread would build bfloat16 layers (seen
here by replacing Keras' per-thread state with one shared object: the loader then saw "bfloat16").
"""

import threading

import keras

from custom_architectures.transformers_arch.gpt2_arch import GPT2
from models.precision import cast_model


def _tiny_gpt2():
    return GPT2(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=1)


def _floating_dtypes(model):
    return {v.dtype for v in model.weights if "float" in str(v.dtype)}


def test_a_bf16_cast_never_changes_another_threads_policy():
    casting_done, seen, errors = threading.Event(), set(), []
    source = _tiny_gpt2()
    config = keras.saving.serialize_keras_object(source)

    def cast():
        try:
            for _ in range(4):
                assert _floating_dtypes(cast_model(source, "bfloat16")) == {"bfloat16"}
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
        finally:
            casting_done.set()

    def load():
        try:
            while not casting_done.is_set():
                seen.add(keras.config.dtype_policy().name)
                seen.update(_floating_dtypes(keras.saving.deserialize_keras_object(config)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=cast), threading.Thread(target=load)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert seen == {"float32"}, f"the float32 thread saw {seen} while the other cast to bfloat16"
    assert keras.config.dtype_policy().name == "float32"
