"""The demo page: self-contained, and in a real browser it shows a user's history and answer."""

from __future__ import annotations

import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.serving.app import create_app
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.recommender import RecommendRequest
from mlsd.serving.settings import ServiceSettings
from tests.browser import rendered_dom
from tests.serving.test_app import running_server

with warnings.catch_warnings():  # starlette 1.x would rather have httpx2 behind its TestClient
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> PopularRecommender:
    out = tmp_path_factory.mktemp("ui") / "synthetic"
    synthesize(WorldConfig(n_users=200, n_items=100, n_events=10_000, days=10), out, progress=False)
    return PopularRecommender.from_dataset(Path(out), days=5)


class Elements(HTMLParser):
    """Every start tag of a document as ``(tag, attributes)``."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))

    def with_class(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.found if t == tag and cls in a.get("class", "").split()]

    def by_id(self, element_id: str) -> dict[str, str]:
        (attrs,) = [a for _, a in self.found if a.get("id") == element_id]
        return attrs


def test_page_is_self_contained(model: PopularRecommender) -> None:
    app = create_app(lambda: model, settings=ServiceSettings(ui=True))
    with TestClient(app) as client:
        response = client.get("/ui")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for external in ("<script src", "<link", "http://", "https://"):  # no CDN, no build step
        assert external not in page
    assert 'data-state="idle"' in page


@pytest.mark.integration
def test_page_shows_a_users_history_and_recommendations(model: PopularRecommender) -> None:
    user = model.sample_users(3)[1]
    app = create_app(lambda: model, settings=ServiceSettings(ui=True))
    with running_server(app) as base_url:
        dom = Elements(rendered_dom(f"{base_url}/ui?user={user}", budget_ms=8000))
    main = dom.by_id("main")
    assert main["data-state"] == "loaded", main
    assert main["data-count"] == "10"
    assert main["data-user"] == str(user)
    assert main["data-path"] == "fallback:popular"
    expected = model.recommend(RecommendRequest(user, 10))
    rows = dom.with_class("tr", "rec")
    assert [int(r["data-item-id"]) for r in rows] == [r.item_id for r in expected.items]
    history = [int(h["data-item-id"]) for h in dom.with_class("li", "hist")]
    assert history == model.history(user, 20)
    assert history  # a sampled user has history
    stages = {s["data-stage"] for s in dom.with_class("tr", "stage")}
    assert stages == {"popular", "total"}
    examples = [a.get("value") for t, a in dom.found if t == "option" and a.get("value")]
    assert examples == [str(u) for u in model.sample_users(8)]


@pytest.mark.integration
def test_page_shows_an_error_for_a_bad_user_id(model: PopularRecommender) -> None:
    app = create_app(lambda: model, settings=ServiceSettings(ui=True))
    with running_server(app) as base_url:
        dom = Elements(rendered_dom(f"{base_url}/ui?user=not-a-number", budget_ms=8000))
    assert dom.by_id("main")["data-state"] == "error"
    assert dom.with_class("tr", "rec") == []
