"""The local explorer: a web page and a JSON API over a trained model and a gallery (``python -m hsc_pyg.serve``,
:mod:`hsc_pyg.cli.serve`). Needs the ``serve`` extra (Starlette and uvicorn): ``pip install -e '.[serve]'``.

:mod:`~hsc_pyg.serve.app` holds the routes and the :class:`~hsc_pyg.serve.app.Explorer` that answers them;
``static/`` the page (plain HTML, CSS and JavaScript, no build step).
"""
