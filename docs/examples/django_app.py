"""
A Django project in one file whose session cookie lets its users into sockdrawer (--connect-proxy), and
whose logout closes their connections on every node (the control API).

Run it with ``SOCKDRAWER_URL=http://127.0.0.1:8021 python django_app.py 8000``, and the node with
``twistd -n sockdrawer --connect-proxy http://127.0.0.1:8000/sockdrawer/connect``.

In a real project the three views go into an app's views.py and urls.py; the session is the one Django
already keeps (any SESSION_ENGINE).
"""

from __future__ import annotations

import os
import sys

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "change me: a long random string"),
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
    SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
)

from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.http import require_POST  # noqa: E402

from sockdrawer import Client  # noqa: E402


@require_POST
def login(request: HttpRequest) -> JsonResponse:
    # your own login: here, whoever posts a name
    request.session["user"] = request.POST["user"]
    return JsonResponse({"user": request.session["user"]})


@require_POST
def sockdrawer_connect(request: HttpRequest) -> JsonResponse:
    # sockdrawer forwards the browser's Cookie: Django reads the session as for any request
    user = request.session.get("user")
    if user is None:
        return JsonResponse({"error": "not logged in"}, status=401)
    return JsonResponse({"user": user, "channels": ["news", f"user/{user}"]})


@require_POST
def logout(request: HttpRequest) -> JsonResponse:
    user = request.session.pop("user", None)
    if user is not None:
        with Client(os.environ.get("SOCKDRAWER_URL")) as sockdrawer:
            sockdrawer.disconnect(user, reason="logged out")
    return JsonResponse({"user": None})


urlpatterns = [path("login", login), path("sockdrawer/connect", sockdrawer_connect), path("logout", logout)]

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    from django.core.wsgi import get_wsgi_application

    make_server("127.0.0.1", int(sys.argv[1]), get_wsgi_application()).serve_forever()
