"""The web app and JSON API (FastAPI, Jinja2 pages): ``create_app(config)``; ``run`` serves it
with an [http] section (watcher/web/server.py)."""
