"""Which convolutions of an int8 model cost labels, and an int8 model with
those kept in fp32.

A QDQ model from :func:`mmrepvgg.quantization.ptq.quantize_int8` and the
fp32 model it came from name their operators alike, so any operator of the
int8 model can be given back its fp32 inputs (the tensor before the
QuantizeLinear/DequantizeLinear pair, its fp32 weights and bias): it then
computes in fp32, and the pairs that fed only it are dropped. ONNX
Runtime's ``nodes_to_exclude`` alone is not enough for this: it leaves the
excluded conv's input quantized by its producer's pair. One calibration
serves every such model:

- the sensitivity of a conv is how far the logits move when it alone is
  int8 (every other operator in fp32), on the calibration images;
- mixed precision keeps the most sensitive convs in fp32.
"""
import copy
from dataclasses import dataclass

import numpy as np

from ..deploy.engines import onnxruntime_session
from ..deploy.model_info import INPUT, ConvSensitivity

__all__ = ['Conv', 'convs_of', 'keep_float', 'sensitivities']

_QDQ = ('QuantizeLinear', 'DequantizeLinear')


@dataclass(frozen=True)
class Conv:
    """A convolution of an exported model.

    Attributes:
        node (str): Its ONNX node's name.
        name (str): Its module's name in the PyTorch model (its weight's
            name without ``.weight``), as reports show it.
    """
    node: str
    name: str


def convs_of(fp32):
    """The :class:`Conv` of every Conv node of an fp32 model, in graph
    order."""
    initializers = {t.name for t in fp32.graph.initializer}
    convs = []
    for node in fp32.graph.node:
        if node.op_type == 'Conv':
            weight = node.input[1]
            name = (
                weight[:-len('.weight')] if weight in initializers
                and weight.endswith('.weight') else node.name)
            convs.append(Conv(node.name, _module_name(name)))
    return convs


def _module_name(name):
    # The exporter names weights by the path from the exported wrapper
    # (``logits.segmentor.backbone...``); the segmentor's own path is the
    # one its config and checkpoint use.
    prefix = 'segmentor.'
    return name[name.index(prefix) + len(prefix):] if prefix in name else name


def keep_float(int8, fp32, nodes):
    """A copy of a QDQ model in which the named operators compute in fp32.

    Each reads the fp32 value of its inputs as the int8 model computes
    them, and its own fp32 weights. Where the quantizer dropped an
    operator (a ReLU that a zero point at the bottom of an unsigned range
    does), it is put back on the paths into fp32 operators only, so that
    the int8 convs keep their fused int8 kernels.

    Args:
        int8 (onnx.ModelProto): The QDQ model.
        fp32 (onnx.ModelProto): The fp32 model it was quantized from.
        nodes (Iterable[str]): Names of operators (of both models) to
            compute in fp32.

    Returns:
        onnx.ModelProto: The model, without the QDQ pairs and quantized
        weights that no int8 operator reads any more.
    """
    proto = copy.deepcopy(int8)
    graph = _Rebuild(proto, fp32)
    for node in list(proto.graph.node):
        if node.name in nodes and node.op_type not in _QDQ:
            node.input[:] = [
                graph.resolve(i) for i in graph.sources[node.name].input
            ]
    graph.finish()
    _prune(proto)
    return proto


class _Rebuild:
    """Finds, in an int8 model, the tensor that holds the value of an fp32
    model's tensor, re-creating dropped operators where needed."""

    def __init__(self, proto, fp32):
        self.proto = proto
        self.sources = {n.name: n for n in fp32.graph.node}
        self.weights = {t.name: t for t in fp32.graph.initializer}
        self.tensors = {o for n in proto.graph.node for o in n.output}
        self.alias = {i.name: i.name for i in fp32.graph.input}
        int8_nodes = {n.name: n for n in proto.graph.node}
        for node in fp32.graph.node:
            if node.name in int8_nodes:
                self.alias.update(
                    zip(node.output, int8_nodes[node.name].output))
        self.producers = {o: n for n in fp32.graph.node for o in n.output}
        self.needed, self.added = set(), []

    def resolve(self, name):
        """The int8 model's tensor with the value of fp32 tensor ``name``."""
        if name in self.weights:
            self.needed.add(name)
            return name
        if name and name not in self.alias:  # '': an optional input unset
            node = copy.deepcopy(self.producers[name])
            node.input[:] = [self.resolve(i) for i in node.input]
            renamed = [
                f'{o}_fp32' if o in self.tensors else o for o in node.output
            ]
            self.alias.update(zip(node.output, renamed))
            node.output[:] = renamed
            node.name += '_fp32'
            self.added.append(node)
        return self.alias.get(name, name)

    def finish(self):
        """Put the fp32 weights and the re-created operators in: a float
        weight replaces the DequantizeLinear that gave its value."""
        graph = self.proto.graph
        for node in [n for n in graph.node if set(n.output) & self.needed]:
            graph.node.remove(node)
        present = {t.name for t in graph.initializer}
        graph.initializer.extend(
            copy.deepcopy(self.weights[name])
            for name in sorted(self.needed - present))
        _insert_sorted(graph, self.added)


def _insert_sorted(graph, added):
    """Add nodes to a graph, keeping its nodes in topological order."""
    nodes = list(graph.node) + added
    produced = {o: i for i, n in enumerate(nodes) for o in n.output}
    order, state = [], {}

    def visit(index):
        if state.get(index):
            return
        state[index] = True
        for name in nodes[index].input:
            if name in produced:
                visit(produced[name])
        order.append(nodes[index])

    for index in range(len(nodes)):
        visit(index)
    del graph.node[:]
    graph.node.extend(order)


def _prune(proto):
    """Drop the operators and initializers whose outputs nothing reads."""
    graph = proto.graph
    used = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if set(node.output) & used:
            kept.append(node)
            used.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _logits(model, images):
    session = onnxruntime_session(model.SerializeToString())
    return [session.run(['logits'], {INPUT: b.numpy()})[0] for b in images]


def _noise_to_signal(logits, reference):
    noise = sum(
        float(np.square(a - b).sum()) for a, b in zip(logits, reference))
    signal = sum(float(np.square(b).sum()) for b in reference)
    return noise / signal if signal else noise


def sensitivities(int8, fp32, images):
    """How much each conv alone moves the logits when it is int8.

    Args:
        int8 (onnx.ModelProto): The QDQ model.
        fp32 (onnx.ModelProto): The fp32 model it was quantized from.
        images (Sequence[Tensor]): Image batches to measure on.

    Returns:
        list[ConvSensitivity]: Every conv with ``error``, the energy of
        the change of the logits over their own (``sum (q - f)^2 / sum
        f^2``), the most sensitive first.
    """
    convs = convs_of(fp32)
    reference = _logits(fp32, images)
    others = {n.name for n in fp32.graph.node}
    ranking = []
    for conv in convs:
        alone = keep_float(int8, fp32, others - {conv.node})
        ranking.append(
            ConvSensitivity(
                conv.name, _noise_to_signal(_logits(alone, images),
                                            reference)))
    return sorted(ranking, key=lambda s: -s.error)
