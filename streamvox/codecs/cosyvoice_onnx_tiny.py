"""Tiny random-weight stand-ins for CosyVoice2's ``campplus.onnx`` and ``speech_tokenizer_v2.onnx`` (tests only).

They keep the publisher's interfaces: the same input/output names, dtypes and ranks, so the front end talks to
them as it would to the real files.

- ``campplus.onnx``: input ``input`` [B, T, 80] float32 (mean-normalised Kaldi fbank) -> output ``output``
  [B, 192] float32. Here: mean over time of relu(x @ W + b); CAM++'s real network is not rebuilt.
- ``speech_tokenizer_v2.onnx``: inputs ``feats`` [B, 128, T] float32 (Whisper log-mel, 100 Hz) and
  ``feats_length`` [B] int32 -> output ``indices`` [B, T'] int32, T' = ceil(ceil(T / 2) / 2) (25 Hz). Here the
  real architecture at tiny width: two stride-2 convs with GELU, length masks, FSMN attention blocks with rotary
  position (head size 64), and the FSQ head (tanh, round to {-1, 0, 1} over 8 dims, base-3 code < 6561). Weight
  initializers and the nodes that consume them carry the names that s3tokenizer's ``onnx2torch`` looks for, so
  ``S3TokenizerV2(..., ModelConfig(n_audio_state=64, n_audio_head=1, n_audio_layer=2)).init_from_onnx(path)``
  loads the tiny file and serves as an independent torch reference.

The graphs are written with the ``onnx`` helper API (``onnx`` is needed only here, at write time); every
non-weight constant is a ``Constant`` node, so that initializers are exactly the network's weights.

    write_tiny_campplus(path, seed=0) -> Path
    write_tiny_speech_tokenizer(path, seed=0, n_state=64, n_head=1, n_layer=2) -> Path
    write_tiny_checkpoint(model_dir, seed=0) -> Path   (both files, under their published names)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from streamvox.codecs.cosyvoice_frontend import CAMPPLUS_FILE, EMBEDDING_DIM, SPEECH_TOKENIZER_FILE

OPSET = 17  # LayerNormalization is in the default domain from 17 on
TINY_STATE, TINY_HEADS, TINY_LAYERS = 64, 1, 2  # tiny speech tokenizer: width, heads (64 dims each), blocks
HEAD_DIM = 64  # s3tokenizer's rotary table is built for 64-dim heads
N_MELS = 128
FSMN_KERNEL = 31
FSQ_DIMS, FSQ_LEVELS = 8, 3
# initializer names that s3tokenizer's onnx2torch maps by name (v2, 25 Hz)
CONV_NAMES = ("onnx::Conv_2216", "onnx::Conv_2217", "onnx::Conv_2218", "onnx::Conv_2219")  # conv1 w, b; conv2 w, b
PROJECT_DOWN_WEIGHT, PROJECT_DOWN_BIAS = "onnx::MatMul_2536", "quantizer.project_in.bias"


class _Graph:
    """Collects nodes, weight initializers and Constant nodes; op() returns the name of the node's output."""

    def __init__(self, seed: int) -> None:
        import onnx  # write-time only

        self.onnx = onnx
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.weights: list = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self.count += 1
        name = name or f"/tiny/{op_type}_{self.count}"
        output = f"{name}_output_{self.count}"
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def const(self, value, dtype=np.float32) -> str:
        tensor = self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype))
        return self.op("Constant", [], value=tensor)

    def weight(self, name: str, array: np.ndarray) -> str:
        self.weights.append(self.onnx.numpy_helper.from_array(np.asarray(array, dtype=np.float32), name=name))
        return name

    def normal(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> str:
        return self.weight(name, mean + std * self.rng.standard_normal(shape))

    def save(self, path: Path, inputs: list, outputs: list, graph_name: str) -> Path:
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="streamvox")
        model.ir_version = 8
        self.onnx.checker.check_model(model)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.onnx.save(model, str(path))
        return path


