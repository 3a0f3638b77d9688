"""Making a ranker cheap to serve: distillation, ONNX export, int8 quantisation, an ONNX scorer.

The path from a trained :class:`~mlsd.models.ranking.deep.DeepRanker` to a serving artefact::

    student = distill(teacher, train, valid, student_config=DeepRankerConfig(
        n_cross_layers=1, mlp_dims=(64,)))
    export_onnx(student, out / "model.fp32.onnx")
    quantize_int8(out / "model.fp32.onnx", out / "model.onnx")
    scorer = OnnxRanker(out / "model.onnx", student.schema_, student.config.task_names)
    scorer.save(out / "ranker")                   # model.onnx + ranker.json, kind "onnx"

Each step trades a little accuracy for latency; ``bench/compression.py`` measures both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F  # noqa: N812 (the universal torch alias)
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import Tensor

from mlsd.models.ranking.base import (
    FeatureSchema,
    RankingData,
)
from mlsd.models.ranking.deep import (
    RANKER_JSON,
    DeepRanker,
    DeepRankerConfig,
    NetworkRanker,
    multitask_loss,
)

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("dense", "sparse")
OUTPUT_NAME = "logits"


def distill(
    teacher: DeepRanker,
    train: RankingData,
    valid: RankingData | None = None,
    *,
    student_config: DeepRankerConfig,
    temperature: float = 2.0,
    alpha: float = 0.5,
    progress: bool = False,
) -> DeepRanker:
    """Train a smaller :class:`DeepRanker` on the labels and on the teacher's soft scores.

    Per batch, ``loss = alpha * task_loss(labels) + (1 - alpha) * T² * mean over shared heads
    of BCE(student_logit / T, sigmoid(teacher_logit / T))``. A temperature ``T > 1`` softens
    both sides so the student learns the teacher's ranking among confident candidates too; the
    ``T²`` (Hinton et al., 2015) keeps the soft term's gradient from shrinking as ``1 / T²``.

    Args:
        teacher: a fitted ranker over the same feature columns.
        train: the student's training rows (the teacher scores them once, up front).
        valid: early stopping on the labels, as in :meth:`DeepRanker.fit`.
        student_config: typically fewer and narrower layers than the teacher's.
        temperature: ``T`` > 0.
        alpha: weight of the label loss in [0, 1]; 0 = learn from the teacher only.

    Returns:
        The fitted student.
    """
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"distill: need temperature > 0 and alpha in [0, 1], got {temperature} and {alpha}"
        )
    teacher_logits = torch.from_numpy(teacher.predict_logits(train.features))
    teacher_heads, student_names = teacher.config.task_names, student_config.task_names
    shared = [name for name in student_names if name in teacher_heads]  # always has "click"
    student_heads = torch.tensor([student_names.index(name) for name in shared])
    teacher_columns = [teacher_heads.index(name) for name in shared]
    soft_targets = torch.sigmoid(teacher_logits[:, teacher_columns] / temperature)

    def loss_fn(logits: Tensor, targets: Tensor, rows: Tensor) -> Tensor:
        hard = multitask_loss(logits, targets, student_config)
        soft = F.binary_cross_entropy_with_logits(
            logits[:, student_heads] / temperature, soft_targets[rows]
        )
        return alpha * hard + (1.0 - alpha) * temperature**2 * soft

    student = DeepRanker(student_config, progress=progress)
    return student.fit(train, valid, loss_fn=loss_fn)


def export_onnx(ranker: DeepRanker, path: Path, *, opset: int = 17) -> Path:
    """Write the ranker's DCN-v2 as one ONNX file: ``dense`` (batch, n_numeric) float32 and
    ``sparse`` (batch, n_categorical) int64 raw features → ``logits`` (batch, n_tasks).

    The standardisation is in the graph (the model's buffers), so callers feed raw values.
    """
    if not hasattr(ranker, "model_"):
        raise RuntimeError("export_onnx: the DeepRanker is not fitted; fit or load it first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = ranker.schema_
    dense = torch.zeros(2, len(schema.numeric))
    sparse = torch.zeros(2, len(schema.categorical), dtype=torch.int64)
    torch.onnx.export(
        ranker.model_.eval(),
        (dense, sparse),
        path,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=({0: "batch"}, {0: "batch"}),
        external_data=False,  # one self-contained file to ship
        verbose=False,
    )
    return path


def quantize_int8(onnx_path: Path, out_path: Path, *, per_channel: bool = True) -> Path:
    """Dynamic int8 quantisation: int8 weights (per output channel), activations quantised
    on the fly per batch, so no calibration data is needed.

    The exporter writes ``nn.Linear`` as ``Gemm``, which onnxruntime's dynamic quantiser skips;
    each ``Gemm`` is first rewritten as ``MatMul`` + ``Add`` so the weights are quantised.

    The activations' scale is each call's whole input, so a row's int8 score depends on the
    rows scored with it (on a small test model: up to 0.09 in logit between a row alone and
    in a batch of 200, about int8's whole error against fp32). Score a request's candidates
    together, as serving would, when comparing int8 with fp32.
    """
    model = _gemm_to_matmul(onnx.load(str(onnx_path)))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(model, out_path, weight_type=QuantType.QInt8, per_channel=per_channel)
    return out_path


def _gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each plain ``Gemm`` (``A @ B(ᵀ) + C`` with a constant ``B``) by MatMul + Add."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes, replaced = [], set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA")
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        matrix = numpy_helper.to_array(weights[node.input[1]])
        matrix = np.ascontiguousarray(matrix.T if attrs.get("transB") else matrix)
        weight = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(matrix, weight))
        replaced.add(node.input[1])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        # Named: the quantiser derives the names of the nodes it adds from these.
        nodes.append(
            helper.make_node("MatMul", [node.input[0], weight], [product], f"{node.name}_mm")
        )
        if bias:
            nodes.append(
                helper.make_node("Add", [product, bias], [node.output[0]], f"{node.name}_add")
            )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    dead = [init for init in graph.initializer if init.name in replaced - used]
    for init in dead:  # the untransposed copies would double the file
        graph.initializer.remove(init)
    return model


class OnnxRanker(NetworkRanker):
    """A serving-only ``Ranker``: scores with onnxruntime from an exported (maybe int8) model.

    Args:
        onnx_path: a file written by :func:`export_onnx` or :func:`quantize_int8`.
        schema: the columns the model reads (the DeepRanker's ``schema_``).
        tasks: head names in output order (``config.task_names``); head 0 is the click.
        threads: onnxruntime intra-op threads (1 keeps per-request latency predictable when
            many requests run side by side).
    """

    name = "onnx"

    def __init__(
        self,
        onnx_path: Path,
        schema: FeatureSchema,
        tasks: Sequence[str] = ("click",),
        *,
        threads: int = 1,
    ) -> None:
        self.onnx_path = Path(onnx_path)
        self.schema_ = schema
        self.tasks = tuple(tasks)
        self.threads = threads
        self.model_bytes_ = self.onnx_path.read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session_ = ort.InferenceSession(
            self.model_bytes_, options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self.session_.get_inputs()}

    @classmethod
    def from_deep(cls, ranker: DeepRanker, onnx_path: Path, *, threads: int = 1) -> OnnxRanker:
        """The scorer of ``ranker`` exported to ``onnx_path``."""
        return cls(onnx_path, ranker.schema_, ranker.config.task_names, threads=threads)

    def fit(self, train: RankingData, valid: RankingData | None = None) -> Self:
        raise NotImplementedError(
            "OnnxRanker only serves: fit a DeepRanker, then export_onnx (and quantize_int8) it"
        )

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks

    def array_logits(
        self, dense: npt.NDArray[np.float32], sparse: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        feeds = {"dense": dense, "sparse": sparse}
        (logits,) = self.session_.run(
            [OUTPUT_NAME], {k: v for k, v in feeds.items() if k in self._inputs}
        )
        return np.asarray(logits, dtype=np.float32)

    def save(self, path: Path) -> None:
        """Write ``model.onnx`` and ``ranker.json`` (kind "onnx", schema, heads, threads)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / ONNX_FILE).write_bytes(self.model_bytes_)
        meta = {
            "kind": self.name,
            "schema": self.schema_.to_dict(),
            "tasks": list(self.tasks),
            "threads": self.threads,
        }
        (path / RANKER_JSON).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read ``model.onnx`` and the ``ranker.json`` beside it: one written by :meth:`save`,
        or a :class:`DeepRanker`'s (kind "deep") with ``export_onnx(ranker, path/"model.onnx")``."""
        meta_path = Path(path) / RANKER_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a directory written by save")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") not in (cls.name, DeepRanker.name):
            raise ValueError(f"{meta_path}: kind {meta.get('kind')!r} is not 'onnx' or 'deep'")
        onnx_path = Path(path) / ONNX_FILE
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path} not found; write it with export_onnx")
        schema = FeatureSchema.from_dict(meta["schema"])
        return cls(onnx_path, schema, meta["tasks"], threads=int(meta.get("threads", 1)))
