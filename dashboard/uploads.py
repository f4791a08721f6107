"""Limits on what one request may upload: number of files and their total size.

Gradio itself bounds only each file (``max_file_size``). Every browser upload goes
through its ``/upload`` route as one multipart request, so :class:`UploadLimits`
bounds that request before Gradio reads it (total size from Content-Length) and
while it streams (the parts counted as they arrive); the upload tab checks the
files it is handed again (:func:`refusal`), as an API call can name files
uploaded earlier.
"""

from __future__ import annotations

import os

from steelsight.contract import Settings

PART_OVERHEAD = 1024  # bytes of multipart headers and boundary allowed per file beside its content


def refusal(paths: list[str], settings: Settings) -> str | None:
    """Why the upload tab refuses these files together, or None."""
    if len(paths) > settings.max_upload_files:
        return (f"{len(paths)} files in one request; at most {settings.max_upload_files} "
                "(STEELSIGHT_MAX_UPLOAD_FILES)")
    total = sum(os.path.getsize(p) for p in paths)
    if total > settings.max_upload_total_bytes:
        return (f"{total} bytes in one request; at most {settings.max_upload_total_bytes} "
                "(STEELSIGHT_MAX_UPLOAD_TOTAL_BYTES)")
    return None


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class UploadLimits:
    """ASGI middleware: 413 for an upload request over the file count or total size, 411 without a length."""

    def __init__(self, app, max_files: int, max_total_bytes: int):
        self.app, self.max_files, self.max_total_bytes = app, max_files, max_total_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        boundary = _boundary(headers.get(b"content-type", b""))
        length = headers.get(b"content-length")
        limit = self.max_total_bytes + PART_OVERHEAD * (self.max_files + 1)
        try:
            if length is None:
                raise _Refused(411, "an upload needs a Content-Length")
            if int(length) > limit:
                raise _Refused(413, f"upload of {int(length)} bytes refused: files in one request may total at "
                                    f"most {self.max_total_bytes} bytes (STEELSIGHT_MAX_UPLOAD_TOTAL_BYTES)")
        except _Refused as exc:
            return await _respond(send, exc)
        except ValueError:
            return await _respond(send, _Refused(400, "malformed Content-Length"))
        if boundary is None:
            return await self.app(scope, receive, send)

        delimiter = b"\r\n--" + boundary
        seen = {"parts": 0, "tail": b"\r\n", "received": 0}  # the body's first delimiter has no CRLF before it

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen["received"] += len(body)
                data = seen["tail"] + body
                # a part starts at every delimiter not followed by "--" (the closing one)
                at = data.find(delimiter)
                while at != -1:
                    after = data[at + len(delimiter): at + len(delimiter) + 2]
                    if len(after) < 2:
                        break  # decide when the next chunk arrives
                    if after != b"--":
                        seen["parts"] += 1
                    at = data.find(delimiter, at + 1)
                keep = len(delimiter) + 1
                seen["tail"] = data[at:] if at != -1 else data[-keep:]
                if seen["parts"] > self.max_files:
                    raise _Refused(413, f"upload refused: more than {self.max_files} files in one request; at most "
                                        f"{self.max_files} (STEELSIGHT_MAX_UPLOAD_FILES)")
                if seen["received"] > limit:
                    raise _Refused(413, f"upload refused: more than {self.max_total_bytes} bytes in one request")
            return message

        started = {"response": False}

        async def watching_send(message):
            started["response"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _Refused as exc:
            if started["response"]:
                raise
            await _respond(send, exc)


def _boundary(content_type: bytes) -> bytes | None:
    for part in content_type.split(b";"):
        name, _, value = part.strip().partition(b"=")
        if name.lower() == b"boundary" and value:
            return value.strip(b'"')
    return None


async def _respond(send, exc: _Refused) -> None:
    body = exc.message.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
