"""The API's one error shape: {"error": "<sentence>", "code": "<snake_case>"} with a 4xx status."""


class ApiError(Exception):
    """Raised anywhere under /api/; the API's exception handler renders it."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.code)


def error_body(message: str, code: str) -> dict:
    return {"error": message, "code": code}
