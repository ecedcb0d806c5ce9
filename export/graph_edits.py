"""Edits of an exported ONNX graph: the tied output head, and node order.

The exporter and its variants (``export.variants``) apply these to an ``onnx.ModelProto`` in
place; they know nothing about PyTorch. The tied embedding wte is stored once in the file, and
the output head reads it through a Transpose node named HEAD_TRANSPOSE.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from runtime.onnx_contract import INPUT_IDS

HEAD_TRANSPOSE = "lm_head/Transpose"  # the node through which the output head reads wte
HEAD_PARTS = 4  # vocabulary slices of the fp32 output head (see split_head)


def embedding_initializer(graph: onnx.GraphProto) -> onnx.TensorProto | None:
    """The token embedding wte: the table the Gather over ``input_ids`` reads (found by role,
    since exporters name the tied weight after either of its users)."""
    inits = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and node.input[1] == INPUT_IDS and node.input[0] in inits:
            return inits[node.input[0]]
    return None


def tie_embedding(proto: onnx.ModelProto) -> bool:
    """Store the tied embedding once, read by the head through one Transpose named HEAD_TRANSPOSE.

    A graph's head reads wte either through a Transpose node (as the exporter writes it) or, after
    constant folding (the fp16 converter folds it), from a second, transposed initializer that
    doubles the embedding's bytes in the file. Either way the head ends up reading
    Transpose(wte) through the node named HEAD_TRANSPOSE, which split_head and untie_embedding
    find. Returns whether the head was found. ONNX Runtime folds the Transpose again in memory at
    load (in slices, for fp32 files: see split_head).
    """
    graph = proto.graph
    wte = embedding_initializer(graph)
    if wte is None:
        return False
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    wte_array = None
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        weight = node.input[1]
        source = producers.get(weight)
        if source is not None and source.op_type == "Transpose" and source.input[0] == wte.name:
            source.name = HEAD_TRANSPOSE
            return True
        candidate = inits.get(weight)
        if candidate is None or tuple(candidate.dims) != tuple(reversed(wte.dims)):
            continue
        if wte_array is None:
            wte_array = onnx.numpy_helper.to_array(wte)
        if not (onnx.numpy_helper.to_array(candidate) == wte_array.T).all():
            continue
        graph.initializer.remove(candidate)
        graph.node.insert(
            0,
            onnx.helper.make_node(
                "Transpose", [wte.name], [weight], perm=[1, 0], name=HEAD_TRANSPOSE
            ),
        )
        return True
    return False


def split_head(proto: onnx.ModelProto, parts: int = HEAD_PARTS) -> bool:
    """Compute the tied output head in ``parts`` vocabulary slices: MatMul(x, Transpose(Slice(wte))).

    ONNX Runtime constant-folds each Transpose(Slice(wte)) into its own initializer and prepacks
    it for the MatMul, after which the folded copy is released. With one [C, V] head that copy
    is as large as the embedding, held next to its packed form while it is packed: the load's
    peak memory. Slices make that transient 1 / parts as large, for one small logits Concat a
    step. The
    file still stores wte once. Returns whether the head was found (fp32 graphs).
    """
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = proto.graph
    transpose = next((n for n in graph.node if n.name == HEAD_TRANSPOSE), None)
    if transpose is None:
        return False
    head = next(
        (n for n in graph.node if n.op_type == "MatMul" and transpose.output[0] in n.input), None
    )
    wte = next((i for i in graph.initializer if i.name == transpose.input[0]), None)
    if head is None or wte is None:
        return False
    bounds = np.linspace(0, wte.dims[0], parts + 1).astype(np.int64)
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "lm_head/slice_axes")
    graph.initializer.append(axes)
    new_nodes, pieces = [], []
    for k in range(parts):
        prefix = f"lm_head/part{k}"
        for which, value in (("start", bounds[k]), ("end", bounds[k + 1])):
            graph.initializer.append(
                numpy_helper.from_array(np.array([value], dtype=np.int64), f"{prefix}/{which}")
            )
        new_nodes += [
            helper.make_node(
                "Slice",
                [wte.name, f"{prefix}/start", f"{prefix}/end", axes.name],
                [f"{prefix}/rows"],
                name=f"{prefix}/Slice",
            ),
            helper.make_node(
                "Transpose",
                [f"{prefix}/rows"],
                [f"{prefix}/weight"],
                perm=[1, 0],
                name=f"{prefix}/Transpose",
            ),
            helper.make_node(
                "MatMul",
                [head.input[0], f"{prefix}/weight"],
                [f"{prefix}/logits"],
                name=f"{prefix}/MatMul",
            ),
        ]
        pieces.append(f"{prefix}/logits")
    new_nodes.append(
        helper.make_node("Concat", pieces, list(head.output), axis=-1, name="lm_head/Concat")
    )
    index = list(graph.node).index(head)
    graph.node.remove(head)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(index + offset, node)
    graph.node.remove(transpose)
    return True


def untie_embedding(proto: onnx.ModelProto) -> None:
    """Give the head its own transposed weight (int8 quantises it apart from the Gather)."""
    graph = proto.graph
    for index, node in enumerate(graph.node):
        if node.op_type == "Transpose" and node.name == HEAD_TRANSPOSE:
            wte = next(i for i in graph.initializer if i.name == node.input[0])
            array = onnx.numpy_helper.to_array(wte).T.copy()
            graph.initializer.append(onnx.numpy_helper.from_array(array, name=node.output[0]))
            del graph.node[index]
            return


def head_matmul(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The output head of a tied graph: the MatMul that reads wte through HEAD_TRANSPOSE."""
    transpose = next((n for n in graph.node if n.name == HEAD_TRANSPOSE), None)
    if transpose is None:
        return None
    weight = transpose.output[0]
    return next((n for n in graph.node if n.op_type == "MatMul" and n.input[1] == weight), None)


