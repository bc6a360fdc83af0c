"""The web console end to end in headless Chromium, against a real `actprompt serve` subprocess.

Real ResNet-20 weights and GTSRB images; every page is screenshotted under test-artifacts/console/
(gitignored) so a person can look at what the browser drew. The browser may reach only the server: any
other request (a CDN, a font) fails the test, which is how "works offline" is checked for /console and
/docs alike.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright import sync_api as playwright_api

from tests.api.conftest import png_bytes
from tests.api.serve import run_server
from tests.api.test_e2e_client import gtsrb_zip
from tests.conftest import DATA_DIR, REPO_ROOT, WEIGHTS_DIR

CHROMIUM = os.environ.get("ACTPROMPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "console"
GTSRB = DATA_DIR / "gtsrb32.npz"
RESNET20 = WEIGHTS_DIR / "resnet20-12fca82f.th"
#: Long enough for a small CPU training job; the assertions are about states, never about time.
JOB_TIMEOUT_MS = 400_000


@dataclass
class Server:
    url: str
    admin_key: str
    data_root: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console")
    with run_server(tmp, ACTPROMPT_PROGRESS_EVENT_SECONDS="0.2") as (url, admin_key, data_root):
        printed = (tmp / "serve.log").read_text()
        assert f"{url}/console" in printed, "`actprompt serve` must print the console URL"
        yield Server(url, admin_key, data_root)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: object, server: Server) -> Iterator[playwright_api.Page]:
    """A fresh tab (own sessionStorage) that may reach only the server; JS errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    offsite: list[str] = []

    def guard(route: playwright_api.Route) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            offsite.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    pg = context.new_page()
    js_errors: list[str] = []
    pg.on("pageerror", lambda exc: js_errors.append(str(exc)))
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()
    assert not offsite, f"the page tried to reach other hosts (it must work offline): {offsite}"
    assert not js_errors, f"uncaught errors in the page: {js_errors}"


