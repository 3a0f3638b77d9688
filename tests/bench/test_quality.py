"""bench/quality.py's student retention over (teacher, student) seed pairs."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.evaluation.offline import OfflineReport, evaluate_pipeline
from mlsd.evaluation.pipeline import PipelineConfig
from mlsd.evaluation.retrieval import ProtocolConfig
from mlsd.models.compression import OnnxRanker
from mlsd.models.ranking.deep import DeepRanker, DeepRankerConfig
from mlsd.models.retrieval.popularity import PopularityRetriever

quality = importlib.import_module("bench.quality")  # bench/ is scripts, not a package

Derived = dict[str, Any]
TEACHER = DeepRankerConfig(n_cross_layers=1, mlp_dims=(16,), embedding_dim=4, max_epochs=2)


@pytest.fixture(scope="module")
def derived_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[OfflineReport, Derived]:
    out = tmp_path_factory.mktemp("quality")
    synthesize(
        WorldConfig(n_users=300, n_items=100, n_events=20_000, days=30, seed=3),
        out / "world",
        progress=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality, "STUDENT_SHAPE", {"n_cross_layers": 1, "mlp_dims": (8,)})
        derived = {
            quality.STUDENT: quality.Student(out / "student"),
            **quality.seed_pairs(out / "student", 3),
        }
        report = evaluate_pipeline(
            out / "world",
            {"popularity": PopularityRetriever},
            {"deep": lambda: DeepRanker(TEACHER, progress=False)},
            protocol=ProtocolConfig(n_bootstrap=20),
            pipeline=PipelineConfig(
                n_candidates=50,
                ks=(10,),
                ranker="deep",
                ranker_windows=1,
                baselines=("popularity",),
            ),
            derived=derived,
        )
    return report, derived


def test_each_pair_is_a_reseeded_teacher_and_its_own_int8_student(
    derived_report: tuple[OfflineReport, Derived],
) -> None:
    _, derived = derived_report
    assert list(derived) == [
        quality.STUDENT,
        "deep-seed1",
        f"{quality.STUDENT}-seed1",
        "deep-seed2",
        f"{quality.STUDENT}-seed2",
    ]
    teacher = derived[quality.STUDENT].kept["teacher"]
    reseeded = derived[f"{quality.STUDENT}-seed2"].kept["teacher"]
    assert teacher.config.seed == 0
    assert reseeded.config.seed == 2
    assert reseeded.config.mlp_dims == TEACHER.mlp_dims  # the teacher's shape, refitted
    rows = derived[quality.STUDENT].kept["rows"]
    assert not np.allclose(teacher.predict(rows), reseeded.predict(rows))
    student = derived[f"{quality.STUDENT}-seed2"].kept["student"]
    assert isinstance(student, OnnxRanker)
    assert student.onnx_path.name == "student.int8.onnx"
    assert student.onnx_path.parent.name == "student-seed2"  # its own files, none overwritten


def test_retention_over_seeds_reads_each_pairs_test_ndcg(
    derived_report: tuple[OfflineReport, Derived],
) -> None:
    report, _ = derived_report
    ndcg = {
        m.name: m.metrics["all"]["ndcg@10"].mean  # type: ignore[union-attr]
        for m in report.methods
    }
    result = quality.retention_over_seeds(report, 3)
    assert result["seeds"] == [0, 1, 2]
    assert result["teacher_ndcg@10"] == [
        ndcg["ranker deep"],
        ndcg["ranker deep-seed1"],
        ndcg["ranker deep-seed2"],
    ]
    assert result["student_int8_ndcg@10"][2] == ndcg[f"ranker {quality.STUDENT}-seed2"]
    assert result["retention"] == pytest.approx(
        np.mean(result["student_int8_ndcg@10"]) / np.mean(result["teacher_ndcg@10"])
    )
    one = quality.retention_over_seeds(report, 1)  # the pipeline's pair alone
    assert one["retention"] == pytest.approx(
        ndcg[f"ranker {quality.STUDENT}"] / ndcg["ranker deep"]
    )
