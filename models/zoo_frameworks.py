"""Zoo models from other frameworks: TensorFlow/Keras (tf2onnx) and JAX/Flax (jax2onnx).

Each model is built in a child process (``python -m models.zoo_frameworks NAME OUT``): TensorFlow and
JAX each load their own copies of protobuf/absl and a multi-second runtime, and neither should share a
process with torch or with the test session. Weights are random but seeded; what matters for the
analysis is the *form* each exporter gives the graph:

* tf2onnx keeps Keras' NHWC layout around NCHW convolutions (Transpose pairs it mostly folds), writes
  depthwise convolutions as grouped Conv, BatchNormalization as a folded Mul/Add, and Keras 3's
  ``MultiHeadAttention`` as ``Einsum`` projections with [B, T, heads, head_dim] kernels;
* jax2onnx writes ``nnx.Conv`` as Transpose -> Conv -> Transpose, ``nnx.BatchNorm`` as
  BatchNormalization, and ``nnx.MultiHeadAttention`` as Einsum/MatMul over [B, T, heads, head_dim].

Measured when written (2026-12-03, 2 loaded cores): TensorFlow import ~5.5 s and a Keras MobileNetV2
conversion ~6 s; JAX import ~7 s and a small Flax CNN conversion ~23 s (tracing + jit).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

OPSET = 17
HERE = Path(__file__).resolve().parent


def _child(name: str) -> Callable[[Path], None]:
    """A zoo builder that runs `build(name, path)` in a child Python process."""

    def build(path: Path) -> None:
        from models.zoo_builders import ZooError

        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(
            [sys.executable, "-m", "models.zoo_frameworks", name, str(path)],
            cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise ZooError(f"{name}: export failed: {lines[-1] if lines else proc.returncode}")

    return build


# ------------------------------------------------------------------------------------------------
# TensorFlow / Keras (run in the child)
# ------------------------------------------------------------------------------------------------
def _keras_mobilenet_v2(path: Path) -> None:
    """Keras MobileNetV2 (alpha 0.5), dynamic batch and image size, converted by tf2onnx."""
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    image = keras.Input((None, None, 3), name="image")
    body = keras.applications.MobileNetV2(weights=None, include_top=False, input_tensor=image, alpha=0.5,
                                          pooling="avg")
    model = keras.Model(image, keras.layers.Dense(100)(body.output))
    _randomise_bn(model)
    spec = (tf.TensorSpec((None, None, None, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    _save(proto, path)


def _keras_text_transformer(path: Path) -> None:
    """A Keras text classifier: embedding, 2 encoder blocks (4-head MultiHeadAttention, LayerNorm,
    GELU MLP), mean pooling, dense head; input [1, 32] (`_TEXT_INPUT`); converted by tf2onnx."""
    import keras
    import tensorflow as tf
    import tf2onnx
    from keras import layers

    keras.utils.set_random_seed(0)
    tokens = keras.Input(_TEXT_INPUT[1:], batch_size=_TEXT_INPUT[0], dtype="int32", name="tokens")
    x = layers.Embedding(1000, 64)(tokens)
    for _ in range(2):
        a = layers.MultiHeadAttention(num_heads=4, key_dim=16)(x, x)
        x = layers.LayerNormalization(epsilon=1e-6)(x + a)
        h = layers.Dense(128, activation=_gelu_tanh)(x)
        x = layers.LayerNormalization(epsilon=1e-6)(x + layers.Dense(64)(h))
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(5)(layers.Dense(32, activation="relu")(x))
    model = keras.Model(tokens, out)
    spec = (tf.TensorSpec(_TEXT_INPUT, tf.int32, name="tokens"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    _save(proto, path)


# A static signature, as TF serving signatures often are. With a dynamic batch, tf2onnx writes every
# attention Einsum as Reshapes to [B*heads, T, d] whose targets it computes at run time; onnxprune
# follows the sizes (ReduceProd of Shape) but cannot yet carry heads through an axis merged with a
# *symbolic* batch, so that form keeps attention whole (MLP groups only): a known gap.
_TEXT_INPUT: tuple[int | None, ...] = (1, 32)


def _gelu_tanh(x):
    """GELU, tanh approximation (tf2onnx has no opset-17 form of the exact one's Erfc)."""
    import keras

    return keras.activations.gelu(x, approximate=True)


def _randomise_bn(model) -> None:
    """Non-trivial BatchNorm statistics (fresh Keras layers have mean 0 / var 1), seeded."""
    import numpy as np

    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype(gamma.dtype),
                rng.normal(0, 0.1, beta.shape).astype(beta.dtype),
                rng.normal(0, 0.1, mean.shape).astype(mean.dtype),
                rng.uniform(0.5, 1.5, var.shape).astype(var.dtype),
            ])


