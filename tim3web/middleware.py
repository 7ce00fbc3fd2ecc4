"""Requests no page can honour, refused before any view runs."""

from django.core.exceptions import SuspiciousOperation


class RefuseNulMiddleware:
    """A NUL character in a page's path or query string is a 400.

    No id, name or search term contains one, and Postgres cannot even compare
    a text column with it (the query would fail: a 500). Form fields are left
    to the forms, which say so next to the field; the JSON API under /api/
    validates its own inputs and answers in its own error shape.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path.startswith("/api/") and ("\x00" in request.path or _has_nul(request.GET)):
            raise SuspiciousOperation("NUL character in the path or query string")  # Django answers 400
        return self.get_response(request)


def _has_nul(query) -> bool:
    return any("\x00" in key or any("\x00" in value for value in values) for key, values in query.lists())
