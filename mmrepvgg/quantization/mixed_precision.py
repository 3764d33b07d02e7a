"""Which convolutions of an int8 model cost labels, and an int8 model with
those kept in fp32.

A QDQ model from :func:`mmrepvgg.quantization.ptq.quantize_int8` and the
fp32 model it came from name their operators alike, so any operator of the
int8 model can be given back its fp32 inputs (the tensor before the
QuantizeLinear/DequantizeLinear pair, its fp32 weights and bias): it then
computes in fp32, and the pairs that fed only it are dropped; the other way
round, any operator of the fp32 model can be given its int8 inputs. ONNX
Runtime's ``nodes_to_exclude`` alone is not enough for this: it leaves the
excluded conv's input quantized by its producer's pair. One calibration
serves every such model:

- the sensitivity of a conv is how far its output moves when it alone
  computes in int8 (its inputs and weights as the int8 model quantizes
  them), measured for every conv in one run on the first calibration
  images;
- mixed precision keeps the most sensitive convs in fp32.
"""
import copy
from dataclasses import dataclass

import numpy as np

from ..deploy.model_info import ConvSensitivity
from .agreement import run_onnx

__all__ = ['RANKING_PIXELS', 'Conv', 'convs_of', 'transplant', 'sensitivities']

_QDQ = ('QuantizeLinear', 'DequantizeLinear')
# The sensitivity is measured on the first images up to this many pixels
# (at least one image), each in one run of the model with an int8 copy of
# every conv beside it.
RANKING_PIXELS = 512 * 1024


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


def transplant(model, source, nodes, tag):
    """A copy of ``model`` in which the named operators read their inputs
    as ``source`` computes them.

    The two models are an int8 QDQ model and the fp32 model it came from,
    either way round. Each named operator reads the value of its
    ``source`` inputs as ``model`` computes them, and its ``source``
    weights: given the fp32 model as ``source``, it computes in fp32; given
    the int8 one, in int8. The ``source`` operators on the way that
    ``model`` lacks are put in, named with a ``_{tag}`` suffix (a ReLU that
    the quantizer dropped, where a zero point at the bottom of an unsigned
    range does its work, comes back on the paths into fp32 operators only,
    so that the int8 convs keep their fused int8 kernels), and the
    operators and weights that nothing reads any more are dropped.

    Args:
        model (onnx.ModelProto): The model copied.
        source (onnx.ModelProto): The other model.
        nodes (Collection[str]): Names of operators of both models.
        tag (str): Names the operators put in.

    Returns:
        onnx.ModelProto: The copy.
    """
    proto = copy.deepcopy(model)
    graph = _Rebuild(proto, source, tag)
    for node in proto.graph.node:
        if node.name in nodes and node.op_type not in _QDQ:
            node.input[:] = [
                graph.resolve(i) for i in graph.sources[node.name].input
            ]
    graph.finish()
    _drop_unread(proto)
    return proto


class _Rebuild:
    """Finds, in a model, the tensor that holds the value of a source
    model's tensor, re-creating the source's operators where needed."""

    def __init__(self, proto, source, tag):
        self.proto, self.suffix = proto, f'_{tag}'
        self.sources = {n.name: n for n in source.graph.node}
        self.weights = {t.name: t for t in source.graph.initializer}
        self.tensors = {o for n in proto.graph.node for o in n.output}
        self.tensors.update(t.name for t in proto.graph.initializer)
        self.alias = {i.name: i.name for i in source.graph.input}
        own = {n.name: n for n in proto.graph.node}
        for node in source.graph.node:
            if node.name in own:
                self.alias.update(zip(node.output, own[node.name].output))
        self.producers = {o: n for n in source.graph.node for o in n.output}
        self.needed, self.added = set(), []

    def resolve(self, name):
        """The model's tensor with the value of source tensor ``name``."""
        if name in self.weights:
            self.needed.add(name)
            return name
        if name and name not in self.alias:  # '': an optional input unset
            node = copy.deepcopy(self.producers[name])
            node.input[:] = [self.resolve(i) for i in node.input]
            renamed = [
                o + self.suffix if o in self.tensors else o
                for o in node.output
            ]
            self.alias.update(zip(node.output, renamed))
            node.output[:] = renamed
            node.name += self.suffix
            self.added.append(node)
        return self.alias.get(name, name)

    def finish(self):
        """Put the source's weights and the re-created operators in: a
        source weight replaces the operator that gave its value."""
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


def _drop_unread(proto):
    """Drop the operators and initializers of a model whose outputs
    nothing reads, in place: ONNX Runtime runs them all."""
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


def _beside(fp32, int8, nodes):
    """A copy of the fp32 model with, beside each named conv, the same conv
    reading its inputs and weights as the int8 model computes them; its
    outputs are, for each conv, the energy of the difference of the two
    convs' outputs and the energy of the fp32 output."""
    from onnx import TensorProto, helper
    proto = copy.deepcopy(fp32)
    graph = _Rebuild(proto, int8, 'int8')
    fp32_outputs = {n.name: n.output[0] for n in proto.graph.node}
    del proto.graph.output[:]
    for name in nodes:
        quantized = copy.deepcopy(graph.sources[name])
        quantized.input[:] = [graph.resolve(i) for i in quantized.input]
        quantized.name += graph.suffix
        quantized.output[:] = [o + graph.suffix for o in quantized.output]
        difference, energies = f'{name}_difference', (f'{name}_noise',
                                                      f'{name}_signal')
        graph.added += [
            quantized,
            helper.make_node('Sub', [quantized.output[0], fp32_outputs[name]],
                             [difference]),
            helper.make_node(
                'ReduceSumSquare', [difference], [energies[0]], keepdims=0),
            helper.make_node(
                'ReduceSumSquare', [fp32_outputs[name]], [energies[1]],
                keepdims=0)
        ]
        proto.graph.output.extend(
            helper.make_tensor_value_info(e, TensorProto.FLOAT, [])
            for e in energies)
    graph.finish()
    _drop_unread(proto)
    return proto


def sensitivities(int8, fp32, images):
    """How far each conv's output moves when it alone computes in int8.

    Args:
        int8 (onnx.ModelProto): The QDQ model.
        fp32 (onnx.ModelProto): The fp32 model it was quantized from.
        images (Sequence[Tensor]): Image batches, the first of which
            (:data:`RANKING_PIXELS`) are measured on.

    Returns:
        list[ConvSensitivity]: Every conv with ``error``, the energy of the
        change of its output over the output's own (``sum (q - f)^2 / sum
        f^2``, ``q`` computed from its inputs and weights in int8, every
        operator before it in fp32), the most sensitive first.
    """
    images = images[:max(1, RANKING_PIXELS // images[0][0, 0].numel())]
    convs = convs_of(fp32)
    probe = _beside(fp32, int8, [c.node for c in convs]).SerializeToString()
    energies = np.sum(run_onnx(probe, images), axis=0, dtype=np.float64)
    ranking = [
        ConvSensitivity(conv.name, float(noise / signal if signal else noise))
        for conv, (noise, signal) in zip(convs, energies.reshape(-1, 2))
    ]
    return sorted(ranking, key=lambda s: -s.error)