def shot(pg: playwright_api.Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(pg: playwright_api.Page, server: Server, key: str) -> None:
    pg.goto(f"{server.url}/console")
    pg.get_by_test_id("api-key-input").fill(key)
    pg.get_by_test_id("sign-in").click()


def assert_log_is_the_jobs_events(pg: playwright_api.Page, url: str, job_id: str, t: dict[str, str]) -> None:
    """The event log lists exactly the job's events, in order (no keep-alive or other blank entries)."""
    events = httpx.get(f"{url}/v1/jobs/{job_id}/events?limit=1000", headers=t).json()["data"]
    count = "document.querySelectorAll('[data-testid=event-log] li').length"
    pg.wait_for_function(f"n => {count} >= n", arg=len(events))  # the stream may trail the status by a poll
    shown = pg.get_by_test_id("event-log").locator("li")
    assert [li.get_attribute("data-type") for li in shown.all()] == [e["type"] for e in events]


def wait_for_final(pg: playwright_api.Page) -> str:
    """The job page's status once final (the page updates itself from the SSE stream; no reload)."""
    status = "document.querySelector('h1 [data-testid=job-status]')?.dataset.status"
    final = f"() => ['succeeded', 'failed', 'cancelled'].includes({status})"
    pg.wait_for_function(final, timeout=JOB_TIMEOUT_MS)
    return str(pg.locator("h1 [data-testid=job-status]").get_attribute("data-status"))


def submit_and_wait(pg: playwright_api.Page) -> str:
    """Submit the new-job form, follow to the job's page and wait until the job succeeds; its id."""
    pg.get_by_test_id("submit-job").click()
    pg.wait_for_url(re.compile(r".*#/jobs/job_.+"))
    job_id = pg.url.rsplit("/", 1)[-1]
    assert wait_for_final(pg) == "succeeded", pg.get_by_test_id("event-log").inner_text()
    return job_id


def test_wrong_key_shows_the_apis_message(page: playwright_api.Page, server: Server) -> None:
    r = httpx.get(f"{server.url}/v1/backbones", headers={"Authorization": "Bearer ap_wrong_key"})
    assert r.status_code == 401
    expected = r.json()["error"]["message"]
    sign_in(page, server, "ap_wrong_key")
    message = page.get_by_test_id("error-message")
    message.wait_for()
    assert message.inner_text() == expected
    assert page.get_by_test_id("api-key-input").get_attribute("aria-invalid") == "true"
    assert page.get_by_test_id("job-row").count() == 0  # still on the sign-in form
    shot(page, "00-sign-in-wrong-key")


def test_docs_render_offline(page: playwright_api.Page, server: Server) -> None:
    html = httpx.get(f"{server.url}/docs").text
    assert "cdn" not in html.lower() and "https://" not in html
    page.goto(f"{server.url}/docs")
    title = page.locator(".swagger-ui .info .title")
    title.wait_for()
    assert "actprompt" in title.inner_text()
    page.locator(".opblock-tag", has_text="jobs").first.wait_for()  # the operations were rendered
    shot(page, "09-docs-offline")


@pytest.mark.slow
def test_console_admin_train_watch_and_playground(page: playwright_api.Page, server: Server) -> None:
    assert GTSRB.is_file() and RESNET20.is_file()
    # 5 GTSRB classes as PNG class folders in a zip: uploaded by the first job, a file:// URI for the second
    dataset = gtsrb_zip(server.data_root / "gtsrb5.zip", num_classes=5, train_per_class=150)

    # --- admin: a tenant (its key shown once) and a backbone, through the admin view -----------------
    sign_in(page, server, server.admin_key)
    page.get_by_role("heading", name="Admin").wait_for()
    page.get_by_label("New tenant").fill("console-e2e")
    page.get_by_role("button", name="Create").click()
    tenant_key = page.get_by_test_id("new-secret").locator("code").inner_text()
    page.get_by_test_id("tenant-row").filter(has_text="console-e2e").wait_for()
    page.get_by_label("Id", exact=True).fill("resnet20")
    page.get_by_label("timm model").fill("resnet20_cifar")
    page.get_by_label("Weights").fill(RESNET20.as_uri())
    page.get_by_role("button", name="Register").click()
    page.get_by_test_id("backbone-row").filter(has_text="resnet20_cifar").wait_for(timeout=120_000)
    shot(page, "01-admin")
    t = {"Authorization": f"Bearer {tenant_key}"}
    assert httpx.get(f"{server.url}/v1/jobs", headers=t).status_code == 200  # the key shown is a real key

    # --- tenant: a job at a layer picked from the catalog picture ------------------------------------
    page.get_by_test_id("sign-out").click()
    sign_in(page, server, tenant_key)
    page.get_by_test_id("jobs-empty").wait_for()
    shot(page, "02-jobs-empty")
    page.get_by_test_id("new-job").click()
    catalog = httpx.get(f"{server.url}/v1/backbones/resnet20", headers=t).json()
    options = page.get_by_test_id("layer-option")
    options.first.wait_for()
    assert options.count() == len(catalog["layers"]) + 1  # every layer, plus `auto`
    recommended = page.locator("[data-testid=layer-option].recommended")
    assert recommended.get_attribute("data-value") == str(catalog["recommended_layer"])
    assert recommended.locator("input").is_checked()
    picked = next(layer for layer in catalog["layers"] if layer["index"] == catalog["recommended_layer"] - 2)
    page.locator(f"[data-testid=layer-option][data-value='{picked['index']}']").click()
    page.get_by_test_id("dataset-file").set_input_files(str(dataset))
    page.get_by_test_id("epochs").fill("4")
    page.get_by_test_id("learning-rate").fill("0.05")
    shot(page, "03-new-job")

    # --- the job page: live curves until it succeeds --------------------------------------------------
    job_id = submit_and_wait(page)
    job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=t).json()
    stored = httpx.get(f"{server.url}/v1/files/{job['dataset_uri']}", headers=t).json()  # uploaded, not a URI
    assert stored["bytes"] == dataset.stat().st_size and stored["filename"] == dataset.name
    assert job["resolved_layers"] == [picked["index"]]  # the layer clicked in the picture is the one trained
    # The stream may trail the status (which also arrives by polling): wait for every event first.
    assert_log_is_the_jobs_events(page, server.url, job_id, t)
    playwright_api.expect(page.get_by_test_id("event-log").locator("li[data-type=epoch]")).to_have_count(4)
    curve = page.get_by_test_id("job-curve")
    assert int(curve.get_attribute("data-points") or 0) >= 4  # at least one point per epoch
    assert curve.locator("path.line").count() >= 1
    assert page.get_by_test_id("job-prompt").inner_text() == job["prompt"]
    assert "num classes" in page.get_by_test_id("validation-report").inner_text()
    shot(page, "04-job-succeeded")

    # --- a second job, layer `auto`: the sweep is drawn as a bar chart --------------------------------
    page.goto(f"{server.url}/console#/new")
    page.locator("[data-testid=layer-option][data-value='auto']").click()
    page.get_by_test_id("dataset-uri").fill(dataset.as_uri())
    page.get_by_test_id("epochs").fill("1")
    auto_id = submit_and_wait(page)
    assert auto_id != job_id
    auto_job = httpx.get(f"{server.url}/v1/jobs/{auto_id}", headers=t).json()
    sweep = page.get_by_test_id("layer-sweep")
    assert int(sweep.get_attribute("data-bars") or 0) >= 2
    assert page.locator("[data-testid=layer-sweep] rect.best").count() == 1
    assert auto_job["resolved_layers"] and len(auto_job["resolved_layers"]) == 1
    assert_log_is_the_jobs_events(page, server.url, auto_id, t)
    shot(page, "05-job-auto-sweep")

    # --- the list shows both, with test accuracy ---------------------------------------------------------
    page.goto(f"{server.url}/console#/jobs")
    rows = page.get_by_test_id("job-row")
    rows.nth(1).wait_for()
    assert rows.count() == 2
    first = page.locator(f"[data-testid=job-row][data-job-id='{job_id}']")
    assert first.get_by_test_id("job-status").inner_text() == "succeeded"
    expected_acc = f"{100 * job['metrics']['test']['top1']:.1f} %"
    assert first.get_by_test_id("job-test-accuracy").inner_text() == expected_acc
    shot(page, "06-jobs")

    page.goto(f"{server.url}/console#/prompts")
    page.get_by_test_id("prompt-row").nth(1).wait_for()
    assert page.get_by_test_id("prompt-row").count() == 2
    shot(page, "07-prompts")

    # --- playground: the same top-1 as POST /v1/predict, for either prompt -------------------------------
    image = server.data_root.parent / "sign.png"
    image.write_bytes(png_bytes(np.load(GTSRB)["x_test"][0]))
    page.goto(f"{server.url}/console#/playground?a={job['prompt']}&b={auto_job['prompt']}")
    page.get_by_test_id("playground-image").set_input_files(str(image))
    rows = page.get_by_test_id("prediction-row")
    rows.first.wait_for()
    for which, prompt in (("a", job["prompt"]), ("b", auto_job["prompt"])):
        page.get_by_test_id(f"show-{which}").click()
        api = httpx.post(
            f"{server.url}/v1/predict",
            headers=t,
            json={"prompt": prompt, "images": [base64.b64encode(image.read_bytes()).decode()], "top_k": 5},
        ).json()["predictions"][0]
        page.wait_for_function(
            "n => document.querySelectorAll('[data-testid=prediction-row]').length === n", arg=len(api)
        )
        page.wait_for_function(
            "label => document.querySelector('[data-testid=prediction-row]').dataset.label === label",
            arg=api[0]["label"],
        )
        assert [r.get_attribute("data-label") for r in rows.all()] == [p["label"] for p in api]
        assert api[0]["label"] in httpx.get(f"{server.url}/v1/prompts/{prompt}", headers=t).json()["classes"]
        shot(page, f"08-playground-{which}")

    # --- an API error on a page is the API's message, not a blank page -----------------------------------
    page.goto(f"{server.url}/console#/jobs/job_does_not_exist")
    expected = httpx.get(f"{server.url}/v1/jobs/job_does_not_exist", headers=t).json()["error"]["message"]
    assert page.get_by_test_id("error-message").inner_text() == expected
    shot(page, "10-job-not-found")


