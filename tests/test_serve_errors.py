"""Every error status of `collab-agent serve`, in OpenAI's error JSON, with the parameter named."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from serve_harness import REASONING, free_port, running, scripted_config, scripted_server
from servers import wait_until

from collab_agent.backends.openai import OpenAIBackend
from collab_agent.errors import ConfigError
from collab_agent.serve import ServeConfig, create_app
from collab_agent.testing import ScriptedBackend

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


def _post(server, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", json=body, headers=headers, timeout=30)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "small-only", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
        ({"model": "small-only", "messages": []}, "messages"),
        ({"model": "small-only", "messages": QUESTION, "temperature": 5}, "temperature"),
        ({"model": "small-only", "messages": QUESTION, "n": 2}, "n"),
        ({"model": "small-only", "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION}, "model"),
        (
            {"model": "small-only", "messages": [{"role": "assistant", "content": "hi"}]},
            "messages",
        ),
        (
            {"model": "small-only", "messages": QUESTION, "tool_choice": "get_weather"},
            "tool_choice",
        ),
        (
            {"model": "small-only", "messages": QUESTION, "response_format": {"type": "xml"}},
            "response_format.type",
        ),
    ],
)
def test_invalid_request_is_400_naming_the_parameter(body: dict, param: str) -> None:
    small = ScriptedBackend([], name="small")
    with scripted_server(small=small) as server:
        response = _post(server, body)
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert small.calls == 0  # refused before any model ran


def test_bad_json_is_400() -> None:
    with scripted_server() as server:
        response = httpx.post(
            server.base_url + "/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert _error(response)["type"] == "invalid_request_error"


def test_missing_or_wrong_key_is_401_and_the_right_key_passes() -> None:
    keys = frozenset({"sk-right-one", "sk-right-two"})
    with scripted_server(api_keys=keys) as server:
        missing = _post(server, {"model": "small-only", "messages": QUESTION})
        wrong = _post(
            server,
            {"model": "small-only", "messages": QUESTION},
            authorization="Bearer sk-wrong",
        )
        models = httpx.get(server.base_url + "/models")
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-right-two", max_retries=0)
        reply = client.chat.completions.create(model="small-only", messages=QUESTION)
    assert missing.status_code == wrong.status_code == models.status_code == 401
    assert _error(wrong)["code"] == "invalid_api_key"
    assert "sk-wrong" not in wrong.text
    assert reply.choices[0].message.content == "4"


def test_no_keys_is_refused_off_loopback() -> None:
    with pytest.raises(ConfigError, match="without API keys"):
        scripted_config(host="0.0.0.0")
    ServeConfig(policies=scripted_config().policies, host="0.0.0.0", api_keys=frozenset({"k"}))


def test_unknown_model_is_404_listing_the_served_ones() -> None:
    with scripted_server() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-5", messages=QUESTION)
    error = caught.value.body
    assert error["param"] == "model"
    assert error["code"] == "model_not_found"
    assert "small-only" in error["message"]


def test_body_over_the_limit_is_413() -> None:
    with scripted_server(max_body_bytes=2000) as server:
        big = [{"role": "user", "content": "x" * 5000}]
        response = _post(server, {"model": "small-only", "messages": big})
    assert response.status_code == 413
    assert _error(response)["code"] == "too_large"


def test_full_server_is_429_with_retry_after_and_frees_the_slot() -> None:
    small = ScriptedBackend(REASONING * 10, name="small", delay=0.5)
    with scripted_server(small=small, max_in_flight=1, max_queued=0, retry_after_s=3) as server:
        first: dict = {}
        thread = threading.Thread(
            target=lambda: first.update(
                r=_post(server, {"model": "small-only", "messages": QUESTION})
            )
        )
        thread.start()
        assert wait_until(lambda: server.admission.in_flight == 1)
        refused = _post(server, {"model": "small-only", "messages": QUESTION})
        thread.join(30)
        after = _post(server, {"model": "small-only", "messages": QUESTION})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"
    assert _error(refused)["type"] == "rate_limit_error"
    assert first["r"].status_code == 200
    assert after.status_code == 200


def test_per_key_cap_is_429_for_that_key_only() -> None:
    small = ScriptedBackend(REASONING * 10, name="small", delay=0.5)
    keys = frozenset({"sk-a", "sk-b"})
    with scripted_server(small=small, api_keys=keys, max_per_key=1) as server:
        thread = threading.Thread(
            target=_post,
            args=(server, {"model": "small-only", "messages": QUESTION}),
            kwargs={"authorization": "Bearer sk-a"},
        )
        thread.start()
        assert wait_until(lambda: server.admission.in_flight == 1)
        same_key = _post(
            server, {"model": "small-only", "messages": QUESTION}, authorization="Bearer sk-a"
        )
        other_key = _post(
            server, {"model": "small-only", "messages": QUESTION}, authorization="Bearer sk-b"
        )
        thread.join(30)
    assert same_key.status_code == 429
    assert other_key.status_code == 200


def test_without_keys_only_the_server_caps_hold() -> None:
    small = ScriptedBackend(REASONING * 10, name="small", delay=0.3)
    with scripted_server(small=small, max_per_key=1) as server:
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    _post(server, {"model": "small-only", "messages": QUESTION})
                )
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert [r.status_code for r in results] == [200, 200]


def _down_large() -> OpenAIBackend:
    """A real client of a server that is not there (nothing listens on the port)."""
    return OpenAIBackend(
        "large",
        f"http://127.0.0.1:{free_port()}/v1",
        "k",
        max_retries=0,
        timeout=5,
        mode="chat-prefill",
    )


def test_large_model_down_is_503_when_the_policy_does_not_degrade() -> None:
    with scripted_server(large=_down_large(), on_large_unavailable="fail") as server:
        response = _post(server, {"model": "large-only", "messages": QUESTION})
        health = httpx.get(server.root + "/health", timeout=30)
    assert response.status_code == 503
    assert _error(response)["code"] == "model_unavailable"
    assert health.status_code == 503
    assert health.json()["models"]["large"].startswith("unavailable")


def test_large_model_down_degrades_to_the_small_when_configured() -> None:
    with scripted_server(large=_down_large(), on_large_unavailable="degrade") as server:
        response = _post(server, {"model": "large-only", "messages": QUESTION})
    assert response.status_code == 200
    collab = response.json()["collab"]
    assert collab["degraded_steps"] >= 1
    assert collab["steps"][0]["author"] == "small"


def test_internal_error_is_500_without_a_traceback() -> None:
    broken = ScriptedBackend([], name="small")  # raises on its first call
    with scripted_server(small=broken) as server:
        response = _post(server, {"model": "small-only", "messages": QUESTION})
    assert response.status_code == 500
    error = _error(response)
    assert error["message"] == "internal server error"
    assert "Traceback" not in response.text
    assert ".py" not in response.text


def test_error_mid_stream_ends_the_stream_with_error_json() -> None:
    broken = ScriptedBackend(["Two plus two is four."], name="small")  # no second step
    with scripted_server(small=broken) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="small-only", messages=QUESTION, stream=True)
        with pytest.raises(openai.APIError, match="internal server error"):
            list(stream)


def test_unknown_route_is_404_in_openai_json() -> None:
    with scripted_server() as server:
        response = httpx.get(server.root + "/v1/nothing")
    assert response.status_code == 404
    assert _error(response)["type"] == "not_found"


def test_app_frees_models_on_shutdown() -> None:
    closed: list[str] = []

    class Closing(ScriptedBackend):
        async def aclose(self) -> None:
            closed.append(self.name)

    app = create_app(scripted_config(), Closing([], name="small"), Closing([], name="large"))
    with running(app):
        pass
    assert sorted(closed) == ["large", "small"]
