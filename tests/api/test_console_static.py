"""What the gateway hands the browser for /console and /docs: served locally, complete, nothing off-site.

The browser tests (test_console_browser.py) check behaviour; these check the files themselves quickly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from actprompt.states import TERMINAL_JOB_STATES, EvaluationStatus, JobStatus
from fastapi.testclient import TestClient

from service.api.console import STATIC_DIR
from service.api.main import create_app
from tests.api.conftest import settings_for

#: `import ... from './x.js'` and `import('./x.js')`
IMPORT = re.compile(r"""(?:from|import)\s*\(?\s*['"](\./[^'"]+)['"]""")
TEST_IDS = (
    "api-key-input",
    "sign-in",
    "job-row",
    "job-status",
    "new-job",
    "dataset-file",
    "layer-option",
    "submit-job",
    "job-curve",
    "playground-image",
    "prediction-row",
)


@pytest.fixture
def client(sqlite_url: str, data_root: Path, tmp_path: Path) -> TestClient:
    # No lifespan: these routes serve files and need no database.
    return TestClient(create_app(settings_for(sqlite_url, data_root, tmp_path)))


def test_console_page_and_every_module_it_imports_are_served(client: TestClient) -> None:
    r = client.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    pending = re.findall(r'(?:src|href)="(/console/static/[^"]+)"', r.text)
    assert "/console/static/app.js" in pending
    seen: set[str] = set()
    while pending:
        url = pending.pop()
        if url in seen:
            continue
        seen.add(url)
        asset = client.get(url)
        assert asset.status_code == 200, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"], url  # a module needs a JS MIME type
            base = url.rsplit("/", 1)[0]
            pending += [f"{base}/{name[2:]}" for name in IMPORT.findall(asset.text)]
    on_disk = {f"/console/static/{p.name}" for p in STATIC_DIR.iterdir()}
    generated = {"/console/static/states.js"}
    assert seen == (on_disk | generated) - {"/console/static/index.html"}
    # every file is used, every import exists


def test_console_state_lists_are_the_api_enums(client: TestClient) -> None:
    text = client.get("/console/static/states.js").text
    jobs = json.loads(re.search(r"JOB_STATES = (\[.*?\]);", text)[1])  # type: ignore[index]
    terminal = json.loads(re.search(r"TERMINAL = new Set\((\[.*?\])\);", text)[1])  # type: ignore[index]
    evaluations = json.loads(re.search(r"EVALUATION_STATES = (\[.*?\]);", text)[1])  # type: ignore[index]
    assert jobs == [s.value for s in JobStatus] and set(terminal) == set(TERMINAL_JOB_STATES)
    assert evaluations == [s.value for s in EvaluationStatus]


def test_console_loads_nothing_from_other_hosts_and_has_the_test_ids() -> None:
    text = "\n".join(p.read_text() for p in sorted(STATIC_DIR.iterdir()))
    svg_namespace = "http://www.w3.org/2000/svg"  # an identifier, never fetched
    urls = set(re.findall(r"https?://[\w.-]+[^\s'\"`)]*", text)) - {svg_namespace}
    assert not urls, f"the console must work offline: no absolute URLs ({urls})"
    # API text is inserted as text, never parsed as markup
    assert not re.search(r"(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", text)
    for test_id in TEST_IDS:
        assert f"'{test_id}'" in text, test_id


def test_docs_and_redoc_assets_are_local(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "https://" not in html and "http://" not in html, page
        assets = re.findall(r"""(?:src|href)=['"](/static/docs/[^'"]+)['"]""", html)
        assert assets, html
        for url in assets:
            assert client.get(url).status_code == 200, url
    assert client.get("/openapi.json").json()["info"]["title"] == "actprompt"
