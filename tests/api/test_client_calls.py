"""Every public call of `Client` and `AsyncClient` against the real app (no fake server): what the client
sends is what the server's own schemas accept, for every method, including predict by URL."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from actprompt import AsyncClient, Client, PermissionDeniedError
from PIL import Image

from tests.api.conftest import ADMIN_KEY, Api, make_images, png_bytes
from tests.api.test_files import folder_zip

#: the resources of a client; their public methods, and the client's own, are the calls to cover
RESOURCES = ("files", "jobs", "prompts", "evaluations", "backbones", "tenants", "keys")


def public_calls(client: Any) -> set[str]:
    """`resource.method` for every public method of every resource, and the client's own calls."""
    names = {f"{r}.{m}" for r in RESOURCES for m in dir(getattr(client, r)) if not m.startswith("_")}
    own = {m for m, _ in inspect.getmembers(type(client), inspect.isfunction) if not m.startswith("_")}
    return names | (own - {"close", "aclose"})


@pytest.fixture
def image_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server of one PNG (`/sign.png`); yields (its URL, the file)."""
    folder = tmp_path / "www"
    folder.mkdir()
    image = folder / "sign.png"
    image.write_bytes(png_bytes(make_images(1, seed=3)[0][0]))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/sign.png", image
    server.shutdown()
    server.server_close()


def _runner(kind: str, api: Api) -> tuple[Callable[[str], Any], Callable[[Any], Any], Callable[[], None]]:
    """A factory of clients of `kind` on the app (for an API key), a function that turns a call's result
    into a value, and a closer."""
    if kind == "sync":

        def sync(
            key: str,
        ) -> Client:  # the app's own TestClient (its loop runs background work): one key at a time
            api.client.headers["Authorization"] = f"Bearer {key}"
            return Client(base_url="http://testserver", http_client=api.client)

        return sync, lambda result: list(result) if inspect.isgenerator(result) else result, lambda: None
    loop = asyncio.new_event_loop()
    opened: list[AsyncClient] = []

    def client(key: str) -> AsyncClient:
        transport = httpx.ASGITransport(app=api.client.app)
        headers = {"Authorization": f"Bearer {key}"}
        http = httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers)
        opened.append(AsyncClient(http_client=http))
        return opened[-1]

    async def collect(result: Any) -> Any:
        if inspect.isasyncgen(result):
            return [item async for item in result]
        return await result

    def close() -> None:
        for c in opened:
            loop.run_until_complete(c.aclose())
        loop.close()

    return client, lambda result: loop.run_until_complete(collect(result)), close


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_every_client_call_against_the_app(
    kind: str, make_api: Callable[..., Api], image_dir: tuple[str, Path], tmp_path: Path
) -> None:
    api = make_api(allow_private_urls=True)
    client_for, run, close = _runner(kind, api)
    c = client_for(ADMIN_KEY)
    called: set[str] = set()

    def call(target: str, /, *args: Any, **kwargs: Any) -> Any:
        resource, _, method = target.rpartition(".")
        called.add(target)
        return run(getattr(getattr(c, resource) if resource else c, method)(*args, **kwargs))

    try:
        tenant = call("tenants.create", "calls")
        assert call("tenants.get", tenant.id).name == "calls"
        assert [t.id for t in call("tenants.list")] == [tenant.id]
        key = call("keys.create", tenant.id, name="app", scopes=["predict", "read", "train"])
        assert key.scopes == ["predict", "read", "train"] and key.api_key
        spare = call("keys.create", tenant.id)
        assert spare.scopes == ["admin", "predict", "read", "train"]
        call("keys.revoke", spare.id)
        keys = {k.id: k for k in call("keys.list", tenant.id)}
        assert set(keys) == {tenant.key_id, key.id, spare.id} and keys[spare.id].revoked_at is not None
        tiny = call("backbones.create", "tiny", model="test_resnet", weights="random", input_size=(32, 32))
        assert tiny.input_size == [32, 32]
        assert call("backbones.create", "gone", model="test_resnet", weights="random").id == "gone"
        call("backbones.delete", "gone")

        c = client_for(key.api_key)  # the tenant's key (no `admin` scope) from here on
        assert [b.id for b in call("backbones.list")] == ["tiny"]
        assert call("backbones.get", "tiny").id == "tiny"

        archive = tmp_path / "data.zip"
        archive.write_bytes(folder_zip(4))
        f = call("files.upload", archive)
        assert call("files.get", f.id).sha256 == f.sha256
        assert [x.id for x in call("files.list")] == [f.id]

        job = call("jobs.create", backbone="tiny", dataset=f.id, hyperparameters={"epochs": 1})
        assert call("jobs.get", job.id).id == job.id
        assert [j.id for j in call("jobs.list")] == [job.id]
        done = call("jobs.wait", job.id, poll=0.1)
        assert done.status == "succeeded" and done.prompt, done
        logged = call("jobs.events", job.id)
        watched = call("jobs.watch", job.id)
        assert watched[-1].type == "end" and [e.id for e in watched[:-1]] == [e.id for e in logged]

        ref = done.prompt
        assert [p.ref for p in call("prompts.list")] == [ref]
        assert call("prompts.get", ref).ref == ref
        assert call("prompts.download", ref, tmp_path / "p.safetensors").stat().st_size > 0
        # a LoRA prompt out as a PEFT adapter, and back in as a prompt of its own
        options = {"lora_rank": 2}
        lora_job = call("jobs.create", backbone="tiny", dataset=f.id, method="lora", method_options=options)
        lora_ref = run(c.jobs.wait(lora_job.id, poll=0.1)).prompt
        adapter = call("prompts.download", lora_ref, tmp_path / "adapter.zip", format="peft")
        imported = call("prompts.import_adapter", adapter, backbone="tiny", classes=["a", "b", "c"])
        assert imported.method == "lora" and imported.classes == ["a", "b", "c"] and imported.ref != lora_ref
        for other in (lora_ref, imported.ref):
            run(c.prompts.delete(other))

        url, image = image_dir
        rows = call(
            "predict", prompt=ref, images=[url, image, image.read_bytes(), Image.open(image)], top_k=2
        )
        probabilities = np.array([[p.probability for p in row] for row in rows])
        np.testing.assert_allclose(probabilities, probabilities[[0, 0, 0, 0]], atol=1e-6)  # one image, 4 ways
        assert len({tuple(p.label for p in row) for row in rows}) == 1

        ev = call("evaluations.create", prompt=ref, dataset=f.id)
        assert call("evaluations.get", ev.id).id == ev.id
        assert [e.id for e in call("evaluations.list")] == [ev.id]
        finished = call("evaluations.wait", ev.id, poll=0.1)
        assert finished.status == "succeeded", finished.error

        busy = call("jobs.create", backbone="tiny", dataset=f.id, hyperparameters={"epochs": 50})
        assert call("jobs.cancel", busy.id).status in ("cancelled", "cancelling")
        call("jobs.wait", busy.id, poll=0.1)
        call("prompts.delete", ref)
        assert call("prompts.list") == []
        call("files.delete", f.id)
        assert call("files.list") == []

        with pytest.raises(PermissionDeniedError) as denied:  # the API's 403, typed, with its message
            run(c.keys.list(tenant.id))
        assert denied.value.code == "insufficient_scope" and "'admin'" in denied.value.message
        assert called == public_calls(c), f"calls not exercised: {public_calls(c) - called}"
    finally:
        close()