def test_new_job_form_offers_every_method_and_the_auto_table(
    page: playwright_api.Page, server: Server
) -> None:
    """Every method the API lists is offered with its own options; an `auto` job's candidates table is
    drawn from the job's record, the chosen row marked."""
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    key = httpx.post(f"{server.url}/v1/tenants", json={"name": "console-auto"}, headers=admin).json()[
        "api_key"
    ]
    spec = {"id": "resnet20", "model": "resnet20_cifar", "weights": RESNET20.as_uri()}
    assert httpx.post(f"{server.url}/v1/backbones", json=spec, headers=admin, timeout=120).status_code in (
        201,
        409,
    )
    dataset = gtsrb_zip(server.data_root / "gtsrb4.zip", num_classes=4, train_per_class=60)
    sign_in(page, server, key)
    page.get_by_test_id("new-job").click()
    select = page.get_by_test_id("method-select")
    select.wait_for()
    listed = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]["JobCreate"]
    assert [o.get_attribute("value") for o in select.locator("option").all()] == listed["properties"][
        "method"
    ]["enum"]
    assert page.get_by_test_id("layer-option").first.is_visible()  # activation: the layer picture
    select.select_option("input")
    page.get_by_test_id("option-input_variant").wait_for()
    assert not page.get_by_test_id("layer-option").first.is_visible()
    select.select_option("auto")
    page.get_by_test_id("option-prefer").wait_for()
    assert page.get_by_test_id("option-max_train_seconds").is_visible()
    page.get_by_test_id("dataset-uri").fill(dataset.as_uri())
    page.get_by_test_id("epochs").fill("1")
    shot(page, "08-new-job-auto")
    job_id = submit_and_wait(page)
    t = {"Authorization": f"Bearer {key}"}
    job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=t).json()
    assert job["method"] == "auto" and job["method_options"] == {"prefer": "accuracy"}
    table = job["metrics"]["auto"]["candidates"]
    rows = page.get_by_test_id("method-search-row")
    playwright_api.expect(rows).to_have_count(len(table))
    assert [r.get_attribute("data-method") for r in rows.all()] == [r["method"] for r in table]
    chosen = page.locator("[data-testid=method-search-row][data-chosen=true]")
    assert chosen.count() == 1 and chosen.get_attribute("data-method") == job["metrics"]["auto"]["chosen"]
    shot(page, "09-job-auto-method")


def test_a_key_without_the_scope_sees_the_apis_403(page: playwright_api.Page, server: Server) -> None:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    tenant = httpx.post(f"{server.url}/v1/tenants", json={"name": "console-scopes"}, headers=admin).json()
    created = httpx.post(
        f"{server.url}/v1/tenants/{tenant['id']}/keys", json={"scopes": ["predict"]}, headers=admin
    ).json()
    denied = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {created['api_key']}"})
    assert denied.status_code == 403
    sign_in(page, server, created["api_key"])  # a valid key signs in; its pages show the API's 403
    message = page.get_by_test_id("error-message")
    message.wait_for()
    assert message.inner_text() == denied.json()["error"]["message"]
    page.get_by_test_id("sign-out").wait_for()  # signed in, not sent back to the form
    assert page.get_by_test_id("api-key-input").count() == 0
    shot(page, "00-predict-only-key")