def write_tiny_campplus(path: str | Path, *, seed: int = 0, feat_dim: int = 80) -> Path:
    """Tiny campplus.onnx: input [B, T, 80] float32 -> output [B, 192] float32 = mean_t relu(x W + b)."""
    g = _Graph(seed)
    w = g.normal("campplus.proj.weight", (feat_dim, EMBEDDING_DIM), 1.0 / math.sqrt(feat_dim))
    b = g.normal("campplus.proj.bias", (EMBEDDING_DIM,), 0.1)
    hidden = g.op("Relu", [g.op("Add", [g.op("MatMul", ["input", w]), b])])  # [B, T, 192]
    g.op("ReduceMean", [hidden], name="/pool/ReduceMean", axes=[1], keepdims=0)
    g.nodes[-1].output[0] = "output"
    make = g.onnx.helper.make_tensor_value_info
    float_type = g.onnx.TensorProto.FLOAT
    return g.save(Path(path), [make("input", float_type, ["batch", "frames", feat_dim])],
                  [make("output", float_type, ["batch", EMBEDDING_DIM])], "campplus_tiny")


# ---------------------------------------------------------------------------------------------------------------
# Speech tokenizer pieces; x names are ONNX value names, shapes in comments
# ---------------------------------------------------------------------------------------------------------------


def _gelu(g: _Graph, x: str) -> str:
    """Exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2))."""
    erf = g.op("Erf", [g.op("Mul", [x, g.const(1.0 / math.sqrt(2.0))])])
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5)]), g.op("Add", [erf, g.const(1.0)])])


def _time_positions(g: _Graph, x: str, axis: int) -> str:
    """int64 [T] = 0 .. T - 1 for the size of x along axis."""
    size = g.op("Gather", [g.op("Shape", [x]), g.const(axis, np.int64)], axis=0)  # scalar
    return g.op("Range", [g.const(0, np.int64), size, g.const(1, np.int64)])


def _length_mask(g: _Graph, lengths: str, x: str) -> str:
    """float [B, 1, T]: 1 where t < lengths[b] for x [B, C, T]; lengths int64 [B]."""
    positions = g.op("Unsqueeze", [_time_positions(g, x, 2), g.const([0], np.int64)])  # [1, T]
    valid = g.op("Less", [positions, g.op("Unsqueeze", [lengths, g.const([1], np.int64)])])  # [B, T]
    return g.op("Unsqueeze", [g.op("Cast", [valid], to=g.onnx.TensorProto.FLOAT), g.const([1], np.int64)])


def _halve_length(g: _Graph, lengths: str) -> str:
    """Output length of a k=3, stride-2, pad-1 conv: (L - 1) // 2 + 1 (int64, L >= 1)."""
    one = g.const(1, np.int64)
    return g.op("Add", [g.op("Div", [g.op("Sub", [lengths, one]), g.const(2, np.int64)]), one])


