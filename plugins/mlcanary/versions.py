"""Names that carry a model version: a template such as ``ranker-{version}``, and its inverse."""

from __future__ import annotations

import re


class VersionNames:
    """A name template such as ``ranker-{version}``, and its inverse."""

    def __init__(self, template: str) -> None:
        if template.count("{version}") != 1:
            raise ValueError(f"the template {template!r} must contain {{version}} once")
        self.template = template
        head, tail = template.split("{version}")
        self._pattern = re.compile(f"^{re.escape(head)}(?P<version>.+){re.escape(tail)}$")

    def name(self, version: str) -> str:
        return self.template.replace("{version}", version)

    def version(self, name: str) -> str | None:
        found = self._pattern.match(name)
        return found.group("version") if found else None
