"""What onnxprune writes into a model's ``metadata_props``: one JSON record per transformation, for auditing."""

from __future__ import annotations

import json

import onnx

SUMMARY_KEY = "onnxprune.summary"


def stamp(model: onnx.ModelProto, summary: dict) -> None:
    """Record what was done (tool, config, plan, sizes) in the model's metadata_props for auditing."""
    set_metadata(model, SUMMARY_KEY, json.dumps({k: v for k, v in summary.items() if k != "barriers"}))


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set (or replace) one ``metadata_props`` entry in place."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def read_json_entry(model: onnx.ModelProto, key: str) -> dict | None:
    """The JSON object stored under ``metadata_props[key]``, or None when there is no such entry.

    Raises:
        ValueError: the entry exists but is not a JSON object.
    """
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, dict):
                raise ValueError(f"metadata entry {key!r} is not a JSON object")
            return value
    return None