def gather_from_nbits_head(proto: onnx.ModelProto, head: onnx.NodeProto) -> bool:
    """Tie a 4- or 8-bit head and the embedding again: the token lookup becomes a
    GatherBlockQuantized over the head's own MatMulNBits weight, and the fp32 table is dropped.

    MatMulNBits stores its [K=n_embd, N=vocab] weight as uint8 ``[vocab, k_blocks, block*bits/8]``,
    blocks running along n_embd: row v is wte[v] quantised in blocks, so the same bytes (viewed
    as ``[vocab, n_embd*bits/8]``), scales ``[vocab, k_blocks]`` and packed zero points serve
    GatherBlockQuantized (uint8 data, same bits, quantize_axis=1). The file then holds the
    embedding once (onnxruntime-genai's builder ties int4 embeddings the same way). Returns
    False (graph unchanged) when the head is not such a MatMulNBits whose blocks tile n_embd
    exactly, or the lookup is not a plain Gather of wte.
    """
    graph = proto.graph
    wte = embedding_initializer(graph)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    bits = int(attrs.get("bits", 4))
    if wte is None or head.op_type != "MatMulNBits" or bits not in (4, 8):
        return False
    vocab, n_embd = wte.dims
    block = int(attrs["block_size"])
    if (int(attrs["N"]), int(attrs["K"])) != (vocab, n_embd) or n_embd % block:
        return False
    gather = _token_lookup(graph, wte)
    if gather is None:
        return False
    shape = onnx.numpy_helper.from_array(
        np.array([vocab, n_embd * bits // 8], dtype=np.int64), "wte/nbits_shape"
    )
    graph.initializer.append(shape)
    rows = "wte/nbits_rows"
    lookup = [rows, gather.input[1], head.input[2]]
    if len(head.input) > 3 and head.input[3]:
        lookup.append(head.input[3])  # packed uint8 zero points: the same layout for both ops
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    new_nodes = [
        onnx.helper.make_node(
            "Reshape", [head.input[1], shape.name], [rows], name="wte/nbits_Reshape"
        ),
        onnx.helper.make_node(
            "GatherBlockQuantized",
            lookup,
            list(gather.output),
            name="wte/GatherBlockQuantized",
            domain="com.microsoft",
            bits=bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        ),
    ]
    for offset, node in enumerate(new_nodes):
        graph.node.insert(index + offset, node)
    if not any(wte.name in n.input for n in graph.node):
        graph.initializer.remove(wte)
    return True


def gather_from_int8_head(proto: onnx.ModelProto, head_weight: str) -> bool:
    """Tie a dynamically quantized int8 head and the embedding again: the token lookup reads the
    head's int8 weight and scales the rows it gathered, and the fp32 table is dropped.

    ``quantize_dynamic`` (per channel, symmetric) stores the head's [n_embd, vocab] weight as
    ``{head_weight}_quantized`` with a scale and a zero point per vocabulary entry, so token v is
    column v: Gather(axis=1) -> [n_embd, B, T], Transpose -> [B, T, n_embd], Cast, times the
    gathered scales. Standard ONNX ops only, so the file stays portable; the embedding costs a
    quarter of its fp32 bytes in the file and in memory. Returns False (graph unchanged) when the
    head or the lookup is not in that form.
    """
    graph = proto.graph
    wte = embedding_initializer(graph)
    inits = {init.name: init for init in graph.initializer}
    names = [f"{head_weight}_{part}" for part in ("quantized", "scale", "zero_point")]
    if wte is None or not all(name in inits for name in names):
        return False
    vocab, n_embd = wte.dims
    weight, scale, zero_point = (inits[name] for name in names)
    if (
        tuple(weight.dims) != (n_embd, vocab)
        or weight.data_type != onnx.TensorProto.INT8
        or tuple(scale.dims) != (vocab,)
        or onnx.numpy_helper.to_array(zero_point).any()  # symmetric: every zero point is 0
    ):
        return False
    gather = _token_lookup(graph, wte)
    if gather is None:
        return False
    axis = onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "wte/int8_last_axis")
    graph.initializer.append(axis)
    ids = gather.input[1]
    new_nodes = [
        onnx.helper.make_node("Gather", [weight.name, ids], ["wte/int8_columns"], axis=1),
        onnx.helper.make_node("Transpose", ["wte/int8_columns"], ["wte/int8_rows"], perm=[1, 2, 0]),
        onnx.helper.make_node(
            "Cast", ["wte/int8_rows"], ["wte/int8_values"], to=onnx.TensorProto.FLOAT
        ),
        onnx.helper.make_node("Gather", [scale.name, ids], ["wte/int8_row_scales"], axis=0),
        onnx.helper.make_node("Unsqueeze", ["wte/int8_row_scales", axis.name], ["wte/int8_scales"]),
        onnx.helper.make_node("Mul", ["wte/int8_values", "wte/int8_scales"], list(gather.output)),
    ]
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(new_nodes):
        node.name = f"wte/int8_{offset}_{node.op_type}"
        graph.node.insert(index + offset, node)
    if not any(wte.name in n.input for n in graph.node):
        graph.initializer.remove(wte)
    return True


def _token_lookup(graph: onnx.GraphProto, wte: onnx.TensorProto) -> onnx.NodeProto | None:
    """The plain Gather (axis 0) of wte rows by ``input_ids``; None if the lookup is another."""
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] == wte.name and node.input[1] == INPUT_IDS:
            if any(a.name == "axis" and a.i != 0 for a in node.attribute):
                return None
            return node
    return None


def strip_exporter_extras(proto: onnx.ModelProto) -> None:
    """Drop what the dynamo exporter adds beyond the graph: per-node notes (stack traces with the
    exporting machine's file paths, FX node dumps), graph-level notes, and the intermediate
    value types (ONNX Runtime infers them; left in, they go stale when a variant converts the
    graph to fp16). A quarter of a small model's file, and nothing a runtime reads."""
    del proto.graph.metadata_props[:]
    del proto.graph.value_info[:]
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after its inputs' producers (stable).

    ONNX Runtime accepts any order, but the ONNX checker (and other runtimes) require this.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a missing input near {pending[0].name!r}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
