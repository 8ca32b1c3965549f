"""The service's OpenAPI 3.1 document (``GET /openapi.json``), written by hand next to the code
it describes; tests check it against the routes and the OpenAPI schema."""

from __future__ import annotations

from typing import Any


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    r: dict[str, Any] = {"description": description,
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    if retry_after:
        r["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                        "schema": {"type": "integer"}}}
    return r


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``cinemae-serve``."""
    error = {"type": "object", "required": ["code", "message"],
             "properties": {"code": {"type": "string", "examples": ["too_large"]},
                            "message": {"type": "string"}}}
    model = {"type": "object", "description": "What produced the results (Detector.model_info).",
             "properties": {"id": {"type": "string"}, "version": {"type": "string"},
                            "manifest_sha256": {"type": "string"}, "backend": {"type": "string"},
                            "precision": {"type": "string"}, "k": {"type": "integer"},
                            "threshold": {"type": "number"},
                            "reship": {"type": "object", "description": "Only when the service runs the re-shipping "
                                       "ensemble (cinemae-serve --reship): its views and what they act on.",
                                       "properties": {"views": {"type": "array", "items": {"type": "string"}},
                                                      "on": {"type": "string", "enum": ["delivered", "picture"]}}},
                            "trained": {"type": "boolean", "description": "Top-level model only."}}}
    number_or_null = {"type": ["number", "null"]}
    result = {
        "type": "object", "required": ["index", "source", "score", "verdict", "error", "error_code", "model"],
        "description": "One image: the runtime's result record (Result.to_record) plus the service's fields "
                       "index, sha256 and, for a failed image, status.",
        "properties": {
            "source": {"type": "string", "description": "The multipart part's filename, or '<request body>'."},
            "score": {**number_or_null, "minimum": 0, "maximum": 1, "description": "p(AI-generated) = sigmoid(logit)."},
            "logit": number_or_null,
            "verdict": {"type": ["string", "null"], "enum": ["ai", "real", "uncertain", None]},
            "stats": {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 3, "maxItems": 3,
                      "description": "LCAS summary statistics (s1, s2, s3)."},
            "error": {"type": ["string", "null"], "description": "Why this image could not be scored."},
            "error_code": {"type": ["string", "null"], "examples": ["unsupported", "too_large", "truncated"]},
            "timings": {"type": "object", "additionalProperties": {"type": "number"}},
            "model": {"$ref": "#/components/schemas/Model"},
            "index": {"type": "integer", "description": "Position of the image in the request."},
            "sha256": {"type": ["string", "null"], "description": "sha256 of the image bytes."},
            "status": {"type": "integer", "description": "HTTP status of this image's error."},
            "pixel_verdict": {"type": ["string", "null"], "description": "The verdict of the pixels alone."},
            "reason": {"type": ["string", "null"], "enum": ["pixels", "provenance", None],
                       "description": "provenance: AI provenance in the file made the verdict ai."},
            "provenance": {"type": "object", "description": "What the file says about itself (C2PA, XMP, "
                           "EXIF, generator text chunks, JPEG comments), read before the pixels."},
            "heatmap": {"type": "object", "description": "With explain: the per-patch map (values, count, "
                        "covered, range, crop, boxes, hottest); for a tiled bundle (kind 'tiles') the map of its "
                        "crop logits over the picture (values, cell_tiles, threshold_logit, ...)."},
            "tiles": {"type": "array", "description": "A tiled bundle: each crop's box in the original image and "
                      "its logit (the image's logit is their mean).",
                      "items": {"type": "object", "properties": {"box": {"type": ["array", "null"]},
                                                                 "logit": {"type": "number"}}}},
            "reship": {"type": "array", "description": "With the re-shipping ensemble: each view's p, logit and "
                       "verdict, the original first; the verdict is the original's when all agree, else uncertain.",
                       "items": {"type": "object", "properties": {
                           "view": {"type": "string"}, "score": {"type": "number"}, "logit": {"type": "number"},
                           "verdict": {"type": "string"}}}},
            "heatmap_png": {"type": ["string", "null"], "description": "With png=1: the overlay as a data URL."}}}
    detect_response = {"type": "object", "required": ["request_id", "model", "results"],
                       "properties": {"request_id": {"type": "string"},
                                      "model": {"$ref": "#/components/schemas/Model"},
                                      "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}},
                                      "error": {"$ref": "#/components/schemas/Error"},
                                      "timings": {"type": "object", "additionalProperties": {"type": "number"}}}}
    binary = {"type": "string", "format": "binary"}
    detect = {
        "operationId": "detect",
        "summary": "Score one image (raw body) or several (multipart file parts).",
        "description": "Every request-level error is JSON ``{error: {code, message}}``. A multipart request "
                       "where some images fail answers 200 with per-image errors; it fails as a whole with the "
                       "first failure's status only when every image failed.",
        "security": [{"bearer": []}, {}],
        "parameters": [{"name": "X-Request-Id", "in": "header", "required": False,
                        "schema": {"type": "string", "maxLength": 128},
                        "description": "Echoed back (a new id is made when absent or not a sane token)."},
                       {"name": "explain", "in": "query", "required": False, "schema": {"enum": ["0", "1"]},
                        "description": "1: add each image's per-patch LCAS heatmap (grid, patch boxes in the "
                                       "original image) as ``heatmap``."},
                       {"name": "explain_k", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 16},
                        "description": "Masking runs for the heatmap (e.g. 8 covers every patch); the verdict "
                                       "keeps the model's K. Implies explain=1."},
                       {"name": "png", "in": "query", "required": False, "schema": {"enum": ["0", "1"]},
                        "description": "1: also the overlay as a data:image/png;base64 URL in ``heatmap_png``. "
                                       "Implies explain=1."}],
        "requestBody": {"required": True, "content": {
            "image/*": {"schema": binary},
            "application/octet-stream": {"schema": binary},
            "multipart/form-data": {"schema": {"type": "object", "additionalProperties": binary}}}},
        "responses": {
            "200": {"description": "Scored (possibly with per-image errors).",
                    "headers": {"X-Request-Id": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DetectResponse"}}}},
            "400": _error("Malformed request (Content-Length, multipart, closing boundary, a bad explain, "
                          "explain_k or png value)."),
            "401": _error("Missing or wrong bearer token."),
            "408": _error("The request body stopped arriving (the connection is closed)."),
            "413": _error("Body, image pixels, images per request or request pixels over the limit."),
            "415": _error("Every image is in an unsupported format."),
            "422": _error("Every image is empty, truncated or undecodable, or a multipart body has no file parts."),
            "431": _error("Request line and headers too large (the connection is closed)."),
            "503": _error("Overloaded (queue, in-flight bytes or requests), starting or shutting down.",
                          retry_after=True)}}
    probe = {"type": "object", "properties": {"status": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cinemae-serve", "version": version,
                 "description": "Detect AI-generated images with CINEMAE (frozen MAE + LCAS statistics + head)."},
        "paths": {
            "/v1/detect": {"post": detect},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness: 200 while the process runs.",
                                 "responses": {"200": {"description": "Alive.", "content": {
                                     "application/json": {"schema": probe}}}}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness: 200 once warmed up.",
                                "responses": {"200": {"description": "Ready.", "content": {
                                    "application/json": {"schema": probe}}},
                                    "503": {"description": "Starting or draining.", "content": {
                                        "application/json": {"schema": probe}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text exposition.",
                                 "responses": {"200": {"description": "Metrics.",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/": {"get": {"operationId": "review_page", "summary": "The review page (HTML; no token needed "
                                 "to load it, the page sends the token to /v1/detect).",
                          "responses": {"200": {"description": "The page.",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/review/{name}": {"get": {"operationId": "review_asset", "summary": "The page's script and style.",
                                       "parameters": [{"name": "name", "in": "path", "required": True,
                                                       "schema": {"enum": ["app.js", "app.css"]}}],
                                       "responses": {"200": {"description": "The file."},
                                                     "404": _error("No such file.")}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                                      "responses": {"200": {"description": "OpenAPI 3.1 document.",
                                                            "content": {"application/json": {
                                                                "schema": {"type": "object"}}}}}}}},
        "components": {
            "schemas": {"Error": error, "ErrorBody": {"type": "object", "required": ["error"],
                                                      "properties": {"error": {"$ref": "#/components/schemas/Error"},
                                                                     "request_id": {"type": "string"}}},
                        "Model": model, "Result": result, "DetectResponse": detect_response},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Required when the service has a token "
                                                          "(CINEMAE_TOKEN or --token)."}}},
    }