def _conv_stem(g: _Graph, feats: str, lengths: str, n_state: int) -> tuple[str, str]:
    """feats [B, 128, T], lengths int64 [B] -> (x [B, T', n_state] at 25 Hz, mask [B, 1, T'])."""
    x = feats
    fan_ins = (N_MELS * 3, n_state * 3)
    for index, (weight_name, bias_name) in enumerate((CONV_NAMES[:2], CONV_NAMES[2:])):
        x = g.op("Mul", [x, _length_mask(g, lengths, x)])
        w = g.normal(weight_name, (n_state, fan_ins[index] // 3, 3), 1.0 / math.sqrt(fan_ins[index]))
        b = g.normal(bias_name, (n_state,), 0.1)
        conv = g.op("Conv", [x, w, b], name=f"/conv{index + 1}/Conv", kernel_shape=[3], strides=[2], pads=[1, 1])
        x = _gelu(g, conv)  # [B, n_state, T / 2^(index + 1)]
        lengths = _halve_length(g, lengths)
    mask = _length_mask(g, lengths, x)  # [B, 1, T']
    return g.op("Transpose", [x], perm=[0, 2, 1]), mask


def _rotary_tables(g: _Graph, x: str) -> tuple[str, str]:
    """cos, sin [1, T, 1, 64] for x [B, T, D]: angle t * f_j, f_j = 10000^(-2 (j mod 32) / 64) (s3tokenizer's)."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2)[: HEAD_DIM // 2].float() / HEAD_DIM))  # float32 [32]
    freqs = torch.cat([freqs, freqs]).numpy()  # [64]
    positions = g.op("Cast", [_time_positions(g, x, 1)], to=g.onnx.TensorProto.FLOAT)  # [T]
    angle = g.op("Mul", [g.op("Unsqueeze", [positions, g.const([1], np.int64)]), g.const(freqs[None])])  # [T, 64]
    axes = g.const([0, 2], np.int64)
    return g.op("Unsqueeze", [g.op("Cos", [angle]), axes]), g.op("Unsqueeze", [g.op("Sin", [angle]), axes])


def _rotate(g: _Graph, x: str, cos: str, sin: str) -> str:
    """x [B, T, H, 64] -> x cos + [-x_hi, x_lo] sin (halves of the head dimension)."""
    axis, half = g.const([3], np.int64), HEAD_DIM // 2
    low = g.op("Slice", [x, g.const([0], np.int64), g.const([half], np.int64), axis])
    high = g.op("Slice", [x, g.const([half], np.int64), g.const([HEAD_DIM], np.int64), axis])
    turned = g.op("Concat", [g.op("Neg", [high]), low], axis=3)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [turned, sin])])


def _linear(g: _Graph, x: str, scope: str, n_in: int, n_out: int, bias: bool = True) -> str:
    """x [..., n_in] @ W [n_in, n_out] (+ b); node names /<scope>/MatMul and /<scope>/Add as onnx2torch reads."""
    name = scope.strip("/").replace("/", ".")
    y = g.op("MatMul", [x, g.normal(f"{name}.weight", (n_in, n_out), 1.0 / math.sqrt(n_in))], name=f"{scope}/MatMul")
    if bias:
        y = g.op("Add", [y, g.normal(f"{name}.bias", (n_out,), 0.1)], name=f"{scope}/Add")
    return y


def _layer_norm(g: _Graph, x: str, scope: str, n_state: int) -> str:
    name = scope.strip("/").replace("/", ".")
    scale = g.normal(f"{name}.weight", (n_state,), 0.1, mean=1.0)
    shift = g.normal(f"{name}.bias", (n_state,), 0.1)
    return g.op("LayerNormalization", [x, scale, shift], name=f"{scope}/LayerNormalization", axis=-1, epsilon=1e-5)


def _fsmn(g: _Graph, v: str, scope: str, n_state: int, mask_pad: str) -> str:
    """FSMN memory: v [B, T, D] masked -> depthwise conv (31 taps, zero 'same' padding) + v, masked again."""
    v = g.op("Mul", [v, mask_pad])
    w = g.normal(f"{scope.strip('/').replace('/', '.')}.fsmn_block.weight", (n_state, 1, FSMN_KERNEL), 0.1)
    side = (FSMN_KERNEL - 1) // 2
    conv = g.op("Conv", [g.op("Transpose", [v], perm=[0, 2, 1]), w], name=f"{scope}/fsmn_block/Conv",
                kernel_shape=[FSMN_KERNEL], group=n_state, pads=[side, FSMN_KERNEL - 1 - side])
    return g.op("Mul", [g.op("Add", [g.op("Transpose", [conv], perm=[0, 2, 1]), v]), mask_pad])


def _attention(g: _Graph, x: str, scope: str, n_state: int, n_head: int, ctx: dict) -> str:
    """FSMN multi-head self-attention: x [B, T, D] -> out(attn) + fsmn(value), scope /blocks.i/attn."""
    heads = g.const([0, 0, n_head, HEAD_DIM], np.int64)
    q = g.op("Reshape", [_linear(g, x, f"{scope}/query", n_state, n_state), heads])  # [B, T, H, 64]
    k = g.op("Reshape", [_linear(g, x, f"{scope}/key", n_state, n_state, bias=False), heads])
    v_flat = _linear(g, x, f"{scope}/value", n_state, n_state)  # [B, T, D]
    v = g.op("Reshape", [v_flat, heads])
    scale = g.const(HEAD_DIM**-0.25)
    q = g.op("Mul", [g.op("Transpose", [_rotate(g, q, ctx["cos"], ctx["sin"])], perm=[0, 2, 1, 3]), scale])
    k = g.op("Mul", [g.op("Transpose", [_rotate(g, k, ctx["cos"], ctx["sin"])], perm=[0, 2, 3, 1]), scale])
    scores = g.op("Add", [g.op("MatMul", [q, k]), ctx["bias"]])  # [B, H, T, T]
    mixed = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), g.op("Transpose", [v], perm=[0, 2, 1, 3])])
    merged = g.op("Reshape", [g.op("Transpose", [mixed], perm=[0, 2, 1, 3]), g.const([0, 0, n_state], np.int64)])
    out = _linear(g, merged, f"{scope}/out", n_state, n_state)
    return g.op("Add", [out, _fsmn(g, v_flat, scope, n_state, ctx["mask_pad"])])


def _block(g: _Graph, x: str, index: int, n_state: int, n_head: int, ctx: dict) -> str:
    scope = f"/blocks.{index}"
    x = g.op("Add", [x, _attention(g, _layer_norm(g, x, f"{scope}/attn_ln", n_state), f"{scope}/attn", n_state,
                                   n_head, ctx)])
    hidden = _gelu(g, _linear(g, _layer_norm(g, x, f"{scope}/mlp_ln", n_state), f"{scope}/mlp/mlp.0", n_state,
                              4 * n_state))
    return g.op("Add", [x, _linear(g, hidden, f"{scope}/mlp/mlp.2", 4 * n_state, n_state)])


def _fsq_head(g: _Graph, x: str, n_state: int) -> str:
    """x [B, T, D] -> int32 [B, T]: sum_i 3^i (round(0.999 tanh(x W + b)_i) + 1)."""
    w = g.normal(PROJECT_DOWN_WEIGHT, (n_state, FSQ_DIMS), 2.0 / math.sqrt(n_state))
    b = g.normal(PROJECT_DOWN_BIAS, (FSQ_DIMS,), 0.1)
    h = g.op("Add", [g.op("MatMul", [x, w], name="/quantizer/project_in/MatMul"), b], name="/quantizer/project_in/Add")
    h = g.op("Mul", [g.op("Tanh", [h]), g.const(0.9990000128746033)])
    digits = g.op("Add", [g.op("Round", [h]), g.const(1.0)])  # {0, 1, 2} per dim
    powers = g.const(FSQ_LEVELS ** np.arange(FSQ_DIMS, dtype=np.float32))  # [8]
    code = g.op("ReduceSum", [g.op("Mul", [digits, powers]), g.const([-1], np.int64)], keepdims=0)
    return g.op("Cast", [code], to=g.onnx.TensorProto.INT32)


def write_tiny_speech_tokenizer(path: str | Path, *, seed: int = 0, n_state: int = TINY_STATE,
                                n_head: int = TINY_HEADS, n_layer: int = TINY_LAYERS) -> Path:
    """Tiny speech_tokenizer_v2.onnx: feats [B, 128, T] float32, feats_length [B] int32 -> indices [B, T'] int32."""
    if n_state != n_head * HEAD_DIM:
        raise ValueError(f"n_state must be n_head * {HEAD_DIM} (rotary heads are 64 wide), got {n_state}/{n_head}")
    g = _Graph(seed)
    lengths = g.op("Cast", ["feats_length"], to=g.onnx.TensorProto.INT64)
    x, mask = _conv_stem(g, "feats", lengths, n_state)  # [B, T', D], [B, 1, T']
    cos, sin = _rotary_tables(g, x)
    bias = g.op("Mul", [g.op("Sub", [g.const(1.0), mask]), g.const(-1.0e10)])  # 0 or -1e10, [B, 1, T']
    ctx = {"cos": cos, "sin": sin, "mask_pad": g.op("Transpose", [mask], perm=[0, 2, 1]),
           "bias": g.op("Unsqueeze", [bias, g.const([1], np.int64)])}  # bias [B, 1, 1, T']
    for index in range(n_layer):
        x = _block(g, x, index, n_state, n_head, ctx)
    _fsq_head(g, x, n_state)  # the last node: its output becomes the graph output
    g.nodes[-1].output[0] = "indices"
    make = g.onnx.helper.make_tensor_value_info
    proto = g.onnx.TensorProto
    inputs = [make("feats", proto.FLOAT, ["batch", N_MELS, "frames"]), make("feats_length", proto.INT32, ["batch"])]
    return g.save(Path(path), inputs, [make("indices", proto.INT32, ["batch", "tokens"])], "speech_tokenizer_tiny")


def write_tiny_checkpoint(model_dir: str | Path, *, seed: int = 0) -> Path:
    """Write campplus.onnx and speech_tokenizer_v2.onnx (tiny, seeded) into model_dir; returns model_dir."""
    model_dir = Path(model_dir)
    write_tiny_campplus(model_dir / CAMPPLUS_FILE, seed=seed)
    write_tiny_speech_tokenizer(model_dir / SPEECH_TOKENIZER_FILE, seed=seed + 1)
    return model_dir
