"""`actprompt admin tenants|keys|backbones` against a real server (uvicorn, real sockets): the walkthrough's
admin steps without curl, scoped keys, and the API's 403 message on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.api.main import create_app
from service.cli import main
from tests.api.conftest import ADMIN_KEY, settings_for
from tests.api.serve import serve_in_thread


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_admin_commands_and_scoped_keys(
    sqlite_url: str,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(sqlite_url, data_root, tmp_path)
    with serve_in_thread(create_app(settings)) as port:
        monkeypatch.setenv("ACTPROMPT_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("ACTPROMPT_ADMIN_KEY", ADMIN_KEY)
        monkeypatch.delenv("ACTPROMPT_API_KEY", raising=False)

        code, key, _ = _run(capsys, "admin", "tenants", "create", "demo", "--key-only")
        assert code == 0 and key.startswith("ap_")
        code, out, _ = _run(capsys, "admin", "tenants", "list", "--json")
        (tenant,) = json.loads(out)
        assert tenant["name"] == "demo"
        code, out, err = _run(
            capsys, "admin", "backbones", "create", "tiny", "--model", "test_resnet", "--weights", "random",
            "--input-size", "32", "32",
        )  # fmt: skip
        assert code == 0 and out.startswith("tiny  test_resnet"), err
        assert "tiny" in _run(capsys, "admin", "backbones", "list")[1]
        assert json.loads(_run(capsys, "admin", "backbones", "get", "tiny", "--json")[1])["input_size"] == [
            32,
            32,
        ]

        code, app_key, _ = _run(
            capsys,
            "admin",
            "keys",
            "create",
            tenant["id"],
            "--name",
            "app",
            "--scope",
            "predict",
            "--key-only",
        )
        assert code == 0 and app_key.startswith("ap_")
        keys = json.loads(_run(capsys, "admin", "keys", "list", tenant["id"], "--json")[1])
        app = next(k for k in keys if k["name"] == "app")
        assert app["scopes"] == ["predict"] and app["revoked_at"] is None

        # the tenant's first key reads; the predict-only key gets the API's 403 message, exit status 1
        monkeypatch.setenv("ACTPROMPT_API_KEY", key)
        assert _run(capsys, "files", "list", "--json")[:2] == (0, "[]")
        code, _, err = _run(capsys, "files", "list", "--api-key", app_key)
        assert code == 1 and err.startswith(
            "error 403 insufficient_scope: this API key lacks the 'read' scope"
        )
        # the tenant key (it holds `admin`) manages its own keys, not through the admin commands' key
        monkeypatch.delenv("ACTPROMPT_ADMIN_KEY")
        assert _run(capsys, "admin", "keys", "revoke", app["id"])[:2] == (0, f"revoked {app['id']}")
        code, _, err = _run(capsys, "admin", "tenants", "list")
        assert code == 1 and err.startswith("error 403 admin_key_required")
        code, _, err = _run(capsys, "files", "list", "--api-key", app_key)
        assert code == 1 and err.startswith("error 401")

        monkeypatch.setenv("ACTPROMPT_ADMIN_KEY", ADMIN_KEY)
        assert _run(capsys, "admin", "backbones", "delete", "tiny")[0] == 0
        assert _run(capsys, "admin", "tenants", "get", tenant["id"])[1].startswith(f"{tenant['id']}  demo")
