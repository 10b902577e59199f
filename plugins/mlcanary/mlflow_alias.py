"""MLflow model registry: on promotion, point the registered model's alias at the promoted version."""

from __future__ import annotations

from typing import Any

from mlcanary.versions import VersionNames


def promote_alias(
    client: Any, registered_model: str, alias: str, version: str, template: str = "{version}"
) -> str | None:
    """Set ``alias`` of ``registered_model`` to the MLflow version inside ``version`` (``template``,
    e.g. ``v{version}`` reads ``v7`` as 7); returns the version the alias pointed at before, or None.

    ``client`` is an ``mlflow.MlflowClient``. Raises ``ValueError`` when the version is not found.
    """
    number = VersionNames(template).version(version)
    if number is None or not number.isdigit():
        raise ValueError(f"rollout version {version!r} holds no MLflow version number (template {template!r})")
    try:
        previous = client.get_model_version_by_alias(registered_model, alias).version
    except Exception:  # MLflow raises when the alias is not set yet
        previous = None
    client.get_model_version(registered_model, number)  # fails clearly when the version does not exist
    client.set_registered_model_alias(registered_model, alias, number)
    return None if previous is None else str(previous)
