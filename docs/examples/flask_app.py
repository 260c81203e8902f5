"""
A Flask app whose session cookie lets its users into sockdrawer (--connect-proxy), and whose logout
closes their connections on every node (the control API).

Run it with ``SOCKDRAWER_URL=http://127.0.0.1:8021 flask --app flask_app run --port 8000``, and the node with
``twistd -n sockdrawer --connect-proxy http://127.0.0.1:8000/sockdrawer/connect``.

The page and the node must share the cookie's site: serve both under one host (docs/operations.rst shows
nginx in front of both), or the browser does not send the session cookie to the node.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request, session

from sockdrawer import Client

app = Flask(__name__)
app.secret_key = os.environ.get("FLASK_SECRET_KEY", "change me: a long random string")


@app.post("/login")
def login():  # type: ignore[no-untyped-def]
    # your own login: here, whoever posts a name
    session["user"] = request.form["user"]
    return jsonify(user=session["user"])


@app.post("/sockdrawer/connect")
def sockdrawer_connect():  # type: ignore[no-untyped-def]
    # sockdrawer forwards the browser's Cookie: Flask reads the session as for any request
    user = session.get("user")
    if user is None:
        return jsonify(error="not logged in"), 401
    return jsonify(user=user, channels=["news", f"user/{user}"])


@app.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    user = session.pop("user", None)
    if user is not None:
        with Client(os.environ.get("SOCKDRAWER_URL")) as sockdrawer:
            sockdrawer.disconnect(user, reason="logged out")
    return jsonify(user=None)
