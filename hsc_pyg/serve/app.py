"""The explorer's HTTP API and page, over one loaded model and one gallery (Starlette; uvicorn runs it).

Routes (all ``GET``; JSON unless said otherwise):

``/``                                    the page (``static/index.html``; its script and style under ``/static/``)
``/api/info``                            the gallery, the model and the limits below
``/api/search?q=TEXT&k=K``               text -> photos: first stage over the gallery, the ``shortlist`` best scored
                                         exactly, the top ``k`` (as ``python -m hsc_pyg.search --query``)
``/api/captions?image=ID&k=K``           photo -> captions of the gallery (as ``--image``)
``/api/explain?q=TEXT&image=ID&top_k=T&rank=R``  why photo ``ID`` matched ``TEXT``
                                         (:func:`hsc_pyg.viz.explain.explain_pair`; ``rank``: global or per_node, as
                                         ``python -m hsc_pyg.viz --rank``) and the photo's best-matching captions
``/photos/ID``                           the photo of gallery image ``ID`` (its id or row), read from the photo folder;
                                         no path ever comes from the request

Bad input gets status 4xx and ``{"error": "one line: what is wrong and how to fix it", "status": N}``. The model is
shared by the request threads; at most ``parallel`` requests compute at once, on a pool of that many threads (the
others wait), which bounds memory and keeps a busy server's CPUs from being oversubscribed.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..data.precomp import PrecompSplit
from ..data.vocab import Vocabulary
from ..engine.retrieval import Gallery, search_image, search_text
from ..errors import ConfigError, HSCError
from ..nn.model import HSCModel
from ..viz.explain import explain_pair
from ..viz.relations import RANKINGS

STATIC = Path(__file__).parent / "static"
PHOTO_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif"}
log = logging.getLogger("hsc_pyg.serve")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for."""

    max_query_chars: int = 300
    max_k: int = 100
    max_top_k: int = 50
    max_url_bytes: int = 2048
    max_body_bytes: int = 0          # every route is GET: a request with a body is refused
    captions_per_explanation: int = 5

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class RequestError(HSCError):
    """A request the API refuses; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Explorer:
    """The model, its vocabulary, the split (for the explanations' region graphs), the gallery, the photo folder and
    the answers of the API, as plain dicts. Thread-safe: the model is only read (eval mode); the request threads hand
    the work to a pool of ``parallel`` threads (the others wait), so the scorer's per-thread scratch memory is bounded
    by ``parallel``, not by the number of request threads."""

    def __init__(self, model: HSCModel, vocab: Vocabulary, split: PrecompSplit, gallery: Gallery,
                 image_root: str | Path | None, shortlist: int, limits: Limits = Limits(), parallel: int = 2):
        if parallel < 1:
            raise ConfigError(f"parallel must be at least 1, found {parallel}")
        self.model, self.vocab, self.split, self.gallery = model.eval(), vocab, split, gallery
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.shortlist, self.limits = shortlist, limits
        # the model runs on these threads only: the scorer's per-thread scratch buffers stay `parallel` sets
        self._workers = ThreadPoolExecutor(parallel, thread_name_prefix="hsc-serve")

    # ---------------------------------------------------------------- checks of request values
    def _text(self, params: dict[str, str]) -> str:
        text = params.get("q", "")
        if not text.strip():
            raise RequestError("q is missing or empty; pass the sentence to search for, e.g. ?q=a+dog+on+the+beach")
        if len(text) > self.limits.max_query_chars:
            raise RequestError(f"q has {len(text)} characters, more than the {self.limits.max_query_chars} allowed; "
                               "shorten the sentence")
        return text

    @staticmethod
    def _int(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
        raw = params.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise RequestError(f"{name}={raw[:20]!r} is not a whole number; pass {name} between {low} and {high}") \
                from None
        if not low <= value <= high:
            raise RequestError(f"{name}={value} is out of range; pass {name} between {low} and {high}")
        return value

    def _image(self, params: dict[str, str]) -> int:
        image = params.get("image")
        if not image:
            raise RequestError("image is missing; pass a gallery image by id or row, e.g. ?image=0")
        return self.row(image)

    def row(self, image: str) -> int:
        """The gallery row of an image given by id or row; RequestError 404 when there is none."""
        try:
            return self.gallery.index_of(image)
        except ConfigError as e:
            raise RequestError(str(e), 404) from None

    def _hits(self, result: dict[str, Any]) -> dict[str, Any]:
        for hit in result["results"]:
            hit["photo"] = f"/photos/{quote(hit['id'], safe='')}"
        return result

    def _compute(self, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return self._workers.submit(work).result()

    # ---------------------------------------------------------------- answers
    def info(self) -> dict[str, Any]:
        config = self.model.config
        return {"gallery_size": len(self.gallery), "captions": len(self.gallery.captions or []),
                "data": self.split.name, "split": self.split.split, "shortlist": self.shortlist,
                "photos": self.image_root is not None, "aligned_levels": list(self.model.levels),
                "img_gnn": config.img_gnn, "img_layers": config.img_layers,
                "first_stage_trained": bool(self.model.first_stage.trained), "limits": self.limits.as_dict()}

    def search(self, params: dict[str, str]) -> dict[str, Any]:
        text = self._text(params)
        k = self._int(params, "k", 10, 1, self.limits.max_k)
        return self._hits(self._compute(lambda: search_text(self.model, self.gallery, text, k=k,
                                                            shortlist=self.shortlist, vocab=self.vocab).to_dict()))

    def captions(self, params: dict[str, str]) -> dict[str, Any]:
        row = self._image(params)
        k = self._int(params, "k", 5, 1, self.limits.max_k)
        return self._compute(lambda: search_image(self.model, self.gallery, row, k=k,
                                                  shortlist=self.shortlist).to_dict())

    def explain(self, params: dict[str, str]) -> dict[str, Any]:
        text = self._text(params)
        row = self._image(params)
        top_k = self._int(params, "top_k", 12, 0, self.limits.max_top_k)
        ranking = params.get("rank", "global")
        if ranking not in RANKINGS:
            raise RequestError(f"rank={ranking[:20]!r} is unknown; pass one of {', '.join(RANKINGS)}")

        def work() -> dict[str, Any]:
            out = explain_pair(self.model, self.split, row, text, self.vocab, top_k=top_k, ranking=ranking)
            out["photo"] = f"/photos/{quote(self.gallery.ids[row], safe='')}"
            out["captions"] = (search_image(self.model, self.gallery, row, k=self.limits.captions_per_explanation,
                                            shortlist=self.shortlist).to_dict()["results"]
                               if self.gallery.captions is not None else [])
            return out
        return self._compute(work)

    def photo(self, image: str) -> Path:
        """The file of gallery image ``image``: the photo folder joined with the id the gallery holds, refused when
        it would lie outside the folder (an id like ``../x``) or is not a photo type."""
        if self.image_root is None:
            raise RequestError("this server has no photo folder; start it with --image_root", 404)
        path = (self.image_root / self.gallery.ids[self.row(image)]).resolve()
        if not path.is_relative_to(self.image_root) or path.suffix.lower() not in PHOTO_TYPES:
            raise RequestError(f"image {image!r} has no photo this server may send", 404)
        if not path.is_file():
            raise RequestError(f"the photo of image {image!r} is missing from the photo folder", 404)
        return path


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class LimitRequests:
    """ASGI middleware: refuses URLs longer than ``max_url_bytes`` (414), request bodies (413) and methods other than
    GET and HEAD (405) before any route runs."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length", b"0")
            body = int(declared) if declared.isdigit() else self.limits.max_body_bytes + 1
            refusal = None
            if scope["method"] not in ("GET", "HEAD"):
                refusal = _error(f"method {scope['method']} is not allowed; every route of this API is GET", 405)
            elif length > self.limits.max_url_bytes:
                refusal = _error(f"the URL has {length} bytes, more than the {self.limits.max_url_bytes} allowed; "
                                 "shorten the query", 414)
            elif body > self.limits.max_body_bytes or b"transfer-encoding" in headers:
                refusal = _error("requests carry no body here; pass the values as query parameters", 413)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(explorer: Explorer) -> Starlette:
    """The Starlette application of ``explorer``'s API and page."""
    allowed = {"/api/search": {"q", "k"}, "/api/captions": {"image", "k"}, "/api/explain": {"q", "image", "top_k", "rank"}}

    def api(answer: Callable[[dict[str, str]], dict[str, Any]]):
        def endpoint(request: Request) -> Response:
            params = request.query_params
            unknown = sorted(set(params) - allowed.get(request.url.path, set()))
            if unknown:
                return _error(f"unknown parameter(s) {', '.join(unknown)}; this route takes "
                              f"{', '.join(sorted(allowed.get(request.url.path, ()))) or 'none'}", 400)
            if any(len(params.getlist(name)) > 1 for name in params):
                return _error("a parameter is given twice; give each once", 400)
            try:
                return JSONResponse(answer(dict(params)))
            except RequestError as e:
                return _error(str(e), e.status)
            except HSCError as e:        # the library's one-line errors about the values (unknown words, ...)
                return _error(str(e), 400)
        return endpoint

    def photo(request: Request) -> Response:
        try:
            path = explorer.photo(request.path_params["image"])
        except RequestError as e:
            return _error(str(e), e.status)
        return FileResponse(path, media_type=PHOTO_TYPES[path.suffix.lower()],
                            headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def not_found(request: Request, exc) -> Response:
        return _error(f"{request.url.path} is not a route of this server; see / or /api/info", 404)

    async def failed(request: Request, exc: Exception) -> Response:
        log.exception("request %s failed", request.url.path)
        return _error("the server failed on this request (its log has the details)", 500)

    routes = [Route("/", page), Route("/api/info", api(lambda params: explorer.info())),
              Route("/api/search", api(explorer.search)), Route("/api/captions", api(explorer.captions)),
              Route("/api/explain", api(explorer.explain)), Route("/photos/{image:str}", photo),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, middleware=[Middleware(LimitRequests, limits=explorer.limits)],
                     exception_handlers={404: not_found, Exception: failed})


def make_server(explorer: Explorer, access_log: bool = False) -> uvicorn.Server:
    """The uvicorn server of ``explorer``'s app: at most 64 connections at once (more get 503), request heads bounded
    by h11 (16 KiB); on Ctrl-C or SIGTERM (or ``should_exit``) it stops accepting, lets the requests in flight finish
    for up to 10 s and returns. Run it with ``.run(sockets=[bound_socket])``."""
    config = uvicorn.Config(build_app(explorer), log_level="warning", access_log=access_log, limit_concurrency=64,
                            timeout_graceful_shutdown=10, h11_max_incomplete_event_size=16384)
    return _Server(config)


class _Server(uvicorn.Server):
    """uvicorn's server, except that after a graceful stop on Ctrl-C or SIGTERM it returns (the command then says
    so and exits with 0) instead of raising the signal again, which ends the process by it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
