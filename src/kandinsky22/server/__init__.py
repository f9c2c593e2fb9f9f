"""The HTTP server: ``kandinsky22 serve`` (see :mod:`kandinsky22.server.app`) and its web page (``static/``)."""
