"""The API says what it does (fast tier, tiny model): strict bodies, one limit per concept, one error
shape per route family, and an OpenAPI document that declares every status and content type served."""

from __future__ import annotations

import httpx
import pytest

from tests.server.support import GENERATE, serve

GEN = f"/v1/tasks/{GENERATE}/generate"
PREDICT = "/v1/tasks/spam/predict"


@pytest.fixture(scope="module")
def server(tiny_bundle, tiny_server_model):
    """A queue longer than the largest request (256 prompts), so that size limits show alone."""
    with serve(tiny_bundle, tiny_server_model, max_queue=300) as srv:
        yield srv


@pytest.mark.parametrize("path,body,field", [
    (GEN, {"text": "a", "seed": False}, "seed"),
    (GEN, {"text": "a", "stream": "yes"}, "stream"),
    (GEN, {"text": "a", "max_new_tokens": "5"}, "max_new_tokens"),
    (GEN, {"text": "a", "max_new_tokens": 5.0}, "max_new_tokens"),
    (GEN, {"text": "a", "temperature": "0.5"}, "temperature"),
    (GEN, {"text": "a", "top_p": 0}, "top_p"),
    (GEN, {"text": "a", "temperature": 2.5}, "temperature"),
    (GEN, {"text": "a", "seed": -1}, "seed"),
    (GEN, {"text": "a", "stop": ""}, "stop"),
    (GEN, {"text": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (GEN, {"text": "   \n\t"}, "text"),
    (GEN, {"text": ""}, "text"),
    (PREDICT, {"text": []}, "text"),
    (PREDICT, {"text": ""}, "text"),
    (PREDICT, {"text": ["fine", " "]}, "text[1]"),
    (PREDICT, {"text": 5}, "text"),
    (PREDICT, {"txt": "x"}, "text"),
    (GEN, {"text": "a", "max_new_tokens": 10_000}, "max_new_tokens"),
    (PREDICT, {"text": ["x"] * 65}, "text"),
])
def test_task_routes_refuse_with_422_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, (body, r.text)
    error = r.json()
    assert error["field"] == field and error["detail"].startswith(f"{field}:"), error


@pytest.mark.parametrize("body,field", [
    ({"model": GENERATE, "prompt": "a", "seed": True}, "seed"),
    ({"model": GENERATE, "prompt": "a", "stream": "yes"}, "stream"),
    ({"model": GENERATE, "prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"model": GENERATE, "prompt": " "}, "prompt"),
    ({"model": GENERATE, "prompt": []}, "prompt"),
    ({"model": GENERATE, "prompt": "a", "n": 2}, "n"),
    ({"model": GENERATE, "prompt": "a", "logprobs": 1}, "logprobs"),
    ({"model": GENERATE, "prompt": ["x"] * 65, "max_tokens": 1}, "prompt"),
])
def test_completions_refuse_with_openai_errors(client, body, field):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}:") and error["code"] == 422


def test_one_limit_per_concept_and_never_429_for_size(client, server):
    limit = server.app.state.settings.texts_limit
    assert limit == 64
    predict = client.post(PREDICT, json={"text": ["x"] * limit})
    completions = client.post("/v1/completions", json={"model": "spam", "prompt": ["x"] * limit, "max_tokens": 1})
    assert predict.status_code == completions.status_code == 200
    over = client.post("/v1/completions", json={"model": "spam", "prompt": ["x"] * 257, "max_tokens": 1})
    assert over.status_code == 422
    doc = client.get("/openapi.json").json()["components"]["schemas"]
    for name, prop in (("PredictRequest", "text"), ("CompletionRequest", "prompt")):
        arrays = [b for b in doc[name]["properties"][prop]["anyOf"] if b.get("type") == "array"]
        assert arrays[0]["maxItems"] == limit and arrays[0]["minItems"] == 1


def test_small_queue_caps_the_request_size(tiny_bundle, tiny_server_model):
    with serve(tiny_bundle, tiny_server_model, max_queue=3) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post(PREDICT, json={"text": ["a", "b", "c", "d"]})
        assert r.status_code == 422 and "limit of 3" in r.json()["detail"]


def test_error_bodies_share_one_shape(client):
    for r in (client.post("/v1/tasks/nope/predict", json={"text": "x"}),
              client.post(f"/v1/tasks/{GENERATE}/predict", json={"text": "x"}),
              client.post(PREDICT, json={"text": ""})):
        assert set(r.json()) <= {"detail", "field", "errors"} and isinstance(r.json()["detail"], str)
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openapi_declares_statuses_and_content_types(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    for path in ("/v1/tasks/{task}/generate", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
        assert {"404", "413", "422", "429", "500", "503", "504"} <= set(responses)
    assert {"400", "404", "422", "429"} <= set(paths["/v1/tasks/{task}/predict"]["post"]["responses"])
    assert {"401", "403", "409"} <= set(paths["/v1/adapters/{task}"]["put"]["responses"])
    assert "503" in paths["/health"]["get"]["responses"] and "503" in paths["/ready"]["get"]["responses"]
    refs = [response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
            for ops in paths.values() for op in ops.values() for response in op["responses"].values()]
    assert not any(ref.endswith("HTTPValidationError") for ref in refs)  # FastAPI's 422 is not our shape
    with client.stream("POST", GEN, json={"text": "a", "max_new_tokens": 2, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")


def test_stop_strings_and_batches_the_schema_allows_are_served(client):
    assert client.post(GEN, json={"text": "a", "max_new_tokens": 3, "stop": ["x", "yz"]}).status_code == 200
    r = client.post(PREDICT, json={"text": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_every_json_route_declares_its_response_body(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, ops in paths.items():
        for method, op in ops.items():
            content = op["responses"]["200"].get("content", {})
            if path != "/metrics":
                assert content.get("application/json", {}).get("schema"), f"{method.upper()} {path}"


def test_openai_routes_choose_their_own_error_format(client):
    wrong_method = client.get("/v1/completions")  # no route's handler ran: the route class still answers
    assert wrong_method.status_code == 405 and set(wrong_method.json()["error"]) >= {"message", "type"}
    elsewhere = client.get("/v1/tasks/nope")
    assert elsewhere.status_code == 404 and "detail" in elsewhere.json()
    unauthorised = client.put("/v1/adapters/spam")  # admin off: the router's dependency answers
    assert unauthorised.status_code == 403 and "TALORA_ADMIN_TOKEN" in unauthorised.json()["detail"]