# ------------------------------------------------------------------------------------------------
# JAX / Flax NNX (run in the child)
# ------------------------------------------------------------------------------------------------
def _jax_resnet(path: Path) -> None:
    """A Flax NNX ResNet-style CNN (NHWC): stem, 3 stages of 2 basic blocks (BatchNorm, projection
    shortcuts where the width or stride changes), mean pooling, linear head; dynamic batch."""
    import jax2onnx
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
            self.c1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
            self.b1 = nnx.BatchNorm(cout, rngs=rngs)
            self.c2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
            self.b2 = nnx.BatchNorm(cout, rngs=rngs)
            self.project = stride != 1 or cin != cout
            if self.project:
                self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
                self.bp = nnx.BatchNorm(cout, rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            skip = self.bp(self.proj(x)) if self.project else x
            return nnx.relu(y + skip)

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.stem = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            widths, blocks, cin = (16, 32, 64), [], 16
            for i, w in enumerate(widths):
                for j in range(2):
                    blocks.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1, rngs))
                    cin = w
            self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
            self.head = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.stem(x)))
            for b in self.blocks:
                x = b(x)
            return self.head(x.mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    _randomise_nnx_bn(model)
    model.eval()
    proto = jax2onnx.to_onnx(model, [("B", 32, 32, 3)], model_name="jax_resnet", opset=OPSET)
    # jax2onnx 0.17 folds NHWC<->NCHW Transpose pairs but keeps the NHWC value_info of the values in
    # between; onnxruntime refuses that file ("Incompatible dimensions"). onnxprune's importer drops such
    # hints itself (tests/test_framework_exports.py), but the zoo keeps files every runtime loads.
    del proto.graph.value_info[:]
    _save(proto, path)


def _jax_vit(path: Path) -> None:
    """A Flax NNX vision transformer: 4x4 patch embedding (Conv), learned positions, 2 pre-norm
    encoder blocks (4-head nnx.MultiHeadAttention, GELU MLP), mean pooling, linear head; dynamic batch."""
    import jax
    import jax.numpy as jnp
    import jax2onnx
    from flax import nnx

    dim, heads = 64, 4

    class Encoder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.n1 = nnx.LayerNorm(dim, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
            self.n2 = nnx.LayerNorm(dim, rngs=rngs)
            self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
            self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.n1(x))
            return x + self.fc2(jax.nn.gelu(self.fc1(self.n2(x))))

    class ViT(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.patch = nnx.Conv(3, dim, (4, 4), strides=4, rngs=rngs)
            self.pos = nnx.Param(jax.random.normal(jax.random.key(1), (1, 64, dim)) * 0.02)
            self.blocks = nnx.List([Encoder(rngs), Encoder(rngs)]) if hasattr(nnx, "List") else [
                Encoder(rngs), Encoder(rngs)]
            self.norm = nnx.LayerNorm(dim, rngs=rngs)
            self.head = nnx.Linear(dim, 10, rngs=rngs)

        def __call__(self, x):
            x = self.patch(x)
            x = jnp.reshape(x, (x.shape[0], -1, dim)) + self.pos[...]
            for b in self.blocks:
                x = b(x)
            return self.head(self.norm(x).mean(axis=1))

    model = ViT(nnx.Rngs(0))
    model.eval()
    proto = jax2onnx.to_onnx(model, [("B", 32, 32, 3)], model_name="jax_vit", opset=OPSET)
    _save(proto, path)


def _randomise_nnx_bn(model) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    key = jax.random.key(0)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            key, k1, k2, k3, k4 = jax.random.split(key, 5)
            n = module.scale[...].shape
            module.scale[...] = jax.random.uniform(k1, n, minval=0.5, maxval=1.5)
            module.bias[...] = 0.1 * jax.random.normal(k2, n)
            module.mean[...] = 0.1 * jax.random.normal(k3, n)
            module.var[...] = jnp.asarray(jax.random.uniform(k4, n, minval=0.5, maxval=1.5))


def _save(proto, path: Path) -> None:
    import onnx

    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "keras_mobilenet_v2": _keras_mobilenet_v2,
    "keras_text_transformer": _keras_text_transformer,
    "jax_resnet": _jax_resnet,
    "jax_vit": _jax_vit,
}

if __name__ == "__main__":  # the child process of `_child`
    BUILDERS[sys.argv[1]](Path(sys.argv[2]))
