"""The OpenAPI 3.1 document of the HTTP API, served at ``/api/v1/openapi.json``.

Written by hand next to the handlers it describes, and checked against the
running daemon by schemathesis in the tests, so it cannot drift silently.
"""

from __future__ import annotations

from typing import Any

from serialmuxd import __version__

NAME_PATTERN = "^[A-Za-z0-9._-]{1,64}$"


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(ref: str, description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


COMMON = {
    "400": _err("Bad parameter"),
    "401": _err("Not authenticated"),
    "403": _err("Role missing"),
    "429": _err("Too many failed authentications; see Retry-After"),
}
CONSOLE = {**COMMON, "404": _err("No such console")}
NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": NAME_PATTERN},
}


def _action(summary: str, body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [NAME_PARAM],
        "responses": {
            "200": _json("ActionResult"),
            **CONSOLE,
            "409": _err("The console is stopped or disabled, or its backend cannot do this"),
        },
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["key"],
                        "properties": {"key": {"type": "string", "minLength": 1, "maxLength": 1}},
                    }
                }
            },
        }
    return {"post": op}


def _switch(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [NAME_PARAM],
            "responses": {"200": _json("Console"), **CONSOLE},
        }
    }


def spec(prefix: str = "") -> dict[str, Any]:
    int_param = {"type": "integer", "minimum": -(1 << 62), "maximum": 1 << 62}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "serialmuxd",
            "version": __version__,
            "description": "VM serial consoles: ring-logged output, one interactive session with takeover.",
        },
        "servers": [{"url": f"{prefix}/api/v1"}],
        "security": [{"bearer": []}, {"cookie": []}],
        "paths": {
            "/consoles": {
                "get": {
                    "summary": "List the consoles you may see",
                    "responses": {"200": _json("ConsoleList"), **COMMON},
                }
            },
            "/consoles/{name}": {
                "get": {
                    "summary": "One console",
                    "parameters": [NAME_PARAM],
                    "responses": {"200": _json("Console"), **CONSOLE},
                }
            },
            "/consoles/{name}/log": {
                "get": {
                    "summary": "Read the ring log (raw bytes)",
                    "parameters": [
                        NAME_PARAM,
                        {
                            "name": "start",
                            "in": "query",
                            "schema": int_param,
                            "description": "offset; negative = the last N bytes",
                        },
                        {
                            "name": "max_bytes",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 1 << 40},
                        },
                        {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                        {
                            "name": "follow",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Log bytes",
                            "headers": {
                                "X-Log-Start": {"schema": {"type": "string"}},
                                "X-Log-Next": {"schema": {"type": "string"}},
                                "X-Log-Truncated": {"schema": {"type": "string", "enum": ["true", "false"]}},
                            },
                            "content": {
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                            },
                        },
                        **CONSOLE,
                        "409": _err("Console disabled (follow only)"),
                    },
                }
            },
            "/consoles/{name}/wait": {
                "get": {
                    "summary": "Wait until the output matches a regular expression (RE2)",
                    "parameters": [
                        NAME_PARAM,
                        {
                            "name": "pattern",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 4096},
                        },
                        {"name": "start", "in": "query", "schema": int_param},
                        {
                            "name": "timeout_s",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 3600},
                        },
                    ],
                    "responses": {
                        "200": _json("WaitMatch"),
                        "408": _json("WaitTimeout", "No match in time"),
                        **CONSOLE,
                    },
                }
            },
            "/consoles/{name}/session": {
                "get": {
                    "summary": "WebSocket session (interactive, or ?mode=watch); see the design document for frames",
                    "parameters": [
                        NAME_PARAM,
                        {
                            "name": "mode",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["interactive", "watch"]},
                        },
                    ],
                    "responses": {
                        "101": {"description": "Switching to WebSocket"},
                        **CONSOLE,
                        "409": _err("Console disabled"),
                    },
                }
            },
            "/consoles/{name}/break": _action("Send a serial BREAK"),
            "/consoles/{name}/sysrq": _action("Magic SysRq: BREAK then the key", body=True),
            "/consoles/{name}/nmi": _action("Inject an NMI (QMP)"),
            "/consoles/{name}/reset": _action("Reset the VM (QMP)"),
            "/consoles/{name}/enable": _switch("Enable a console (owner)"),
            "/consoles/{name}/disable": _switch("Disable a console (owner): closes its session with 4003"),
            "/service": {
                "get": {
                    "summary": "Is the console service enabled",
                    "responses": {"200": _json("Service"), **COMMON},
                }
            },
            "/service/enable": {
                "post": {
                    "summary": "Enable the service (owner)",
                    "responses": {"200": _json("Service"), **COMMON},
                }
            },
            "/service/disable": {
                "post": {
                    "summary": "Disable the service (owner)",
                    "responses": {"200": _json("Service"), **COMMON},
                }
            },
            "/audit": {
                "get": {
                    "summary": "Audit events, oldest first (owner)",
                    "parameters": [
                        {"name": "console", "in": "query", "schema": {"type": "string"}},
                        {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                    ],
                    "responses": {"200": _json("AuditList"), **COMMON},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "serialmuxd_session"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
                "Session": {
                    "type": ["object", "null"],
                    "required": ["user", "peer", "since"],
                    "properties": {
                        "user": {"type": "string"},
                        "peer": {"type": "string"},
                        "since": {"type": "string", "format": "date-time"},
                    },
                },
                "Console": {
                    "type": "object",
                    "required": ["name", "state", "enabled", "backend", "session", "watchers", "log"],
                    "properties": {
                        "name": {"type": "string"},
                        "state": {"type": "string", "enum": ["running", "stopped", "disabled"]},
                        "enabled": {"type": "boolean"},
                        "backend": {"type": "string"},
                        "session": {"$ref": "#/components/schemas/Session"},
                        "watchers": {"type": "integer", "minimum": 0},
                        "log": {
                            "type": "object",
                            "required": ["first", "next", "capacity"],
                            "properties": {
                                "first": {"type": "integer"},
                                "next": {"type": "integer"},
                                "capacity": {"type": "integer"},
                                "error": {"type": "string"},
                            },
                        },
                        "link": {"type": "string", "enum": ["up", "down"]},
                        "reason": {"type": "string"},
                        "vm_status": {"type": ["string", "null"]},
                    },
                },
                "ConsoleList": {
                    "type": "object",
                    "required": ["consoles"],
                    "properties": {
                        "consoles": {"type": "array", "items": {"$ref": "#/components/schemas/Console"}}
                    },
                },
                "Service": {
                    "type": "object",
                    "required": ["enabled"],
                    "properties": {"enabled": {"type": "boolean"}},
                },
                "ActionResult": {
                    "type": "object",
                    "required": ["ok", "console", "action"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "console": {"type": "string"},
                        "action": {"type": "string"},
                    },
                },
                "WaitMatch": {
                    "type": "object",
                    "required": ["match", "start", "end"],
                    "properties": {
                        "match": {"type": "string"},
                        "start": {"type": "integer"},
                        "end": {"type": "integer"},
                    },
                },
                "WaitTimeout": {
                    "type": "object",
                    "required": ["error", "message", "next"],
                    "properties": {
                        "error": {"const": "timeout"},
                        "message": {"type": "string"},
                        "next": {"type": "integer"},
                    },
                },
                "AuditList": {
                    "type": "object",
                    "required": ["events"],
                    "properties": {
                        "events": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["time", "event", "console", "user", "peer", "session", "offset"],
                                "properties": {
                                    "time": {"type": "string"},
                                    "event": {"type": "string"},
                                    "console": {"type": ["string", "null"]},
                                    "user": {"type": "string"},
                                    "peer": {"type": "string"},
                                    "session": {"type": ["string", "null"]},
                                    "offset": {"type": ["integer", "null"]},
                                },
                            },
                        }
                    },
                },
            },
        },
    }
