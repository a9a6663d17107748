"""Every public class, function and method of ``embedder`` says what it takes and gives (AllenNLP's
practice): a docstring on each, so that ``help()`` and the docs have something to show."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import embedder


def public_objects() -> list[tuple[str, object]]:
    found = []
    for info in pkgutil.iter_modules(embedder.__path__):
        module = importlib.import_module(f"embedder.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                found.append((f"{module.__name__}.{name}", value))
            if inspect.isclass(value):
                found += [(f"{module.__name__}.{name}.{method}", getattr(value, method))
                          for method, function in vars(value).items()
                          if not method.startswith("_") and inspect.isfunction(function)]
    return found


def test_every_public_name_of_embedder_has_a_docstring():
    objects = public_objects()
    assert len(objects) > 150
    # a method may take its docstring from the protocol or base class it implements
    assert [name for name, value in objects if not (inspect.getdoc(value) or "").strip()] == []
