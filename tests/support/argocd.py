"""Runs the shipped Argo CD health check (Lua) on a FineTuningJob, as Argo CD does."""

from __future__ import annotations

import json
from pathlib import Path

import lupa

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "argocd" / "finetuningjob-health.lua"


def health(obj: dict) -> tuple[str, str]:
    """(status, message) the health check gives for the object (a JSON document)."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    # Argo CD hands the script the object as Lua tables: decode JSON into them.
    to_table = lua.eval(
        """
        function(python_to_lua, document)
          return python_to_lua(document)
        end
        """
    )

    def convert(value):
        if isinstance(value, dict):
            return lua.table_from({k: convert(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([convert(v) for v in value])
        return value

    lua.globals().obj = to_table(convert, json.loads(json.dumps(obj)))
    result = lua.execute(SCRIPT.read_text())
    return result["status"], result["message"] or ""
