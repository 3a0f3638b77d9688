from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

from mlsd.models.compression import OnnxRanker, distill, export_onnx, quantize_int8
from mlsd.models.ranking.base import FeatureSchema, RankingData
from mlsd.models.ranking.deep import DeepRanker, DeepRankerConfig, NetworkRanker
from tests.models.ranking.contract import contract_data, synthetic_ranking_data

FAST = DeepRankerConfig(
    embedding_dim=8, n_cross_layers=2, mlp_dims=(32,), dropout=0.0, lr=3e-3, batch_size=256
)


@pytest.fixture(scope="module")
def ranker() -> DeepRanker:
    data = contract_data()
    return DeepRanker(FAST, progress=False).fit(data.train, data.valid)


@pytest.fixture(scope="module")
def exported(ranker: DeepRanker, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(ranker, folder / "model.fp32.onnx")
    return fp32, quantize_int8(fp32, folder / "model.int8.onnx")


def test_onnx_fp32_matches_torch(ranker: DeepRanker, exported: tuple[Path, Path]) -> None:
    scorer = OnnxRanker.from_deep(ranker, exported[0])
    features = contract_data().test.features
    np.testing.assert_allclose(
        scorer.predict_logits(features), ranker.predict_logits(features), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(scorer.predict(features), ranker.predict(features), atol=1e-6)
    # The batch axis is dynamic: one row and an odd-sized batch score the same.
    np.testing.assert_allclose(
        scorer.predict(features.iloc[[4]]), ranker.predict(features.iloc[[4]]), atol=1e-6
    )
    assert scorer.predict(features.iloc[:37]).shape == (37,)


def test_int8_quantises_the_weights_and_keeps_the_order(
    ranker: DeepRanker, exported: tuple[Path, Path]
) -> None:
    fp32_path, int8_path = exported
    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert "MatMulInteger" in ops
    assert "Gemm" not in ops  # every dense layer was rewritten and quantised
    features = contract_data().test.features
    fp32 = OnnxRanker.from_deep(ranker, fp32_path).predict(features)
    int8 = OnnxRanker.from_deep(ranker, int8_path).predict(features)
    assert spearmanr(fp32, int8).statistic > 0.99
    assert pearsonr(fp32, int8).statistic > 0.99
    assert not np.array_equal(fp32, int8)


def test_onnx_ranker_save_load_and_registry_kind(
    ranker: DeepRanker, exported: tuple[Path, Path], tmp_path: Path
) -> None:
    scorer = OnnxRanker.from_deep(ranker, exported[1], threads=2)
    scorer.save(tmp_path / "served")
    meta = json.loads((tmp_path / "served" / "ranker.json").read_text())
    assert meta["kind"] == "onnx"
    loaded = OnnxRanker.load(tmp_path / "served")
    assert loaded.threads == 2
    features = contract_data().test.features
    np.testing.assert_array_equal(loaded.predict(features), scorer.predict(features))
    # A saved DeepRanker directory with model.onnx beside it loads too.
    ranker.save(tmp_path / "deep")
    export_onnx(ranker, tmp_path / "deep" / "model.onnx")
    beside = OnnxRanker.load(tmp_path / "deep")
    np.testing.assert_allclose(beside.predict(features), ranker.predict(features), atol=1e-6)


def test_onnx_ranker_serves_only_and_names_bad_columns(
    ranker: DeepRanker, exported: tuple[Path, Path]
) -> None:
    scorer = OnnxRanker.from_deep(ranker, exported[0])
    data = contract_data()
    with pytest.raises(NotImplementedError, match="export_onnx"):
        scorer.fit(data.train)
    with pytest.raises(ValueError, match="x2"):
        scorer.predict(data.test.features.drop(columns=["x2"]))
    bad = data.test.features.copy()
    bad.loc[3, "cat"] = 99
    with pytest.raises(ValueError, match="cat"):
        scorer.predict(bad)


@pytest.mark.parametrize("which", ["torch", "onnx-fp32", "onnx-int8"])
def test_the_request_block_scores_without_a_dataframe(
    ranker: DeepRanker, exported: tuple[Path, Path], which: str
) -> None:
    # The request path hands the ranker its float block: in the ranker's column order it is
    # scored as it is (building the DataFrame costs about as much as the student at 500 rows);
    # in another order the frame reorders it. The scores are predict's either way.
    scorer: NetworkRanker = {
        "torch": ranker,
        "onnx-fp32": OnnxRanker.from_deep(ranker, exported[0]),
        "onnx-int8": OnnxRanker.from_deep(ranker, exported[1]),
    }[which]
    features = contract_data().test.features
    schema = scorer.schema_
    expected = scorer.predict(features)
    with mock.patch.object(FeatureSchema, "frame", side_effect=AssertionError("frame built")):
        np.testing.assert_array_equal(
            scorer.predict_matrix(schema.matrix(features), schema), expected
        )
    flipped = FeatureSchema(
        tuple(reversed(schema.numeric)), schema.categorical, schema.cardinalities
    )
    np.testing.assert_array_equal(
        scorer.predict_matrix(flipped.matrix(features), flipped), expected
    )
    matrix = schema.matrix(features)
    matrix[4, schema.columns.index("cat")] = 2.5
    with pytest.raises(ValueError, match="column 'cat' row 4"):
        scorer.predict_matrix(matrix, schema)
    matrix = schema.matrix(features)
    matrix[2, schema.columns.index("x1")] = 1e39  # finite in float64, not in float32
    with pytest.raises(ValueError, match="float32"):
        scorer.predict_matrix(matrix, schema)


def test_multitask_model_without_categoricals_exports(tmp_path: Path) -> None:
    data = contract_data()
    schema = FeatureSchema(numeric=("x1", "x2", "x3"))

    def numeric_only(part: RankingData) -> RankingData:
        rating = 1.0 / (1.0 + np.exp(-part.features["x3"].to_numpy()))
        labels = {**part.labels, "rating": rating}
        return RankingData(part.features, labels, part.groups, schema)

    config = dataclasses.replace(FAST, tasks={"click": 1.0, "rating": 1.0}, max_epochs=3)
    ranker = DeepRanker(config, progress=False).fit(numeric_only(data.train))
    scorer = OnnxRanker.from_deep(ranker, export_onnx(ranker, tmp_path / "m.onnx"))
    expected, got = (
        ranker.predict_tasks(data.test.features),
        scorer.predict_tasks(data.test.features),
    )
    assert list(got) == ["click", "rating"]
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6)


@pytest.fixture(scope="module")
def distillation_data() -> tuple[RankingData, RankingData, RankingData]:
    data = synthetic_ranking_data(n_groups=500, seed=7)
    rows = np.arange(len(data.groups))
    cut_valid, cut_test = 350 * 20, 425 * 20
    return (
        data.take(rows[:cut_valid]),
        data.take(rows[cut_valid:cut_test]),
        data.take(rows[cut_test:]),
    )


@pytest.fixture(scope="module")
def teacher(distillation_data: tuple[RankingData, RankingData, RankingData]) -> DeepRanker:
    train, valid, _ = distillation_data
    config = DeepRankerConfig(n_cross_layers=3, mlp_dims=(256, 128), batch_size=512, max_epochs=15)
    return DeepRanker(config, progress=False).fit(train, valid)


STUDENT = DeepRankerConfig(
    embedding_dim=8, n_cross_layers=1, mlp_dims=(64,), batch_size=512, max_epochs=15, lr=3e-3
)


def test_distilled_student_keeps_the_teachers_auc(
    teacher: DeepRanker, distillation_data: tuple[RankingData, RankingData, RankingData]
) -> None:
    train, valid, test = distillation_data
    student = distill(teacher, train, valid, student_config=STUDENT, temperature=2.0, alpha=0.5)
    assert student.config == STUDENT
    teacher_auc = roc_auc_score(test.label, teacher.predict(test.features))
    student_auc = roc_auc_score(test.label, student.predict(test.features))
    assert teacher_auc > 0.8
    assert student_auc >= 0.97 * teacher_auc


def test_without_labels_the_student_imitates_the_teacher(
    teacher: DeepRanker, distillation_data: tuple[RankingData, RankingData, RankingData]
) -> None:
    train, _, test = distillation_data
    # alpha=0: the labels carry no weight, so everything the student knows is the teacher's.
    student = distill(teacher, train, student_config=STUDENT, temperature=1.0, alpha=0.0)
    agreement = spearmanr(student.predict(test.features), teacher.predict(test.features))
    assert agreement.statistic > 0.95


def test_distill_rejects_bad_options(
    teacher: DeepRanker, distillation_data: tuple[RankingData, RankingData, RankingData]
) -> None:
    with pytest.raises(ValueError, match="temperature"):
        distill(teacher, distillation_data[0], student_config=STUDENT, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distill(teacher, distillation_data[0], student_config=STUDENT, alpha=1.5)
