"""The explorer's HTTP API: answers equal the library's, bad requests get one-line JSON 4xx errors, concurrent requests
get the sequential answers, photos only by gallery id, the command checks its arguments first and stops gracefully."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

from hsc_pyg.cli.serve import main  # noqa: E402
from hsc_pyg.engine.retrieval import search_image, search_text  # noqa: E402
from hsc_pyg.serve.app import RequestError  # noqa: E402
from hsc_pyg.viz.explain import explain_pair  # noqa: E402

from served import NAME, explorer_of, live_server, served_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red cube left of a blue ball", "a green cylinder", "a small ball at the top", "a blue cube",
           "the yellow ring right of a red ball", "a cylinder below a cube"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return served_data(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def explorer(data):
    return explorer_of(data)


@pytest.fixture(scope="module")
def url(explorer):
    with live_server(explorer) as base:
        yield base


def get(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict | bytes, str]:
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(body) if kind.startswith("application/json") else body), kind


def q(text: str) -> str:
    return urllib.parse.quote_plus(text)


# ---- good requests ---------------------------------------------------------------------------------------------------
def test_search_answers_what_the_search_command_answers(url, data):
    status, body, _ = get(f"{url}/api/search?q={q(QUERIES[0])}&k=4")
    want = search_text(data["model"], data["gallery"], QUERIES[0], k=4, shortlist=6).to_dict()
    assert status == 200
    assert [h["id"] for h in body["results"]] == [h["id"] for h in want["results"]]
    assert [h["score"] for h in body["results"]] == pytest.approx([h["score"] for h in want["results"]], abs=1e-6)
    assert body["shortlist"] == 6 and body["results"][0]["photo"] == f"/photos/{want['results'][0]['id']}"


def test_captions_answer_what_the_image_search_answers(url, data):
    status, body, _ = get(f"{url}/api/captions?image=photo3.png&k=3")
    want = search_image(data["model"], data["gallery"], 3, k=3, shortlist=6).to_dict()
    assert status == 200 and body["query_id"] == "photo3.png"
    assert [h["text"] for h in body["results"]] == [h["text"] for h in want["results"]]


def test_explanation_is_the_viz_explanation_with_the_photos_captions(url, data):
    status, body, _ = get(f"{url}/api/explain?q={q(QUERIES[1])}&image=2&top_k=4")
    want = explain_pair(data["model"], data["split"], 2, QUERIES[1], top_k=4)
    assert status == 200
    assert body["score"] == pytest.approx(want["score"], abs=1e-6)
    assert body["attention"].keys() == want["attention"].keys()
    for level, attention in want["attention"].items():
        np.testing.assert_allclose(body["attention"][level], attention, rtol=0, atol=1e-7)
    assert [len(r["edges"]) for r in body["relations"]] == [4, 4]
    assert body["photo"] == "/photos/photo2.png" and len(body["captions"]) == 5


def test_page_script_and_photo_are_served(url, data):
    status, page, kind = get(f"{url}/")
    assert status == 200 and kind.startswith("text/html") and b"/static/app.js" in page
    status, script, kind = get(f"{url}/static/app.js")
    assert status == 200 and b"/api/explain" in script
    status, photo, kind = get(f"{url}/photos/photo4.png")
    assert status == 200 and kind == "image/png" and photo == (data["photos"] / "photo4.png").read_bytes()
    assert get(f"{url}/photos/4")[1] == photo          # by row too


# ---- bad requests ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, status, match", [
    ("/api/search", 400, "q is missing"),
    (f"/api/search?q={'a' * 301}", 400, "more than the 300"),
    ("/api/search?q=a+cube&k=0", 400, "k=0 is out of range"),
    ("/api/search?q=a+cube&k=101", 400, "k=101 is out of range"),
    ("/api/search?q=a+cube&k=ten", 400, "not a whole number"),
    ("/api/search?q=a+cube&q=a+ball", 400, "twice"),
    ("/api/search?q=a+cube&path=/etc/passwd", 400, "unknown parameter"),
    ("/api/search?q=qqzx+vvqw", 400, "vocabulary"),
    ("/api/captions?image=99", 404, "out of range"),
    ("/api/captions?image=nope.png", 404, "no image with id"),
    ("/api/explain?q=a+cube", 400, "image is missing"),
    ("/api/explain?q=a+cube&image=1&top_k=51", 400, "top_k=51"),
    ("/api/explain?q=a+cube&image=1&rank=best", 400, "rank='best' is unknown"),
    ("/photos/..%2Foutside.png", 404, "not a route"),
    ("/photos/%2E%2E", 404, "no image with id"),
    ("/photos/../outside.png", 404, "not a route"),
    ("/static/../app.py", 404, "not a route"),
    ("/api/nothing", 404, "not a route"),
    (f"/api/search?q={'a' * 3000}", 414, "URL has"),
])
def test_bad_requests_get_a_one_line_json_error(url, path, status, match):
    got, body, kind = get(url + path)
    assert (got, kind) == (status, "application/json")
    assert body["status"] == status and match in body["error"] and "\n" not in body["error"]


def test_bodies_and_other_methods_are_refused(url):
    assert get(f"{url}/api/search?q=cube", method="POST", data=b"{}")[0] == 405
    status, body, _ = get(f"{url}/api/search?q=cube", method="GET", data=b"x" * 10)
    assert status == 413 and "no body" in body["error"]


def test_photos_never_leave_the_photo_folder(data, explorer):
    gallery = data["gallery"]
    saved = gallery.ids[0]
    gallery.ids[0] = "../outside.png"          # an id that names a file outside the photo folder
    try:
        with pytest.raises(RequestError, match="no photo this server may send"):
            explorer.photo("0")
    finally:
        gallery.ids[0] = saved


# ---- concurrency -----------------------------------------------------------------------------------------------------
def test_concurrent_requests_get_the_sequential_answers(url):
    paths = [f"/api/search?q={q(text)}&k=5" for text in QUERIES]
    paths += [f"/api/explain?q={q(text)}&image={i}&top_k=3" for i, text in enumerate(QUERIES)]
    paths += [f"/api/captions?image={i}&k=4" for i in range(6)]

    def answer(path):
        status, body, _ = get(url + path)
        assert status == 200, body
        body.pop("seconds", None)
        for hit in body.get("results", []) + body.get("captions", []):
            hit.pop("seconds", None)
        return body

    sequential = [answer(p) for p in paths]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(answer, paths * 3))
    for i, body in enumerate(concurrent):
        assert body == sequential[i % len(paths)], paths[i % len(paths)]


# ---- the command -----------------------------------------------------------------------------------------------------
def _args(data, *extra):
    return ["--model", str(data["root"] / "model.pth"), "--data_path", str(data["root"]), "--data_name", NAME,
            "--cache", str(data["root"] / "cache"), *extra]


@pytest.mark.parametrize("extra, match", [
    (["--port", "70000"], "--port must be between"),
    (["--host", "localhost:80"], "is not an IP address"),
    (["--image_root", "/no/such/folder"], "--image_root /no/such/folder is not a folder"),
    (["--shortlist", "0"], "--shortlist must be at least 1"),
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--split", "val"], "--split val: "),
])
def test_the_command_checks_its_arguments_before_loading(data, capsys, monkeypatch, extra, match):
    monkeypatch.setattr("hsc_pyg.load_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(_args(data, *extra)) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_a_taken_port_is_reported_before_loading(data, capsys, monkeypatch):
    monkeypatch.setattr("hsc_pyg.load_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(_args(data, "--port", str(taken.getsockname()[1]))) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


@pytest.mark.parametrize("stop", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_the_command_serves_on_loopback_and_stops_gracefully(data, stop):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "hsc_pyg.serve", *_args(data, "--port", "0", "--image_root",
                                                                               str(data["photos"]))],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        for line in process.stderr:
            found = re.search(r"serving (http://\S+)/", line)
            if found:
                address = found.group(1)
                break
        assert address and address.startswith("http://127.0.0.1:")
        assert get(f"{address}/api/search?q=a+cube&k=2")[0] == 200
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
